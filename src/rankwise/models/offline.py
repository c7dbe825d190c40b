"""Offline loading: rankwise never downloads, and never changes the caller's environment for good."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

#: Set while rankwise itself loads a model or tokenizer; restored afterwards.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1"}
#: Set only when the caller has not chosen (tokenizers warns about forks otherwise).
DEFAULT_ENV = {"TOKENIZERS_PARALLELISM": "false"}


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """For the duration of the block: ``HF_HUB_OFFLINE=1`` and, if unset, ``TOKENIZERS_PARALLELISM=false``.

    The previous values (or their absence) are restored on exit, error or not. Every rankwise load also
    passes ``local_files_only=True``; this is the second guard. (huggingface_hub reads HF_HUB_OFFLINE
    once, when it is first imported: a process that imported it online stays online for other callers.)
    """
    saved = {k: os.environ.get(k) for k in (*OFFLINE_ENV, *DEFAULT_ENV)}
    os.environ.update(OFFLINE_ENV)
    for k, v in DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
