"""Long-context evaluations, perplexity."""
