"""Randomized Hadamard rotations of a layer's input space (spreading outlier columns before quantizing).

For an orthogonal ``Q (n, n)``, ``y = W x = (W Q)(Q^T x)``: the layer stores a quantized ``W Q`` and
applies ``Q^T`` to its input at run time. In the row-vector convention of torch (a row ``v`` of
``W``, a token ``x`` of shape (..., n)) both maps are the same right multiplication, ``v -> v Q``:
:meth:`HadamardRotation.rotate`; :meth:`~HadamardRotation.unrotate` is ``v -> v Q^T``. The covariance of
the rotated inputs is ``Q^T C Q`` (:meth:`~HadamardRotation.rotate_covariance`). Nothing builds a dense
``n x n`` matrix: each block is a fast Walsh-Hadamard transform (:func:`fwht`, ``O(n log n)``).

A *block* on the ``p = 2^k`` coordinates ``[a, a + p)`` with random signs ``d`` (from a seeded
``torch.Generator``) maps ``v[a:a+p] -> H_p diag(d) v[a:a+p] / sqrt(p)`` (Sylvester ``H_p``,
``H_p H_p = p I``): signs first, then mixing, so a spike on one coordinate is spread evenly over
all ``p``. Constructions (``kind``):

* ``"single"`` (``n`` a power of two): one block on all coordinates, ``Q^T = H D / sqrt(n)``.
* ``"two-block"`` (any ``n >= 2``; the default when ``n`` is not a power of two): with
  ``p = 2^floor(log2 n)``, a block on the first ``p`` coordinates, then another (fresh signs) on the
  last ``p``. The two windows overlap on ``[n - p, p)`` and cover all ``n`` coordinates; the
  product of two orthogonal maps is orthogonal. For ``n = p`` the windows coincide and this is
  exactly the paper's two-block transform ``H D2 H D1 / p`` ("Approximating Uniform Random
  Rotations by Two-Block Structured Hadamard Rotations in High Dimensions"), which proves that
  each coordinate of that transform converges to the corresponding coordinate of a uniformly
  rotated vector (Kolmogorov distance ``O(d^-1/5)``), while the whole vector does not. For
  ``n != p`` our windows overlap only partly: each output coordinate has passed through one or
  two blocks, so the paper's result is an analogy here, not a guarantee. Either way the map is
  exactly orthogonal, so the layer's function is unchanged before quantization.

Fusion instead of the online transform (not done here; every rotated layer applies ``Q^T`` to its
input itself): it is exact where the rotated input is produced by a linear map with nothing
nonlinear in between along the rotated axis, e.g.

* ``v_proj -> o_proj`` with a per-head rotation: attention mixes tokens, not the channels of one
  head, so ``softmax(.) (V Q_h) = (softmax(.) V) Q_h`` and ``Q_h`` folds into ``v_proj``'s rows;
* the residual stream as in QuaRot: after folding each RMSNorm's gain into the following linear
  layers, one rotation of the stream folds into the embedding, every reader (q/k/v, gate/up,
  lm_head) and every writer (o_proj, down_proj), since RMSNorm commutes with orthogonal maps.

``down_proj``'s input comes out of the SwiGLU nonlinearity, so its rotation stays online (as in
QuaRot).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError

KINDS = ("single", "two-block")


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform along the last axis: ``x @ H_p`` (Sylvester ``H_p``, symmetric),
    ``p = x.shape[-1]`` a power of two; ``O(p log p)`` per row, a new tensor."""
    p = x.shape[-1]
    if not is_power_of_two(p):
        raise ConfigError(f"the Walsh-Hadamard transform needs a power-of-two length, got {p}")
    lead = x.shape[:-1]
    y = x.reshape(-1, p)
    h = 1
    while h < p:
        y = y.view(-1, p // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, p)


def rotation_layout(n: int, kind: str = "auto", where: str = "") -> tuple[str, int, list[int]]:
    """``(kind, p, starts)``: the block size and the first coordinate of each block for ``n`` inputs.
    ``where`` names the layer (e.g. its shape) in error messages."""
    where = where or f"a layer with {n} inputs"
    if n < 2:
        raise ConfigError(f"no Hadamard rotation exists for {where}: a rotation of the input space needs at least "
                          "2 inputs; turn rotation off for this layer (nothing was rotated)")
    if kind == "auto":
        kind = "single" if is_power_of_two(n) else "two-block"
    if kind not in KINDS:
        raise ConfigError(f"unknown rotation kind {kind!r}; valid: auto, {', '.join(KINDS)}")
    p = 1 << (n.bit_length() - 1)
    if kind == "single":
        if p != n:
            raise ConfigError(f"a single Hadamard block needs a power-of-two input size, {where} has {n}; use "
                              f"kind='two-block' (two overlapping {p}-blocks) or 'auto'")
        return kind, p, [0]
    return kind, p, [0, n - p]


def random_signs(size: int, seed: int) -> torch.Tensor:
    """``size`` random signs (int8, +-1) from ``torch.Generator().manual_seed(seed)``."""
    g = torch.Generator().manual_seed(int(seed))
    return (torch.randint(0, 2, (size,), generator=g, dtype=torch.int64) * 2 - 1).to(torch.int8)


@dataclass
class HadamardRotation:
    """An orthogonal ``Q (n, n)`` made of randomized Hadamard blocks; see the module docstring.

    ``signs`` (int8, ``len(starts) * p``) holds each block's signs in turn.
    """

    n: int
    kind: str
    p: int
    starts: list[int]
    signs: torch.Tensor

    @classmethod
    def make(cls, n: int, seed: int = 0, kind: str = "auto", where: str = "") -> "HadamardRotation":
        kind, p, starts = rotation_layout(n, kind, where)
        return cls(n, kind, p, starts, random_signs(len(starts) * p, seed))

    @classmethod
    def from_signs(cls, n: int, signs: torch.Tensor, kind: str = "auto") -> "HadamardRotation":
        kind, p, starts = rotation_layout(n, kind)
        if signs.shape != (len(starts) * p,):
            raise ConfigError(f"a {kind} rotation of {n} inputs needs {len(starts) * p} signs, "
                              f"got {tuple(signs.shape)}")
        return cls(n, kind, p, starts, signs)

    def _check(self, V: torch.Tensor) -> None:
        if V.shape[-1] != self.n:
            raise ConfigError(f"rotation is for {self.n} inputs, got a tensor with last dimension {V.shape[-1]}")

    def _block_signs(self, b: int, like: torch.Tensor) -> torch.Tensor:
        return self.signs[b * self.p:(b + 1) * self.p].to(device=like.device, dtype=like.dtype)

    def rotate(self, V: torch.Tensor) -> torch.Tensor:
        """``V Q`` along the last axis (rows of ``W``, or inputs ``x``); a new tensor."""
        self._check(V)
        V = V.clone()
        norm = 1.0 / math.sqrt(self.p)
        for b, a in enumerate(self.starts):
            V[..., a:a + self.p] = fwht(V[..., a:a + self.p] * self._block_signs(b, V)) * norm
        return V

    def unrotate(self, V: torch.Tensor) -> torch.Tensor:
        """``V Q^T`` along the last axis (the inverse of :meth:`rotate`); a new tensor."""
        self._check(V)
        V = V.clone()
        norm = 1.0 / math.sqrt(self.p)
        for b, a in reversed(list(enumerate(self.starts))):
            V[..., a:a + self.p] = fwht(V[..., a:a + self.p]) * self._block_signs(b, V) * norm
        return V

    def rotate_covariance(self, C: torch.Tensor) -> torch.Tensor:
        """``Q^T C Q``: the covariance of the rotated inputs ``Q^T x``."""
        return self.rotate(self.rotate(C).T.contiguous()).T.contiguous()

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense ``Q`` (for tests and small cases only)."""
        return self.rotate(torch.eye(self.n, dtype=dtype))


def rotation_signs_size(n: int, kind: str = "auto", where: str = "") -> int:
    """Number of stored signs of a rotation of ``n`` inputs."""
    _, p, starts = rotation_layout(n, kind, where)
    return len(starts) * p


__all__ = ["HadamardRotation", "KINDS", "fwht", "is_power_of_two", "random_signs", "rotation_layout",
           "rotation_signs_size"]
