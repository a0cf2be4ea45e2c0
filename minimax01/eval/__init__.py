"""Evaluations: retrieval in long contexts (passkey, needle-in-a-haystack) and perplexity by
position, the measurements behind the paper's long-context claims."""

from .perplexity import PerplexityResult, perplexity
from .retrieval import RetrievalResult, evaluate_retrieval

__all__ = ["evaluate_retrieval", "RetrievalResult", "perplexity", "PerplexityResult"]
