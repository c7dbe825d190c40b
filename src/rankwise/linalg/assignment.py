"""Linear assignment and the alignment of singular vectors (pure math for permutation matching).

* :func:`best_permutation` -- ``argmax_P sum_i S[i, P(i)]`` over permutations (the linear assignment
  problem, solved exactly by SciPy's Jonker-Volgenant ``linear_sum_assignment``).
* :func:`unit_similarity` -- ``S = A_u B_u^T`` for two weights cut into units along one axis (the
  weight-matching objective's slice for one permutation).
* :func:`unit_correlation` -- the correlation of two sets of activations, summed over each unit's
  features (the activation-matching objective).
* :func:`singular_alignment` -- how well two matrices' top singular vectors line up (Ito et al.,
  "Analysis of Linear Mode Connectivity via Permutation-Based Weight Matching"): with
  ``A = U_a S_a V_a^T`` and ``B = U_b S_b V_b^T``, ``|<u_a,i, u_b,i>|`` and ``|<v_a,i, v_b,i>|`` for
  the top ``k`` pairs, and the subspace overlap ``||U_a,k^T U_b,k||_F^2 / k`` (1 = same span).
"""
from __future__ import annotations

import torch

from ..errors import ConfigError


def best_permutation(S: torch.Tensor) -> torch.Tensor:
    """The permutation ``P`` (LongTensor (n,)) maximizing ``sum_i S[i, P[i]]`` for a square ``S``."""
    from scipy.optimize import linear_sum_assignment

    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ConfigError(f"an assignment needs a square score matrix, got shape {tuple(S.shape)}")
    if not bool(torch.isfinite(S).all()):
        raise ConfigError("the assignment scores hold non-finite values; check the weights or activations")
    rows, cols = linear_sum_assignment(S.detach().to(torch.float64).cpu().numpy(), maximize=True)
    perm = torch.empty(S.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def units(W: torch.Tensor, axis: int, n: int, block: int = 1, sections: int = 1) -> torch.Tensor:
    """``W`` cut into ``n`` units along ``axis``: an ``(n, -1)`` float64 matrix whose row ``i`` holds every
    entry of unit ``i``.

    Along ``axis`` the layout is ``sections`` equal parts (e.g. GPT-2's fused q, k, v), each of ``n``
    units of ``block`` consecutive indices (a head's ``head_dim`` rows; a channel's ``H W`` flattened
    positions), i.e. index ``s (n block) + i block + d``.
    """
    size = W.shape[axis]
    if size != sections * n * block:
        raise ConfigError(f"axis {axis} of a {tuple(W.shape)} tensor has {size} entries, not "
                          f"{sections} x {n} x {block}")
    X = W.detach().to(torch.float64).movedim(axis, 0)
    X = X.reshape(sections, n, block, -1).transpose(0, 1)
    return X.reshape(n, -1)


def unit_similarity(A: torch.Tensor, B: torch.Tensor, axis: int, n: int, block: int = 1, sections: int = 1
                    ) -> torch.Tensor:
    """``S[i, j] = <unit i of A, unit j of B>`` (n, n), float64."""
    return units(A, axis, n, block, sections) @ units(B, axis, n, block, sections).T


def unit_correlation(Xa: torch.Tensor, Xb: torch.Tensor, n: int, block: int = 1) -> torch.Tensor:
    """``S[i, j] = sum_d corr(Xa[:, i block + d], Xb[:, j block + d])`` (n, n) for activations ``(N, n block)``.

    Each feature is standardized over the ``N`` samples (a constant feature contributes 0)."""
    if Xa.shape != Xb.shape or Xa.ndim != 2 or Xa.shape[1] != n * block:
        raise ConfigError(f"activations must both be (N, {n * block}), got {tuple(Xa.shape)} and {tuple(Xb.shape)}")

    def z(X: torch.Tensor) -> torch.Tensor:
        X = X.to(torch.float64)
        X = X - X.mean(0)
        sd = X.pow(2).mean(0).sqrt()
        return X / torch.where(sd > 0, sd, torch.ones_like(sd))

    C = z(Xa).T @ z(Xb) / Xa.shape[0]                        # (n block, n block)
    return C.reshape(n, block, n, block).diagonal(dim1=1, dim2=3).sum(-1)


def singular_alignment(A: torch.Tensor, B: torch.Tensor, k: int = 10) -> dict[str, float | list[float]]:
    """Alignment of the top-``k`` singular vectors of two same-shape matrices (module docstring).

    Returns ``u_cos`` / ``v_cos`` (``|<u_a,i, u_b,i>|`` per i), their means ``u_mean`` / ``v_mean``, and
    ``u_overlap`` / ``v_overlap`` (``||U_a,k^T U_b,k||_F^2 / k``)."""
    if A.shape != B.shape or A.ndim != 2:
        raise ConfigError(f"singular alignment needs two matrices of one shape, got {tuple(A.shape)} and "
                          f"{tuple(B.shape)}")
    k = max(1, min(int(k), min(A.shape)))
    Ua, _, Vha = torch.linalg.svd(A.detach().to(torch.float64), full_matrices=False)
    Ub, _, Vhb = torch.linalg.svd(B.detach().to(torch.float64), full_matrices=False)
    Ua, Ub, Va, Vb = Ua[:, :k], Ub[:, :k], Vha[:k].T, Vhb[:k].T
    u_cos = (Ua * Ub).sum(0).abs()
    v_cos = (Va * Vb).sum(0).abs()
    return {"k": k, "u_cos": u_cos.tolist(), "v_cos": v_cos.tolist(), "u_mean": float(u_cos.mean()),
            "v_mean": float(v_cos.mean()), "u_overlap": float((Ua.T @ Ub).pow(2).sum() / k),
            "v_overlap": float((Va.T @ Vb).pow(2).sum() / k)}


__all__ = ["best_permutation", "singular_alignment", "unit_correlation", "unit_similarity", "units"]
