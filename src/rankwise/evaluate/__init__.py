"""Evaluation shared by all jobs: perplexity (latency and memory live beside it)."""
from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
from .._callable import make_callable

make_callable(__name__, "rankwise.evaluate.perplexity:perplexity")
