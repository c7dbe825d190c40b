"""Per-layer input statistics accumulated with forward pre-hooks, summed in float64.

For the inputs ``x_t`` (rows of the layer input flattened to (tokens, in); GPT-2 ``Conv1D`` takes
(..., in) too) a layer sees over the calibration windows:

* ``cov     = sum_t x_t x_t^T``   (in, in)  -- ``C = X X^T`` of the whitening objective ``||(W-W')X||_F``
* ``abs_sum = sum_t |x_t|``       (in,)     -- ASVD's activation scale ``mean |x_j|``
* ``sq_sum  = sum_t x_t * x_t``   (in,)     -- equals ``diag(cov)``; kept when ``cov`` is skipped
* ``n``                                      -- number of tokens

Precision: each batch's products and reductions run in float32 (float64 for a float64 model), as
the official SVD-LLM and GPTQ accumulate their ``X X^T``, and are added to float64 sums, so the
error is that of one batch's float32 product (relative ~1e-6 of ``|X_b|^2``), not of a float32 sum
over the whole calibration set. A float32 product is twice as fast as a float64 one on a CPU and
needs no float64 copy of the activations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, NumericalError
from ..models.surgery import get_modules


BatchSums = tuple  # (cov | None, abs_sum, sq_sum, n) of one batch

#: Statistic kinds a compression method can ask for.
ABS_MEAN, COV, FISHER = "abs_mean", "cov", "fisher"


#: Bytes of one transient of the statistics: a row chunk of a batch converted to the compute dtype
#: (only when the activations are not in it already: bfloat16 / float16 models), a row tile of a
#: product. 2 MB keeps the refit's low-memory peak under 600 MB on SmolLM2.
CHUNK_BYTES = 2 * 2**20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the statistics of activations in ``dtype`` are computed in (then summed in float64):
    float64 for float64 activations, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


#: Most rows one float32 product sums before it is added to the float64 sums (bounds its rounding
#: error, relative ~ sqrt(rows) * 6e-8, whatever the batch size).
PRODUCT_ROWS = 4096


def row_chunks(x: torch.Tensor, device: torch.device | str | None = None):
    """The rows of ``x (..., in)`` flattened to (tokens, in), in :func:`compute_dtype` on ``device``, in
    chunks of at most :data:`PRODUCT_ROWS` rows: views of ``x`` when it is there already (a float32
    model on the compute device), else copies of at most :data:`CHUNK_BYTES` (a batch is never
    copied whole)."""
    flat = x.detach().reshape(-1, x.shape[-1])
    dev = torch.device(device) if device is not None else flat.device
    dtype = compute_dtype(flat.dtype)
    step = PRODUCT_ROWS
    if flat.dtype != dtype or flat.device != dev:
        step = min(step, max(256, CHUNK_BYTES // (dtype.itemsize * max(1, flat.shape[1]))))
    for a in range(0, flat.shape[0], step):
        yield flat[a: a + step].to(device=dev, dtype=dtype)


def add_products_(out: torch.Tensor, a: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """``out += a^T c`` (``out`` (n1, n2) float64, ``a`` (T, n1), ``c`` (T, n2) rows in the compute
    dtype); ``c=None``: ``out += a^T a``, of which only the upper triangle is kept (the row tiles'
    products right of their diagonal, about 60 % of the flops) and mirrored, so ``out`` stays exactly
    symmetric. Each row tile of the product (at most :data:`CHUNK_BYTES`) is one matrix product in
    ``a``'s dtype, added in float64."""
    sym = c is None
    b = a if sym else c
    n1, n2 = out.shape
    step = max(64, CHUNK_BYTES // (b.element_size() * max(1, n2)))
    if sym:
        step = min(step, max(64, -(-n1 // 4)))
    for i in range(0, n1, step):
        j = i if sym else 0
        out[i: i + step, j:].add_(a[:, i: i + step].T @ b[:, j:])
    if sym:
        for i in range(0, n1, step):
            d = out[i: i + step, i: i + step]
            d.copy_(d.triu() + d.triu(1).T)
            out[i + step:, i: i + step] = out[i: i + step, i + step:].T
    return out


def all_finite(x: torch.Tensor) -> bool:
    """Whether ``x`` holds no nan or inf: one min/max reduction (nan propagates), no boolean copy."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x.detach())
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def batch_sums(x: torch.Tensor, in_features: int, cov: bool = True,
               device: torch.device | str | None = None) -> BatchSums:
    """``(sum_t x_t x_t^T | None, sum_t |x_t|, sum_t x_t^2, tokens)`` of a batch ``x (..., in)``, float64."""
    if x.shape[-1] != in_features:
        raise ConfigError(f"input has {x.shape[-1]} features, statistics expect {in_features}")
    st = InputStats.zeros(in_features, device=device or x.device, cov=cov)
    st.add_(x)
    return st.cov, st.abs_sum, st.sq_sum, st.n


@dataclass
class InputStats:
    """Sums over the ``n`` input vectors a layer saw; see the module docstring.

    ``cov`` is ``None`` when the accumulator was asked not to collect it.
    """

    cov: torch.Tensor | None
    abs_sum: torch.Tensor
    sq_sum: torch.Tensor
    n: int = 0

    @classmethod
    def zeros(cls, in_features: int, device: torch.device | str | None = None, cov: bool = True) -> "InputStats":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(in_features, in_features) if cov else None, z(in_features), z(in_features), 0)

    @property
    def in_features(self) -> int:
        return int(self.abs_sum.shape[0])

    def add_(self, x: torch.Tensor) -> "InputStats":
        """Accumulate a batch of inputs ``x`` of shape (..., in) (in place; returns self): products and
        reductions in the compute dtype (see the module doc) added straight into the float64 sums."""
        if x.shape[-1] != self.in_features:
            raise ConfigError(f"input has {x.shape[-1]} features, statistics expect {self.in_features}")
        for c in row_chunks(x, self.abs_sum.device):
            if self.cov is not None:
                add_products_(self.cov, c)
            self.abs_sum.add_(torch.linalg.vector_norm(c, 1, dim=0))  # reductions: no chunk-sized temporary
            self.sq_sum.add_(torch.linalg.vector_norm(c, 2, dim=0).square_())
            self.n += int(c.shape[0])
        return self

    def add_sums(self, sums: "BatchSums") -> "InputStats":
        """Add precomputed :func:`batch_sums` (lets layers that read the same tensor share the work)."""
        cov, abs_sum, sq_sum, n = sums
        if self.cov is not None:
            if cov is None:
                raise ConfigError("these statistics need the covariance but the batch sums lack it")
            self.cov.add_(cov)
        self.abs_sum.add_(abs_sum)
        self.sq_sum.add_(sq_sum)
        self.n += n
        return self

    def merge(self, other: "InputStats") -> "InputStats":
        """New statistics over the union of both token sets."""
        if other.in_features != self.in_features:
            raise ConfigError(f"cannot merge statistics of {self.in_features} and {other.in_features} features")
        cov = None
        if self.cov is not None and other.cov is not None:
            cov = self.cov + other.cov.to(self.cov.device)
        return InputStats(cov, self.abs_sum + other.abs_sum.to(self.abs_sum.device),
                          self.sq_sum + other.sq_sum.to(self.sq_sum.device), self.n + other.n)

    def _need_tokens(self) -> None:
        if self.n == 0:
            raise NumericalError("no calibration tokens reached this layer; statistics are empty")

    @property
    def mean_abs(self) -> torch.Tensor:
        """``mean_t |x_t|`` per input feature (in,), float64."""
        self._need_tokens()
        return self.abs_sum / self.n

    @property
    def mean_sq(self) -> torch.Tensor:
        """``mean_t x_t^2`` per input feature (in,), float64."""
        self._need_tokens()
        return self.sq_sum / self.n

    @property
    def covariance_mean(self) -> torch.Tensor:
        """``(1/n) sum_t x_t x_t^T`` (uncentered second moment), float64."""
        self._need_tokens()
        if self.cov is None:
            raise ConfigError("these statistics were collected without the covariance (cov=False)")
        return self.cov / self.n


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError("linear layer called without a tensor input")


class StatsAccumulator:
    """Context manager: forward pre-hooks on ``modules`` that add each input to ``self.stats[name]``.

    >>> with StatsAccumulator({"l": layer}) as acc:
    ...     model(ids)
    >>> acc.stats["l"].cov

    Hooks are removed on exit (also on error). Non-finite inputs raise :class:`NumericalError`
    naming the layer. Layers called one after another on the very same (unmodified) tensor, as
    q/k/v and gate/up are, share one computation of the batch sums; with ``share`` they share one
    :class:`InputStats` object too (``stats["k"] is stats["q"]``: a third of the memory for q/k/v).
    ``cov=False`` skips the (in, in) covariance (ASVD needs only ``abs_sum``).
    """

    def __init__(self, modules: Mapping[str, nn.Module], cov: bool = True,
                 device: torch.device | str | None = None, share: bool = False) -> None:
        self.modules = dict(modules)
        self.cov = cov
        self.device = device
        self.share = share
        self.stats: dict[str, InputStats] = {}
        self.leader: dict[str, str] = {}  # share: layer -> the layer whose statistics it shares
        self._handles: list = []
        self._last: tuple | None = None

    def _shared_hook(self, name: str, x: torch.Tensor) -> None:
        if name in self.leader:  # its leader already added this batch
            return
        last = self._last
        if name not in self.stats and last is not None and last[0] is x and last[1] == x._version:
            self.leader[name] = last[2]
            self.stats[name] = self.stats[last[2]]
            return
        st = self.stats.get(name)
        if st is None:
            st = self.stats[name] = InputStats.zeros(x.shape[-1], device=self.device or x.device, cov=self.cov)
        if not all_finite(x):
            raise NumericalError(f"non-finite activations (nan/inf) entering layer {name!r} during calibration; "
                                 "check the model weights or run in float32")
        st.add_(x)
        self._last = (x, x._version, name)

    def _hook(self, name: str):
        def hook(module, args, kwargs):
            x = first_tensor(args, kwargs)
            if self.share:
                return self._shared_hook(name, x)
            st = self.stats.get(name)
            if st is None:
                st = InputStats.zeros(x.shape[-1], device=self.device or x.device, cov=self.cov)
                self.stats[name] = st
            last = self._last
            if last is not None and last[0] is x and last[1] == x._version and last[2] == st.abs_sum.device:
                sums = last[3]  # q/k/v (gate/up) read the very same tensor: reuse its sums
            else:
                if not all_finite(x):
                    raise NumericalError(
                        f"non-finite activations (nan/inf) entering layer {name!r} during calibration; "
                        "check the model weights or run in float32"
                    )
                sums = batch_sums(x, st.in_features, self.cov, st.abs_sum.device)
                # holding x keeps its memory from being reused, so identity + version is a safe key
                self._last = (x, x._version, st.abs_sum.device, sums)
            st.add_sums(sums)
        return hook

    def __enter__(self) -> "StatsAccumulator":
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None

    def __exit__(self, *exc) -> None:
        self.remove()


def run_model(model: nn.Module, ids: torch.Tensor):
    """One forward pass on token ids: HF models get ``use_cache=False``, plain modules ``model(ids)``."""
    if hasattr(model, "config"):
        return model(input_ids=ids, use_cache=False)
    return model(ids)


def _check_windows(windows: torch.Tensor, batch_size: int) -> None:
    if windows.ndim != 2 or windows.shape[0] < 1:
        raise ConfigError(f"calibration windows must be a (n, L) LongTensor with n >= 1, got {tuple(windows.shape)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")


@torch.no_grad()
def collect_input_stats(model: nn.Module, windows: torch.Tensor, names: Sequence[str], batch_size: int = 4,
                        progress: bool = False, cov: bool = True) -> dict[str, InputStats]:
    """Run the calibration ``windows`` (n, L) through ``model`` and return ``{name: InputStats}``.

    ``names`` are qualified module names (as from ``rankwise.models.surgery.find_linears``).
    The model runs in eval mode (restored afterwards).
    """
    _check_windows(windows, batch_size)
    modules = get_modules(model, names)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with StatsAccumulator(modules, cov=cov) as acc:
            for i in tqdm(range(0, windows.shape[0], batch_size), desc="calibration", disable=not progress,
                          leave=False):
                run_model(model, windows[i: i + batch_size].to(device))
    finally:
        model.train(was_training)
    missing = [n for n in names if n not in acc.stats]
    if missing:
        raise NumericalError(f"layers never called during calibration: {missing[:5]}")
    return {n: acc.stats[n] for n in names}


@dataclass
class LayerStats:
    """What calibration gathered for one layer: input sums (:class:`InputStats`), the empirical
    Fisher diagonal ``F`` (out, in), and (sequential refit) the cross moment ``M = X X'^T`` between
    the dense model's inputs ``X`` and the compressed prefix's inputs ``X'``; all float64.
    ``ridge``: relative ridge of the refit's solve (see :meth:`target`)."""

    inputs: InputStats | None = None
    fisher: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    ridge: float | None = None

    def covariance(self, name: str = "layer") -> torch.Tensor:
        """``C = sum_t x_t x_t^T`` (in, in), float64."""
        if self.inputs is None or self.inputs.cov is None:
            raise ConfigError(f"{name}: this method needs the input covariance, which was not collected")
        return self.inputs.cov

    def target(self, W: torch.Tensor) -> torch.Tensor:
        """The matrix to fit under :meth:`covariance`: ``W``, or with a cross moment the corrected
        target ``T = (W M + lam W)(C' + lam I)^-1`` (see :func:`rankwise.linalg.refit.cross_target`)."""
        if self.cross is None:
            return W
        from ..linalg.refit import cross_target

        return cross_target(W, self.covariance(), self.cross, self.ridge)
