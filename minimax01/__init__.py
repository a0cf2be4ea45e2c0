"""minimax01: the MiniMax-01 system in PyTorch (arXiv 2501.08313)."""

from .config import ModelConfig

__version__ = "0.1.0"

__all__ = ["ModelConfig", "MiniMaxForCausalLM", "MiniMaxVLForConditionalGeneration", "generate",
           "__version__"]


def __getattr__(name):  # lazy: `import minimax01` stays cheap
    if name == "MiniMaxForCausalLM":
        from .model import MiniMaxForCausalLM

        return MiniMaxForCausalLM
    if name == "MiniMaxVLForConditionalGeneration":
        from .vision.model import MiniMaxVLForConditionalGeneration

        return MiniMaxVLForConditionalGeneration
    if name == "generate":
        from .infer.generate import generate

        return generate
    raise AttributeError(f"module 'minimax01' has no attribute {name!r}")
