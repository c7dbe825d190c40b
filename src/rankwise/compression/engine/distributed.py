"""Data and layer parallel compression on ``torch.distributed`` (no scheduler of our own).

Inside an initialized process group (``torchrun --nproc-per-node N -m rankwise compress ...`` sets
one up from its environment, :func:`init_from_env`; API users call ``init_process_group``
themselves), every rank runs the same engine and:

* **data parallel**: calibration batch ``b`` (global index, the same batches as one process) is run
  by rank ``b % world`` only; each rank caches the hidden states of its own batches, and the
  per-layer sums (``sum x x^T``, ``sum |x|``, ``sum x^2``, ``n``, the refit's cross moments, in
  float64) are added across ranks with ``all_reduce``. The refit's held-out batches are the same
  logical windows as in one process (bucketed by global index before the reduction);
* **layer parallel**: each layer of a group is fitted by one rank (:meth:`Comm.owners`, largest
  first onto the least loaded rank), and its fitted layer (the layer's description, ``fit_info``
  and state dict as raw bytes; no pickle) is broadcast to every rank, which puts it in its model;
* only rank 0 writes, atomically (the caller checks :attr:`Comm.is_main`).

The result equals the single-process one up to the order of the float64 additions of the
statistics (the same batches, the same fits, the same ridge choice). Every rank runs each step that
can fail on bad input inside :meth:`Comm.agreed`, which raises the same error on every rank; the
arguments are compared first (:meth:`Comm.check_same`).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import torch
from torch import nn

from ... import errors
from ...errors import ConfigError, RankwiseError
from ...files import cleanup_running
from ...structures.base import StructuredLinear, build_layer

T = TypeVar("T")


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """Whether a default process group with more than one rank is initialized."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def launched_world() -> int:
    """``WORLD_SIZE`` set by ``torchrun`` (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def rank_device(spec: str) -> str:
    """The per-rank device of ``--device``: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if launched_world() > 1 and str(spec) == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return str(spec)


def init_from_env(device: str = "cpu") -> bool:
    """Initialize the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``...): gloo for ``--device cpu``, nccl for CUDA. Returns whether it initialized one
    (``False`` outside torchrun, or when a group already exists)."""
    dist = _dist()
    if launched_world() <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    dev = torch.device(rank_device(device))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda under torchrun, but no CUDA GPU is visible; use --device cpu (gloo)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"rank {os.environ.get('RANK')} would use {dev}, but only {torch.cuda.device_count()} "
                              "GPU(s) are visible: start at most one process per GPU")
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return True


