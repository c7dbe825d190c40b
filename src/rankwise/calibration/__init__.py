"""Corpora, window sampling and calibration statistics."""
from .corpus import load_corpus
from .sampling import calib_windows, eval_windows, tokenize

__all__ = ["calib_windows", "eval_windows", "load_corpus", "tokenize"]
