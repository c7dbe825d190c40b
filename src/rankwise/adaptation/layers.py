"""Adapter layers: ``y = base(x) + Delta W x`` with a trainable low-dimensional ``Delta W``.

Every adapter wraps the original ``base`` module (``nn.Linear``, GPT-2 ``Conv1D`` or a rankwise
``LowRankLinear``: the adapter then acts on the whole layer's input and output) and defines

* ``delta()``   -> the dense update ``Delta W`` (out, in) in float32,
* ``factors()`` -> ``(L, R)`` with ``L @ R = Delta W`` (so a merge into a factorized base stays exact),
* ``delta_forward(x)`` -> ``x Delta W^T`` computed through the factors (never the dense matrix).

Adapter tensors are kept in float32 whatever the base dtype; inputs are cast to float32 for the
adapter path and the result back to the base dtype. Parametrizations (s = scaling):

* :class:`LoraAdapter`   ``Delta W = s B A``            A (r, in), B (out, r) trained
* :class:`SBAdapter`     ``Delta W = s B R A``          only R (r, r) trained (LoRA-XS / LoRA-SB)
* :class:`BMAAdapter`    ``Delta W = s B M A``          B, M, A trained, or only M (NLoRA / IntTune)
* :class:`LDUAdapter`    ``Delta W = L diag(d) U``      only d (r,) trained (LoLDU)
* :class:`SaltAdapter`   ``U_r diag(sigma (a - 1) + b) V_r^T + s (I - U_r U_r^T) B A (I - V_r V_r^T)``
* :class:`SingAdapter`   ``Delta W = s u(t) A_m A_n^T``  one A (max(m, n), r) trained (SingLoRA)
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..models.surgery import Conv1D, linear_weight
from ..structures.base import StructuredLinear
from ..structures.lowrank import LowRankLinear


# ---- the frozen base --------------------------------------------------------------------------

def base_shape(base: nn.Module) -> tuple[int, int]:
    if isinstance(base, StructuredLinear):
        return base.out_features, base.in_features
    w = linear_weight(base)
    return int(w.shape[0]), int(w.shape[1])


def base_dense(base: nn.Module) -> torch.Tensor:
    """The base layer's dense weight (out, in) as a float32 copy."""
    with torch.no_grad():
        if isinstance(base, StructuredLinear):
            return base.dense().float()
        return linear_weight(base).detach().float().clone()


@torch.no_grad()
def add_to_base(base: nn.Module, delta: torch.Tensor, alpha: float = 1.0) -> None:
    """``W_base <- W_base + alpha * delta`` in place.

    A ``LowRankLinear`` base of rank k is refitted at rank k by SVD; if ``W_base + alpha delta`` does not
    have rank <= k the change cannot be represented and a ConfigError says so.
    """
    if isinstance(base, LowRankLinear):
        target = base.dense().double() + alpha * delta.double()
        k = base.rank
        U, S, Vh = torch.linalg.svd(target, full_matrices=False)
        tail = float(S[k:].norm()) if S.numel() > k else 0.0
        if tail > 1e-5 * max(float(S.norm()), 1e-30):
            raise ConfigError(
                f"this init changes a factorized (LowRankLinear rank {k}) layer into a matrix of higher rank; "
                "on compressed models use an init that leaves the base unchanged (lora, eva, salt, singlora) "
                "or one whose residual keeps the rank (pissa, milora, olora)")
        sq = S[:k].sqrt()
        base.B.weight.copy_((U[:, :k] * sq).to(base.B.weight.dtype))
        base.A.weight.copy_((sq[:, None] * Vh[:k]).to(base.A.weight.dtype))
        return
    if isinstance(base, StructuredLinear):
        raise ConfigError(f"cannot add an update to a {base.kind} layer in place (its stored form cannot hold it); "
                          "keep the adapter unmerged, or merge_and_unload (which makes the layer dense)")
    w = linear_weight(base)
    w.copy_((w.float() + alpha * delta.to(w.device).float()).to(w.dtype))


# ---- adapters ---------------------------------------------------------------------------------

class AdapterLayer(nn.Module):
    """Base class: ``forward(x) = base(x) + delta_forward(x)`` (unless merged)."""

    kind = "abstract"
    peft_compatible = False

    def __init__(self, base: nn.Module, scaling: float = 1.0) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.scaling = float(scaling)
        self.out_features, self.in_features = base_shape(base)
        self.merged = False

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def delta(self) -> torch.Tensor:
        L, R = self.factors()
        return L @ R

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        L, R = self.factors()
        return (x.float() @ R.T) @ L.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + self.delta_forward(x).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``Delta W`` into the base weight (forward unchanged up to rounding)."""
        if not self.merged:
            add_to_base(self.base, self.delta(), 1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: ``W_base <- W_base - Delta W``."""
        if self.merged:
            add_to_base(self.base, self.delta(), -1.0)
            self.merged = False

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("base.") and p.requires_grad]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Adapter tensors (parameters and buffers, not the base) by local name."""
        out = {n: p.detach() for n, p in self.named_parameters() if not n.startswith("base.")}
        out.update({n: b.detach() for n, b in self.named_buffers() if not n.startswith("base.")})
        return out

    def extra_repr(self) -> str:
        return f"kind={self.kind}, in={self.in_features}, out={self.out_features}, scaling={self.scaling:g}"


def _p(t: torch.Tensor, trainable: bool = True) -> nn.Parameter:
    return nn.Parameter(t.detach().float().contiguous().clone(), requires_grad=trainable)


class LoraAdapter(AdapterLayer):
    """``Delta W = s B A``: ``lora_A`` (r, in), ``lora_B`` (out, r), both trained (PEFT's LoRA layout)."""

    kind = "lora"
    peft_compatible = True

    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        super().__init__(base, scaling)
        self.lora_A = _p(A)
        self.lora_B = _p(B)

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])

    def factors(self):
        return self.scaling * self.lora_B, self.lora_A


