"""Evaluation shared by all jobs: perplexity (latency and memory live beside it)."""
from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]

