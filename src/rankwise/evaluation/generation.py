"""Generate a continuation of one prompt, streamed as it is decoded, with its speed.

The prompt goes through the tokenizer's chat template when it has one (an instruction-tuned model
answers a user turn), else it is continued as plain text. Decoding is greedy unless ``temperature > 0``
(then sampled with ``seed``). Speed, from the arrival time ``t_i`` of each new token ``i = 1..n``:

* time to first token ``t_1 - t_0`` (the prompt's prefill plus one step);
* decode ``(n - 1) / (t_n - t_1)`` tokens/s, the rate of the cached single-token steps (what
  :func:`rankwise.evaluation.latency.decode_tokens_per_second` measures on random ids).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..errors import ConfigError
from ..models.architecture import check_language_model

#: The prompt used when none is given.
DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    chat_template: bool
    seconds: float
    first_token_seconds: float
    tokens_per_second: float

    def to_dict(self) -> dict:
        return asdict(self)


def prepare_inference(model) -> dict[str, int] | None:
    """Build the fast runtime forms of the model's structured layers now (packed int4 / int8 kernels,
    de-quantized caches: :func:`rankwise.models.runtime.prepare_inference`, where this rankwise has it) and
    return ``{kernel path: layers}``; None when this rankwise has no runtime forms (layers then run as
    stored)."""
    try:
        from ..models.runtime import prepare_inference as _prepare
    except ImportError:
        return None
    counts: dict[str, int] = {}
    for row in _prepare(model):
        counts[row.path] = counts.get(row.path, 0) + 1
    return counts


def prompt_ids(tokenizer, prompt: str, chat: bool | None = None) -> tuple[torch.Tensor, bool]:
    """``(ids (1, L), used the chat template)``; ``chat=None`` uses the template when the tokenizer has one."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has:
        raise ConfigError("the tokenizer has no chat template; drop --chat (the prompt is then continued as plain text)")
    if chat is None:
        chat = has
    if chat:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        ids = enc["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise ConfigError("the prompt is empty after tokenization; pass some text with --prompt")
    return ids, bool(chat)


def _streamer(tokenizer, write: Callable[[str], object] | None):
    from transformers import TextStreamer

    class TimedStreamer(TextStreamer):
        """transformers' ``TextStreamer`` that records each new token's arrival and writes text to ``write``."""

        def __init__(self) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.times: list[float] = []
            self._prompt = True

        def put(self, value) -> None:
            if self._prompt:  # generate() hands over the prompt first
                self._prompt = False
            else:
                self.times.append(time.perf_counter())
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if write is not None and text:
                write(text)

    return TimedStreamer()


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 64,
                  temperature: float = 0.0, seed: int = 0, chat: bool | None = None,
                  write: Callable[[str], object] | None = None) -> GenerationResult:
    """Continue ``prompt`` with up to ``max_new_tokens`` tokens; ``write(text)`` receives the text as it is
    decoded (transformers' ``TextStreamer``). Returns the text and the speed (module docstring)."""
    check_language_model(model, "generate")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    ids, used_chat = prompt_ids(tokenizer, prompt, chat)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and ids.shape[1] + max_new_tokens > limit:
        raise ConfigError(f"the prompt ({ids.shape[1]} tokens) plus --max-new-tokens {max_new_tokens} exceeds the "
                          f"model's {limit} positions; shorten the prompt or lower --max-new-tokens")
    device = next(model.parameters()).device
    ids = ids.to(device)
    streamer = _streamer(tokenizer, write)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sample = temperature > 0
    kw = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if sample else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             pad_token_id=pad, streamer=streamer, use_cache=True, **kw)
        total = time.perf_counter() - t0
    model.train(was_training)
    new = out[0, ids.shape[1]:]
    times = streamer.times
    first = times[0] - t0 if times else total
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")
    return GenerationResult(text=tokenizer.decode(new, skip_special_tokens=True), prompt_tokens=int(ids.shape[1]),
                            new_tokens=int(new.numel()), chat_template=used_chat, seconds=total,
                            first_token_seconds=first, tokens_per_second=rate)


__all__ = ["DEFAULT_PROMPT", "GenerationResult", "generate_text", "prepare_inference", "prompt_ids"]