class SBAdapter(AdapterLayer):
    """``Delta W = s B R A`` with frozen ``B`` (out, r), ``A`` (r, in) and trained ``R`` (r, r)."""

    kind = "sb"

    def __init__(self, base, A, B, R, scaling: float) -> None:
        super().__init__(base, scaling)
        self.register_buffer("A", A.detach().float().contiguous().clone())
        self.register_buffer("B", B.detach().float().contiguous().clone())
        self.R = _p(R)

    def factors(self):
        return self.scaling * (self.B @ self.R), self.A


class BMAAdapter(AdapterLayer):
    """``Delta W = s B M A``; ``train_outer=False`` freezes B and A (only the r x r core M trains)."""

    kind = "bma"

    def __init__(self, base, A, M, B, scaling: float, train_outer: bool = True) -> None:
        super().__init__(base, scaling)
        self.A = _p(A, train_outer)
        self.M = _p(M)
        self.B = _p(B, train_outer)

    def factors(self):
        return self.scaling * (self.B @ self.M), self.A


class LDUAdapter(AdapterLayer):
    """``Delta W = L diag(d) U`` with frozen L (out, r), U (r, in); only the diagonal ``d`` (r,) trains."""

    kind = "ldu"

    def __init__(self, base, L, d, U) -> None:
        super().__init__(base, 1.0)
        self.register_buffer("L", L.detach().float().contiguous().clone())
        self.register_buffer("U", U.detach().float().contiguous().clone())
        self.d = _p(d)

    def factors(self):
        return self.L * self.d, self.U


class SaltAdapter(AdapterLayer):
    """SALT: scale and shift of the top-r singular values plus a LoRA confined to the residual subspace.

    ``Delta W = U_r diag(sigma * (a - 1) + b) V_r^T + s P_U B A P_V`` with ``P_U = I - U_r U_r^T``,
    ``P_V = I - V_r V_r^T``; trained: ``a`` (r,) = 1, ``b`` (r,) = 0, ``lora_A`` (q, in), ``lora_B`` (out, q) = 0.
    """

    kind = "salt"

    def __init__(self, base, Ur, sigma, Vh, A, B, scaling: float) -> None:
        super().__init__(base, scaling)
        self.register_buffer("Ur", Ur.detach().float().contiguous().clone())
        self.register_buffer("sigma", sigma.detach().float().contiguous().clone())
        self.register_buffer("Vh", Vh.detach().float().contiguous().clone())
        r = sigma.numel()
        self.scale = nn.Parameter(torch.ones(r))
        self.shift = nn.Parameter(torch.zeros(r))
        self.lora_A = _p(A)
        self.lora_B = _p(B)

    def factors(self):
        top = self.sigma * (self.scale - 1.0) + self.shift
        Bp = self.lora_B - self.Ur @ (self.Ur.T @ self.lora_B)
        Ap = self.lora_A - (self.lora_A @ self.Vh.T) @ self.Vh
        return (torch.cat([self.Ur * top, self.scaling * Bp], dim=1),
                torch.cat([self.Vh, Ap], dim=0))


class SingAdapter(AdapterLayer):
    """SingLoRA: ``Delta W = s u(t) A[:out] A[:in]^T`` with one trained ``A`` (max(out, in), r).

    Square layers get the symmetric ``A A^T``; a non-square layer uses the first ``out`` and ``in``
    rows of the same ``A`` (SingLoRA's truncation rule). ``u(t) = min(t / T, 1)`` ramps the update in
    over ``T = ramp_steps`` optimizer steps, so the model equals the base at step 0.
    """

    kind = "sing"

    def __init__(self, base, A, scaling: float, ramp_steps: int) -> None:
        super().__init__(base, scaling)
        self.A = _p(A)
        self.ramp_steps = int(ramp_steps)
        self.register_buffer("ramp", torch.tensor(0.0 if ramp_steps > 0 else 1.0))

    def set_step(self, step: int) -> None:
        self.ramp.fill_(1.0 if self.ramp_steps <= 0 else min(step / self.ramp_steps, 1.0))

    def factors(self):
        return (self.scaling * self.ramp) * self.A[: self.out_features], self.A[: self.in_features].T


ADAPTER_KINDS: dict[str, type[AdapterLayer]] = {
    c.kind: c for c in (LoraAdapter, SBAdapter, BMAAdapter, LDUAdapter, SaltAdapter, SingAdapter)
}


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """``{qualified name: adapter}`` of every adapter in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def is_conv1d(module: nn.Module) -> bool:
    return bool(Conv1D) and isinstance(module, Conv1D)
