"""Measured speed model: up to which rank is ``B(A x)`` faster than the dense ``W x``?

For a layer of shape (m, n) and a regime of ``t`` tokens per call (``decode``: 1 token, batch 1;
``prefill``: 512 tokens), the *break-even rank* is the largest ``k`` in ``[1, k_max]`` with

    latency(LowRankLinear(n, m, k), x[t, n])  <  latency(Linear(n, m), x[t, n])

(``k_max`` = the largest rank that still saves parameters, ``k (m + n) < m n``), or 0 when even rank 1
is not faster. Latency grows with ``k``, so the search is a bisection over ``k`` (about ``log2 k_max``
timings per shape and regime, distinct shapes only).

Profiles are cached per machine in ``<cache>/speed/<fingerprint-hash>.json``. The fingerprint holds
the torch version, CPU model, thread count, device and dtype; a profile whose fingerprint differs
from the current one (another machine, torch version, thread count, ...) is re-measured, never trusted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ...files import cache_dir, write_json
from ...errors import ConfigError
from ...structures.lowrank import LowRankLinear, max_saving_rank

log = logging.getLogger(__name__)

#: Tokens per call in each regime: batch-1 decode and a 512-token prefill.
REGIMES: dict[str, int] = {"decode": 1, "prefill": 512}
SPEED_MODEL_VERSION = 2

#: ``latency(m, n, rank_or_None, tokens) -> seconds``; ``None`` means the dense layer.
LatencyFn = Callable[[int, int, "int | None", int], float]


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """What a latency profile depends on; a profile is reused only when all of it matches."""
    device = torch.device(device)
    fp = {
        "speed_model": SPEED_MODEL_VERSION,
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "device": str(device.type),
        "dtype": str(dtype).replace("torch.", ""),
    }
    if device.type == "cuda":
        fp["gpu"] = torch.cuda.get_device_name(device)
    return fp


def fingerprint_hash(fp: Mapping) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def shape_key(m: int, n: int) -> str:
    return f"{m}x{n}"


def module_latency(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   repeats: dict[str, int] | None = None, seed: int = 0,
                   cold_bytes: int = 64 * 2**20) -> LatencyFn:
    """The real timer: median seconds of ``nn.Linear`` vs ``LowRankLinear`` on random input.

    Decode-sized calls (``tokens <= 16``) are memory-bound in a real model: every weight is read
    from DRAM once per token. A single small layer called in a loop would sit in the CPU cache and
    hide that, so these calls cycle through enough copies of the layer (views into one random
    buffer of ``cold_bytes``) and report the time per call. ``repeats`` per token count (default:
    9 for decode, 5 for prefill), two warm-up calls each.
    """
    from ...evaluation.latency import median_seconds

    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)

    elsize = torch.empty((), dtype=dtype).element_size()
    pool_len = max(cold_bytes // elsize, 1)
    pool: list[torch.Tensor] = []  # one random buffer; layer weights are views into it (no init cost)

    def take(offset: int, shape: tuple[int, int]) -> tuple[nn.Parameter, int]:
        size = shape[0] * shape[1]
        if offset + size > pool[0].numel():
            offset = 0
        return nn.Parameter(pool[0][offset: offset + size].view(shape), requires_grad=False), offset + size

    def make(m: int, n: int, rank: int | None, offset: int) -> tuple[nn.Module, int]:
        if not pool:
            pool.append(torch.randn(pool_len, generator=g).to(device=device, dtype=dtype))
        with torch.device("meta"):
            layer = nn.Linear(n, m, bias=False) if rank is None else LowRankLinear(n, m, rank, bias=False)
        if rank is None:
            layer.weight, offset = take(offset, (m, n))
        else:
            layer.A.weight, offset = take(offset, (rank, n))
            layer.B.weight, offset = take(offset, (m, rank))
        return layer.eval(), offset

    @torch.inference_mode()
    def latency(m: int, n: int, rank: int | None, tokens: int) -> float:
        x = torch.randn(tokens, n, generator=g).to(device=device, dtype=dtype)
        reps = (repeats or {}).get(str(tokens), 9 if tokens <= 16 else 5)
        copies = 1
        if tokens <= 16 and device.type == "cpu":
            per_layer = (m * n if rank is None else rank * (m + n)) * torch.empty((), dtype=dtype).element_size()
            copies = max(1, min(256, -(-cold_bytes // per_layer)))
        layers, offset = [], 0
        for _ in range(copies):
            layer, offset = make(m, n, rank, offset)
            layers.append(layer)

        def run():
            for layer in layers:
                layer(x)

        return median_seconds(run, repeats=reps, warmup=2, device=device) / copies

    return latency


def break_even_rank(m: int, n: int, tokens: int, latency: LatencyFn, margin: float = 1.0) -> int:
    """Largest ``k <= k_max(m, n)`` with ``latency(k) < margin * latency(dense)``; 0 if none.

    Bisection assuming latency is non-decreasing in ``k``.
    """
    kmax = max_saving_rank(m, n)
    if kmax < 1:
        return 0
    limit = margin * latency(m, n, None, tokens)
    faster = lambda k: latency(m, n, k, tokens) < limit  # noqa: E731
    if faster(kmax):
        return kmax
    lo, hi = 0, kmax  # invariant: lo is faster (or 0), hi is not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if faster(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class SpeedProfile:
    """Break-even ranks per shape and regime, measured on the machine described by ``fingerprint``."""

    fingerprint: dict
    break_even: dict[str, dict[str, int]] = field(default_factory=dict)

    def cap(self, m: int, n: int, regimes: Iterable[str] | None = None) -> int:
        """Largest rank faster than dense in every regime (``min`` over regimes); 0 = keep dense."""
        entry = self.break_even.get(shape_key(m, n))
        if entry is None:
            raise ConfigError(f"speed profile has no entry for shape {m}x{n}; measure it with ensure_shapes")
        names = list(regimes) if regimes is not None else list(entry)
        return min(int(entry[r]) for r in names)

    def to_json(self) -> dict:
        return {"fingerprint": self.fingerprint, "break_even": self.break_even}

    @classmethod
    def from_json(cls, obj: Mapping) -> "SpeedProfile":
        try:
            return cls(dict(obj["fingerprint"]),
                       {k: {r: int(v) for r, v in e.items()} for k, e in obj["break_even"].items()})
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ConfigError(f"not a rankwise speed profile ({e}); expected keys fingerprint, break_even") from e

    def ensure_shapes(self, shapes: Iterable[tuple[int, int]], latency: LatencyFn,
                      regimes: Mapping[str, int] = REGIMES) -> int:
        """Measure every missing (shape, regime); returns how many were measured."""
        measured = 0
        for m, n in sorted(set(shapes)):
            entry = self.break_even.setdefault(shape_key(m, n), {})
            for name, tokens in regimes.items():
                if name not in entry:
                    entry[name] = break_even_rank(m, n, tokens, latency)
                    measured += 1
        return measured


def default_profile_path(fp: Mapping) -> Path:
    return cache_dir() / "speed" / f"{fingerprint_hash(fp)}.json"


def load_speed_profile(
    shapes: Sequence[tuple[int, int]],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    profile_file: str | Path | None = None,
    latency: LatencyFn | None = None,
    regimes: Mapping[str, int] = REGIMES,
    use_cache: bool = True,
) -> SpeedProfile:
    """The speed profile for ``shapes`` on this machine: cached entries reused, the rest measured.

    ``profile_file`` (user-supplied) is read instead of the machine cache; either is used only if its
    fingerprint equals this machine's, otherwise everything is re-measured (with a warning). New
    measurements are written to the machine cache (a user file is never modified).
    ``latency`` replaces the real timer (tests inject a deterministic one).
    """
    fp = fingerprint(device, dtype)
    cache_path = default_profile_path(fp)
    source = Path(profile_file) if profile_file is not None else (cache_path if use_cache else None)
    profile = SpeedProfile(fp)
    if source is not None and source.is_file():
        try:
            loaded = SpeedProfile.from_json(json.loads(source.read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"speed profile {source} is not valid JSON ({e}); delete it or pass another") from e
        if loaded.fingerprint == fp:
            profile = loaded
        else:
            diff = sorted(k for k in set(fp) | set(loaded.fingerprint) if fp.get(k) != loaded.fingerprint.get(k))
            log.warning("speed profile %s was measured on another setup (differs in %s); re-measuring",
                        source, ", ".join(diff))
    elif profile_file is not None:
        raise ConfigError(f"speed profile file {profile_file} does not exist; omit --speed-profile to measure")
    measured = profile.ensure_shapes(shapes, latency or module_latency(device, dtype), regimes)
    if measured and use_cache:
        write_json(cache_path, profile.to_json())
    return profile
