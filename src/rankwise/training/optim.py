"""``ProjectedAdamW``: AdamW whose 2-D parameters in a group with ``rank`` keep their Adam moments in
a rank-``r`` subspace of the gradient (GaLore, and its SVD-free / randomized / random variants).

For a projected ``W (m, n)`` with gradient ``G`` at step ``t`` (0-based), projected side chosen by
``proj_type`` (``std``: the shorter side, :func:`rankwise.linalg.projections.projection_side`):

    P_t = projector(G_t)                if t % update_proj_gap == 0, else P_{t-1}    (k, r), P^T P = I
    R_t = G_t P_t  (right)  or  P_t^T G_t  (left)                                     max(m, n) x r entries
    M_t = b1 M_{t-1} + (1 - b1) R_t,    V_t = b2 V_{t-1} + (1 - b2) R_t^2
    N_t = M_t / (sqrt(V_t) + eps)
    W  <- W - lr sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) * scale * (N_t P_t^T  or  P_t N_t)
    W  <- W (1 - lr weight_decay)

exactly as galore-torch's ``AdamW`` (moments kept across projection refreshes, bias correction in
the step size, decoupled weight decay after the update); with the ``dct`` projector, whose basis
vectors are fixed and named by their indices, each moment coordinate follows its basis vector across
a refresh (kept if the vector stays selected, zero if it is new); parameters of groups without ``rank``
follow the same rule with ``P = I``. So the Adam state of a projected ``m x n`` matrix is
``2 max(m, n) r`` numbers (``std``), plus ``P`` (``min(m, n) r``; ``dct``: ``r`` indices).

Param-group keys (galore-torch's): ``rank``, ``update_proj_gap``, ``scale``, ``proj_type``; and
``projector`` (``svd``, ``randomized``, ``dct``, ``random``), ``projector_options`` (a dict of the
projector's options), ``seed``. Everything the optimizer keeps is a tensor or a plain number/string:
``state_dict()`` loads with ``torch.load(weights_only=True)``. The projection is computed in
``step()`` from the gradient as accumulated then (several ``backward()`` calls before one step are
one gradient), and from nothing else, so data-parallel ranks holding the same (all-reduced) gradient
compute the same ``P``: random projectors draw from a seed that is a function of the group's
``seed``, the parameter's position and the step, never of a global RNG.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from ..errors import ConfigError
from ..linalg import projections as pj
from .projectors import PROJECTORS, Projector, build_options

PROJ_TYPES = ("std", "reverse_std", "left", "right")
#: Group keys that only matter for projected groups.
GROUP_KEYS = ("rank", "update_proj_gap", "scale", "proj_type", "projector", "projector_options", "seed")


class ProjectedAdamW(torch.optim.Optimizer):
    """AdamW with low-rank projected moments for the groups that set ``rank`` (module docstring).

    ``ProjectedAdamW([{"params": others}, {"params": matrices, "rank": 128, "update_proj_gap": 200,
    "scale": 0.25, "proj_type": "std"}], lr=1e-3)`` is galore-torch's recipe; add ``"projector": "dct"``
    for the SVD-free variant. :func:`rankwise.training.groups.projected_param_groups` builds the groups
    for a model's attention and MLP linears.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True,
                 update_proj_gap: int = 200, scale: float = 1.0, proj_type: str = "std", projector: str = "svd",
                 projector_options: dict[str, Any] | None = None, seed: int = 0) -> None:
        if not lr >= 0:
            raise ConfigError(f"learning rate must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ConfigError(f"betas must be in [0, 1), got {betas}")
        if not eps >= 0:
            raise ConfigError(f"eps must be >= 0, got {eps}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, projector=projector,
                        projector_options=dict(projector_options or {}), seed=seed)
        self._projectors: dict[tuple, Projector] = {}
        super().__init__(params, defaults)

    # -- groups --------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "rank" in group:
            try:
                check_group(group)
            except ConfigError:
                self.param_groups.pop()
                raise

    def _projector(self, group: dict) -> Projector:
        key = (group["projector"], tuple(sorted(group["projector_options"].items())))
        proj = self._projectors.get(key)
        if proj is None:
            proj = self._projectors[key] = PROJECTORS.get(group["projector"])(group["projector_options"])
        return proj

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader, except that integer state (the ``dct`` projector's column indices) keeps its
        dtype: torch casts every non-``step`` state tensor to a floating parameter's dtype, which would
        round indices above 256 in bfloat16."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        ints = {i: st["proj"] for i, st in state_dict["state"].items()
                if isinstance(st.get("proj"), torch.Tensor) and not st["proj"].is_floating_point()}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            if i in ints:
                self.state[p]["proj"] = ints[i].to(p.device)

    # -- step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            projected = "rank" in group
            proj = self._projector(group) if projected else None
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise ConfigError("ProjectedAdamW does not take sparse gradients; use dense embeddings")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                t = int(state["step"].item())
                if projected:
                    side = pj.projection_side(tuple(grad.shape), group["proj_type"])
                    k = pj.side_size(tuple(grad.shape), side)
                    if "proj" not in state or t % int(group["update_proj_gap"]) == 0:
                        seed = _seed(int(group["seed"]), index, t) if proj.seeded else 0
                        new = proj.compute(grad, int(group["rank"]), side, seed)
                        if proj.indexed and "exp_avg" in state:
                            _follow_columns(state, state["proj"], new, side)
                        state["proj"] = new
                    P = proj.basis(state["proj"], k, grad.dtype, grad.device)
                    grad = pj.project(grad, P, side)
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                step = t + 1
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size = step_size * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)
                update = exp_avg / denom
                if projected:
                    update = pj.project_back(update, P, side).mul_(group["scale"])
                p.add_(update, alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def _follow_columns(state: dict, old: torch.Tensor, new: torch.Tensor, side: str) -> None:
    """Moments of an indexed basis (``dct``) follow their basis columns across a refresh: the moment
    coordinate of a column kept in both index sets moves to that column's new position, a new column
    starts at zero (without this, coordinate ``i`` would carry the moments of another basis vector)."""
    pos = {int(j): i for i, j in enumerate(old.tolist())}
    src = torch.tensor([pos.get(int(j), -1) for j in new.tolist()], device=state["exp_avg"].device)
    keep = src >= 0
    dim = 1 if side == "right" else 0
    for key in ("exp_avg", "exp_avg_sq"):
        m = state[key]
        moved = torch.zeros_like(m)
        idx = torch.nonzero(keep).flatten()
        if dim == 1:
            moved[:, idx] = m[:, src[keep]]
        else:
            moved[idx] = m[src[keep]]
        state[key] = moved


def _seed(base: int, index: int, step: int) -> int:
    """A projection seed from the group seed, the parameter's position and the step (same on every rank)."""
    return (base * 1_000_003 + index * 7_919 + step) % (2 ** 63 - 1)


def check_group(group: dict) -> None:
    """A projected group's keys, each parameter's shape against ``rank``: :class:`ConfigError` naming
    the problem and the fix."""
    rank = group["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    gap = group["update_proj_gap"]
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise ConfigError(f"update_proj_gap must be an integer >= 1 (optimizer steps between projection "
                          f"refreshes), got {gap!r}")
    if not isinstance(group["scale"], (int, float)) or not group["scale"] > 0:
        raise ConfigError(f"scale must be a positive number, got {group['scale']!r}")
    if group["proj_type"] not in PROJ_TYPES:
        hint = " (galore-torch's 'full' two-sided projection is not supported)" if group["proj_type"] == "full" else ""
        raise ConfigError(f"unknown proj_type {group['proj_type']!r}{hint}; use one of {', '.join(PROJ_TYPES)}")
    PROJECTORS.get(group["projector"])  # unknown name -> UnknownMethodError listing the valid ones
    if not isinstance(group["projector_options"], dict):
        raise ConfigError(f"projector_options must be a dict, got {type(group['projector_options']).__name__}")
    build_options(group["projector"], group["projector_options"])
    names = group.get("param_names")
    for i, p in enumerate(group["params"]):
        what = f"parameter {names[i]!r}" if names else f"parameter {i} of the group"
        if p.ndim != 2:
            raise ConfigError(f"{what} has shape {tuple(p.shape)}: only 2-D matrices can be projected; put it "
                              "in a param group without 'rank'")
        if rank > min(p.shape):
            raise ConfigError(f"projection rank {rank} is larger than {what}'s {p.shape[0]}x{p.shape[1]} matrix "
                              f"allows: use rank <= {min(p.shape)} (or leave the parameter out of the group)")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor] | None = None,
                          keys: tuple[str, ...] | None = None) -> int:
    """Bytes of the optimizer's state tensors (of ``params`` only, and of ``keys`` only, when given)."""
    wanted = None if params is None else {id(p) for p in params}
    total = 0
    for p, st in optimizer.state.items():
        if wanted is not None and id(p) not in wanted:
            continue
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and (keys is None or k in keys):
                total += v.numel() * v.element_size()
    return total
