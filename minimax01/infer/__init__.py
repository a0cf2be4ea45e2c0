"""Inference: sampling, generate(), the batched serving engine and the HTTP server."""

from .generate import generate
from .sampling import sample

__all__ = ["generate", "sample", "Engine", "SamplingParams"]


def __getattr__(name):  # the engine is imported on first use
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name == "SamplingParams":
        from .request import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'minimax01.infer' has no attribute {name!r}")