def shutdown(sync: bool = False) -> None:
    """Destroy the default process group if one is initialized. ``sync`` (a run that succeeded on every
    rank): a barrier first, so that no rank tears its gloo connections down while another still uses
    them (a rank that did so could abort at exit, "terminate called without an active exception").
    After a failure there is no barrier: a dead rank would never reach it."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()


def leave(code: int = 0) -> None:
    """End this rank's process now, once its process group is destroyed: flush the output streams and
    the logging handlers, then ``os._exit(code)``, skipping the interpreter's teardown. There, after a
    run that succeeded and destroyed its group, a gloo rank aborted about once in 40 runs here
    ("terminate called without an active exception", SIGABRT: a C++ thread of torch's gloo backend
    destroyed at exit), which torchrun reports as a failed run."""
    import logging
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


class Comm:
    """The ranks of one compression run; ``world == 1`` makes every method a no-op."""

    def __init__(self, world: int = 1, rank: int = 0, device: torch.device | None = None) -> None:
        self.world, self.rank = int(world), int(rank)
        self.device = device or torch.device("cpu")  # where collective tensors live (cuda for nccl)

    @classmethod
    def current(cls) -> "Comm":
        """The default process group's ranks, or a single-process ``Comm``."""
        if not is_distributed():
            return cls()
        dist = _dist()
        backend = str(dist.get_backend()).lower()
        device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        return cls(dist.get_world_size(), dist.get_rank(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    # -- data parallel -----------------------------------------------------------------------
    def batches(self, n: int) -> list[int]:
        """Global indices of the calibration batches this rank runs (``b % world == rank``)."""
        if self.active and n < self.world:
            raise ConfigError(f"{self.world} ranks need at least {self.world} calibration batches, got {n} "
                              "(windows / batch size): raise --calib-windows or start fewer processes")
        return list(range(self.rank, n, self.world))

    def sum_(self, tensors: Iterable[torch.Tensor]) -> None:
        """``all_reduce(SUM)`` of every tensor in place, one call per tensor (no flat copy: a 7B block's
        covariances are over a GB)."""
        if not self.active:
            return
        dist = _dist()
        for t in tensors:
            x = t if t.device == self.device else t.to(self.device)
            dist.all_reduce(x)
            if x is not t:
                t.copy_(x)

    # -- agreement ---------------------------------------------------------------------------
    def gather_json(self, obj: Any) -> list[Any]:
        """``obj`` (JSON-able) of every rank, in rank order."""
        if not self.active:
            return [obj]
        dist = _dist()
        raw = torch.tensor(list(json.dumps(obj, sort_keys=True, default=str).encode()), dtype=torch.uint8)
        n = torch.tensor([raw.numel()], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        top = int(max(int(s) for s in sizes))
        buf = torch.zeros(top, dtype=torch.uint8)
        buf[: raw.numel()] = raw
        bufs = [torch.zeros(top, dtype=torch.uint8, device=self.device) for _ in range(self.world)]
        dist.all_gather(bufs, buf.to(self.device))
        return [json.loads(bytes(b[: int(s)].cpu().tolist()).decode()) for b, s in zip(bufs, sizes)]

    def agreed(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on every rank; if it raised on any rank, every rank raises the first
        failing rank's error (same class and message). Without a process group, just ``fn(...)``."""
        if not self.active:
            return fn(*args, **kwargs)
        result, failure = None, None
        try:
            result = fn(*args, **kwargs)
        except RankwiseError as e:
            failure = [type(e).__name__, str(e)]
        except Exception as e:  # a bug or an environment error on one rank: still stop every rank
            failure = ["RuntimeError", f"{type(e).__name__}: {e}"]
        seen = self.gather_json(failure)
        for r, f in enumerate(seen):
            if f is not None:
                cls = getattr(errors, f[0], None)
                if not (isinstance(cls, type) and issubclass(cls, RankwiseError)):
                    cls = RuntimeError
                raise cls(f"rank {r} of {self.world}: {f[1]}")
        return result  # type: ignore[return-value]

    def check_same(self, what: Mapping[str, Any]) -> None:
        """ConfigError on every rank, with the same message, unless every rank passes equal ``what``."""
        if not self.active:
            return
        seen = [_flatten(w) for w in self.gather_json(dict(what))]
        for r, other in enumerate(seen[1:], start=1):
            diff = sorted(k for k in set(seen[0]) | set(other) if seen[0].get(k) != other.get(k))
            if diff:
                k = diff[0]
                raise ConfigError(f"the {self.world} ranks disagree on the arguments: rank {r} has {k}="
                                  f"{_short(other.get(k))} where rank 0 has {_short(seen[0].get(k))}"
                                  f"{f' (and {len(diff) - 1} more: {diff[1:4]})' if len(diff) > 1 else ''}; "
                                  "start every rank with the same command, model and calibration data")

    # -- layer parallel ----------------------------------------------------------------------
    def owners(self, names: Sequence[str], cost: Mapping[str, float], joint: bool = False, turn: int = 0
               ) -> dict[str, int]:
        """Which rank fits each layer: largest ``cost`` first onto the least loaded rank (ties: lowest
        rank); ``joint`` (layers fitted together) puts them all on rank ``turn % world``."""
        if joint or not self.active:
            r = turn % self.world
            return {n: r for n in names}
        load = [0.0] * self.world
        out: dict[str, int] = {}
        for n in sorted(names, key=lambda n: (-float(cost[n]), list(names).index(n))):
            r = min(range(self.world), key=lambda i: (load[i], i))
            out[n] = r
            load[r] += float(cost[n])
        return out

    def share_layers(self, names: Sequence[str], owners: Mapping[str, int],
                     mine: Mapping[str, StructuredLinear], device: torch.device) -> dict[str, StructuredLinear]:
        """Every layer of ``names``, fitted on its owner (``mine`` holds this rank's): each owner
        broadcasts its layers' descriptions and state dicts (tensors shared between its layers stay
        shared); the others rebuild them on ``device``."""
        if not self.active:
            return dict(mine)
        out: dict[str, StructuredLinear] = {}
        for src in sorted({owners[n] for n in names}):
            group = [n for n in names if owners[n] == src]
            if src == self.rank:
                self._send({n: mine[n] for n in group})
                out.update({n: mine[n] for n in group})
            else:
                out.update(self._receive(src, device))
        return out

    def _broadcast_bytes(self, raw: torch.Tensor | None, src: int) -> torch.Tensor:
        dist = _dist()
        n = torch.tensor([0 if raw is None else raw.numel()], dtype=torch.int64, device=self.device)
        dist.broadcast(n, src)
        buf = raw.to(self.device) if raw is not None else torch.empty(int(n), dtype=torch.uint8, device=self.device)
        dist.broadcast(buf, src)
        return buf

    def _send(self, layers: Mapping[str, StructuredLinear]) -> None:
        header: dict[str, Any] = {}
        chunks: list[torch.Tensor] = []
        seen: dict[tuple, str] = {}
        offset = 0
        for name, layer in layers.items():
            entries = []
            for key, t in layer.state_dict().items():
                full = f"{name}.{key}"
                ident = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
                if ident is not None and ident in seen:
                    entries.append([key, "alias", seen[ident]])
                    continue
                if ident is not None:
                    seen[ident] = full
                data = t.detach().contiguous().reshape(-1).view(torch.uint8).to("cpu")
                pad = -offset % 8
                if pad:
                    chunks.append(torch.zeros(pad, dtype=torch.uint8))
                    offset += pad
                entries.append([key, str(t.dtype).replace("torch.", ""), list(t.shape), offset])
                chunks.append(data)
                offset += data.numel()
            info = {k: v for k, v in (getattr(layer, "fit_info", None) or {}).items()
                    if isinstance(v, (int, float, str, bool)) or v is None}
            header[name] = {"desc": layer.describe(), "tensors": entries, "fit_info": info}
        raw = torch.tensor(list(json.dumps(header).encode()), dtype=torch.uint8)
        self._broadcast_bytes(raw, self.rank)
        self._broadcast_bytes(torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8), self.rank)

    def _receive(self, src: int, device: torch.device) -> dict[str, StructuredLinear]:
        header = json.loads(bytes(self._broadcast_bytes(None, src).cpu().tolist()).decode())
        data = self._broadcast_bytes(None, src).cpu()
        out: dict[str, StructuredLinear] = {}
        by_key: dict[str, torch.Tensor] = {}
        for name, h in header.items():
            layer = build_layer(h["desc"], device="meta")
            state = {}
            for entry in h["tensors"]:
                if entry[1] == "alias":
                    state[entry[0]] = by_key[entry[2]]
                    continue
                key, dt, shape, off = entry
                dtype = getattr(torch, dt)
                count = 1
                for s in shape:
                    count *= int(s)
                nbytes = count * torch.empty((), dtype=dtype).element_size()
                t = data[off: off + nbytes].view(dtype).view(shape).to(device).clone()
                state[key] = by_key[f"{name}.{key}"] = t
            layer.load_state_dict(state, strict=True, assign=True)
            layer.fit_info = dict(h["fit_info"])
            out[name] = layer
        return out


def _flatten(d: Mapping[str, Any], head: str = "") -> dict[str, Any]:
    """``{"config": {"ratio": 0.4}}`` -> ``{"config.ratio": 0.4}`` (names the differing option)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{head}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Inside (main thread only), a SIGTERM raises ``SystemExit(143)`` once, so that the atomic output
    of a rank stopped by its launcher (torchrun and torch.multiprocessing stop the survivors of a
    dead rank with SIGTERM) is removed on the way out. The previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: let the cleanup finish
        if cleanup_running():  # already unwinding an error and removing the output: let it finish
            return
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _short(v: Any, n: int = 80) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def module_fingerprint(model: nn.Module) -> dict[str, Any]:
    """A cheap identity of a model in memory: class, parameter count, float64 sum of every parameter."""
    total, count = 0.0, 0
    with torch.no_grad():
        for p in model.parameters():
            if p.is_meta:
                continue
            count += p.numel()
            if p.is_floating_point():
                total += float(p.sum(dtype=torch.float64))
    return {"class": type(model).__name__, "params": count, "sum": repr(total)}


__all__ = ["Comm", "init_from_env", "is_distributed", "launched_world", "module_fingerprint", "rank_device",
           "shutdown", "sigterm_as_exit"]
