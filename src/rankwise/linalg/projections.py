"""Rank-``r`` gradient subspaces for projected-gradient optimizers (GaLore and its SVD-free variants).

A gradient ``G (m, n)`` is projected on its shorter side (galore-torch's ``std``): with ``m >= n``
the *right* side, ``R = G P`` with ``P (n, r)`` orthonormal columns; with ``m < n`` the *left* side,
``R = P^T G`` with ``P (m, r)``. The projected gradient ``R`` has ``max(m, n) r`` entries, and
``P P^T G`` (resp. ``G P P^T``) is the part of ``G`` inside the subspace. Every basis below has
orthonormal columns, so ``P^T P = I_r`` and projecting back is ``P R`` (resp. ``R P^T``).

Bases (each ``(k, r)``, ``k`` the projected side's size):

* :func:`svd_basis` -- the top-``r`` singular vectors of ``G`` (GaLore): by Eckart-Young the
  subspace that keeps the most of ``||G||_F``: ``||G P||_F^2 = sum_{i<=r} s_i^2``.
* :func:`randomized_basis` -- the same from the randomized SVD (:func:`rankwise.linalg.svd.truncated_svd`,
  HMT), seeded.
* :func:`dct_columns` + :func:`dct_matrix` -- SVD-free: of the fixed orthonormal DCT-II basis
  ``D (k, k)``, ``D[t, j] = sqrt(2/k) c_j cos(pi (2t + 1) j / (2k))`` (``c_0 = 1/sqrt 2``, else 1),
  the ``r`` columns with the largest alignment ``||G d_j||`` (right side; ``||G^T d_j||`` left):
  ``P = D[:, J]`` and only the indices ``J`` need to be stored. Since the columns are orthonormal,
  ``sum_{j in J} ||G d_j||^2`` is exactly the energy kept, and picking the largest norms maximizes it
  over all choices of ``r`` DCT columns. Cost: one ``(m, n) x (n, n)`` product, no factorization.
* :func:`random_basis` -- ``Q`` of the QR of a seeded Gaussian ``(k, r)`` (a uniformly random subspace).
"""
from __future__ import annotations

import functools
import math

import torch

from ..errors import ConfigError
from ._checks import check_rank
from .svd import truncated_svd

SIDES = ("left", "right")


def projection_side(shape: tuple[int, int], proj_type: str = "std") -> str:
    """``"right"`` or ``"left"``: which side of an ``(m, n)`` gradient is projected (galore-torch's
    ``proj_type``: ``std`` the shorter side, ``reverse_std`` the longer, ``left`` / ``right`` fixed)."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in SIDES:
        return proj_type
    raise ConfigError(f"unknown proj_type {proj_type!r}; use std, reverse_std, left or right")


def side_size(shape: tuple[int, int], side: str) -> int:
    """Size ``k`` of the projected side: ``n`` for ``right``, ``m`` for ``left``."""
    return int(shape[1] if side == "right" else shape[0])


def check_basis_rank(rank: int, shape: tuple[int, int], side: str) -> int:
    """``rank`` checked against the projected side's size (it must be at most ``min(m, n)`` too)."""
    return check_rank(rank, *shape, what="projection rank")


def project(G: torch.Tensor, P: torch.Tensor, side: str) -> torch.Tensor:
    """``G P`` (right, ``(m, r)``) or ``P^T G`` (left, ``(r, n)``)."""
    return G @ P if side == "right" else P.T @ G


def project_back(R: torch.Tensor, P: torch.Tensor, side: str) -> torch.Tensor:
    """``R P^T`` (right) or ``P R`` (left): the ``(m, n)`` matrix of a projected ``R``."""
    return R @ P.T if side == "right" else P @ R


def svd_basis(G: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """Top-``rank`` right (``V_r``, (n, r)) or left (``U_r``, (m, r)) singular vectors of ``G``, in ``G``'s dtype."""
    U, _, Vh = torch.linalg.svd(G.detach().float(), full_matrices=False)
    P = Vh[:rank].T if side == "right" else U[:, :rank]
    return P.to(G.dtype).contiguous()


def randomized_basis(G: torch.Tensor, rank: int, side: str, seed: int, oversample: int = 10,
                     n_iter: int = 2) -> torch.Tensor:
    """:func:`svd_basis` by the seeded randomized SVD (``oversample``, ``n_iter`` power iterations)."""
    U, _, Vh = truncated_svd(G.detach(), rank, method="randomized", oversample=oversample, n_iter=n_iter, seed=seed,
                             dtype=torch.float32)
    P = Vh.T if side == "right" else U
    return P.to(device=G.device, dtype=G.dtype).contiguous()


@functools.lru_cache(maxsize=32)
def _dct_cpu(k: int) -> torch.Tensor:
    t = torch.arange(k, dtype=torch.float64)[:, None]
    j = torch.arange(k, dtype=torch.float64)[None, :]
    D = torch.cos(math.pi * (2 * t + 1) * j / (2 * k)) * math.sqrt(2.0 / k)
    D[:, 0] /= math.sqrt(2.0)
    return D


_DCT_CACHE: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def dct_matrix(k: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthonormal DCT-II basis ``D (k, k)`` (columns = basis vectors; ``D^T D = I``), cached per
    size, dtype and device (one copy shared by every layer of that size)."""
    key = (int(k), dtype, torch.device(device))
    D = _DCT_CACHE.get(key)
    if D is None:
        D = _DCT_CACHE[key] = _dct_cpu(int(k)).to(dtype=dtype, device=device)
    return D


def dct_columns(G: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """Indices ``J`` (int64, ascending) of the ``rank`` DCT columns best aligned with ``G``:
    the largest ``||G d_j||`` (right) or ``||G^T d_j||`` (left)."""
    k = side_size(tuple(G.shape), side)
    D = dct_matrix(k, torch.float32, G.device)
    Gf = G.detach().float()
    S = Gf @ D if side == "right" else Gf.T @ D          # (other side, k): column j = G d_j
    score = S.square().sum(0)
    return torch.topk(score, rank).indices.sort().values


def dct_basis(indices: torch.Tensor, k: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``P = D[:, J]`` (k, r) for stored indices ``J``."""
    return dct_matrix(k, dtype, device).index_select(1, indices.to(device))


def random_basis(k: int, rank: int, seed: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Orthonormal ``Q (k, rank)`` from the QR of a seeded Gaussian (a uniformly random subspace)."""
    g = torch.Generator().manual_seed(int(seed))
    Z = torch.randn(k, rank, generator=g, dtype=torch.float64)
    Q, Rf = torch.linalg.qr(Z)
    Q = Q * torch.sign(torch.diagonal(Rf))  # the unique QR with a positive diagonal: Haar-distributed Q
    return Q.to(dtype=dtype, device=device).contiguous()


__all__ = ["SIDES", "check_basis_rank", "dct_basis", "dct_columns", "dct_matrix", "project", "project_back",
           "projection_side", "random_basis", "randomized_basis", "side_size", "svd_basis"]
