"""nn.Modules of the MiniMax-01 model, single device."""

from .model import CausalLMOutput, MiniMaxForCausalLM, MiniMaxModel

__all__ = ["MiniMaxForCausalLM", "MiniMaxModel", "CausalLMOutput"]
