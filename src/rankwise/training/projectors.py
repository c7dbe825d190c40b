"""Projectors of :class:`~rankwise.training.optim.ProjectedAdamW`: which rank-``r`` subspace ``P`` a
gradient is projected on (the math is :mod:`rankwise.linalg.projections`).

Each projector is a small stateless class registered under its ``projector`` name, with an
``Options`` dataclass (the options it takes; any other is a :class:`ConfigError`). It turns a gradient
into the tensor the optimizer stores (``compute``) and that tensor into the basis ``P (k, r)`` with
orthonormal columns (``basis``):

* ``svd`` (GaLore): the top-``r`` singular vectors of ``G``; stored: ``P``.
* ``randomized``: the same by the seeded randomized SVD (``oversample``, ``n_iter``); stored: ``P``.
* ``dct`` (SVD-free): the ``r`` columns of the fixed DCT-II basis best aligned with ``G``; stored: their
  ``r`` indices only (int64), the basis being shared by every layer of that size.
* ``random``: a seeded Haar-random orthonormal ``P``, re-drawn at each refresh; stored: ``P``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from ..linalg import projections as pj
from ..registry import Registry

#: projector name -> Projector subclass
PROJECTORS: Registry[type["Projector"]] = Registry("projector")


@dataclass(frozen=True)
class NoOptions:
    pass


class Projector:
    """Computes the stored form of a rank-``r`` basis of a gradient, and the basis from it."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: Whether ``compute`` uses its ``seed`` (random draws must be the same on every rank: the seed is a
    #: function of the optimizer's seed, the parameter's position and the step, never of a global RNG).
    seeded: ClassVar[bool] = False
    #: Whether the stored tensor names fixed basis columns (their moments can follow them across a refresh).
    indexed: ClassVar[bool] = False

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options = build_options(self.name, options)

    def compute(self, G: torch.Tensor, rank: int, side: str, seed: int) -> torch.Tensor:
        raise NotImplementedError

    def basis(self, stored: torch.Tensor, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``P (k, r)`` from the stored tensor (default: the stored tensor is ``P``)."""
        return stored.to(dtype=dtype, device=device)


def option_names(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(PROJECTORS.get(name).Options)]


def build_options(name: str, options: dict[str, Any] | None) -> Any:
    """The projector's ``Options`` from a dict; an option it does not take is a :class:`ConfigError`."""
    cls = PROJECTORS.get(name)
    options = dict(options or {})
    valid = option_names(name)
    bad = sorted(set(options) - set(valid))
    if bad:
        takers = [p for p in PROJECTORS.names() if p != name and set(bad) <= set(option_names(p))]
        hint = f"; projector {takers[0]!r} takes {', '.join(bad)}" if takers else ""
        raise ConfigError(f"projector {name!r} does not take option(s) {', '.join(bad)} (it takes "
                          f"{', '.join(valid) or 'none'}): drop them{hint}")
    try:
        return cls.Options(**options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad options for projector {name!r}: {e}") from None


@PROJECTORS.register("svd")
class SVDProjector(Projector):
    """GaLore: ``P`` = the top-``r`` singular vectors of ``G`` on the projected side."""

    name = "svd"

    def compute(self, G, rank, side, seed):
        return pj.svd_basis(G, rank, side)


@dataclass(frozen=True)
class RandomizedOptions:
    oversample: int = 10
    n_iter: int = 2

    def __post_init__(self):
        if int(self.oversample) < 0 or int(self.n_iter) < 0:
            raise ValueError(f"oversample and n_iter must be >= 0, got {self.oversample}, {self.n_iter}")


@PROJECTORS.register("randomized")
class RandomizedProjector(Projector):
    """``P`` from the seeded randomized SVD (HMT) of ``G``: ``oversample`` extra test vectors,
    ``n_iter`` power iterations."""

    name = "randomized"
    Options = RandomizedOptions
    seeded = True

    def compute(self, G, rank, side, seed):
        return pj.randomized_basis(G, rank, side, seed, int(self.options.oversample), int(self.options.n_iter))


@PROJECTORS.register("dct")
class DCTProjector(Projector):
    """SVD-free: the ``r`` DCT-II columns with the largest ``||G d_j||``; stores only their indices."""

    name = "dct"
    indexed = True

    def compute(self, G, rank, side, seed):
        return pj.dct_columns(G, rank, side)

    def basis(self, stored, k, dtype, device):
        return pj.dct_basis(stored, k, dtype, device)


@PROJECTORS.register("random")
class RandomProjector(Projector):
    """A seeded Haar-random orthonormal ``P``, re-drawn at every refresh (ignores ``G``)."""

    name = "random"
    seeded = True

    def compute(self, G, rank, side, seed):
        return pj.random_basis(pj.side_size(tuple(G.shape), side), rank, seed, G.dtype, G.device)


def get_projector(name: str, options: dict[str, Any] | None = None) -> Projector:
    return PROJECTORS.get(name)(options)
