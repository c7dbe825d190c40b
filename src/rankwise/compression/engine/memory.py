"""Keeping the resident set of a long low-memory run close to its live data (glibc malloc).

Two effects inflate the peak RSS of a run that allocates and frees the same large buffers block
after block (measured on SmolLM2 --low-memory: +110 MB over six blocks, growing):

* glibc raises its mmap threshold to the size of each freed mmapped chunk (up to 32 MB), after which
  buffers below that size come from the heap, whose freed pages are kept and fragment; pinning the
  threshold (:func:`mmap_large_allocations`) returns every buffer of 1 MB or more to the system when
  it is freed. It is a process-wide setting, so the CLI sets it for ``--low-memory`` runs and API
  users opt in;
* memory freed in the heap (the tokenizer, a released block's Python objects) stays resident until
  trimmed: :func:`trim` returns it (called between blocks; a no-op where it does not apply).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)


def _libc():
    try:
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not hasattr(libc, "malloc_trim") or not hasattr(libc, "mallopt"):
        return None  # not glibc
    return libc


def trim() -> None:
    """Collect garbage cycles and give the heap's free pages back to the system (glibc)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def mmap_large_allocations(threshold: int = 1 << 20) -> bool:
    """Serve allocations of ``threshold`` bytes or more with mmap for the rest of the process (glibc;
    disables the dynamic threshold). Returns whether it applied."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1)


__all__ = ["mmap_large_allocations", "trim"]
