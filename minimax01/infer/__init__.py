"""Inference: sampling, generate(), the batched serving engine and the HTTP server."""

from .generate import generate
from .sampling import sample

__all__ = ["generate", "sample"]
