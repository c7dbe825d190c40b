"""Input validation shared by the linalg routines (no model knowledge)."""
from __future__ import annotations

import torch

from ..errors import ConfigError, NumericalError


def as_matrix(W: torch.Tensor, name: str = "W") -> torch.Tensor:
    """``W`` as a float64 2-D tensor, after checking shape and finiteness."""
    if not isinstance(W, torch.Tensor):
        raise ConfigError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if W.ndim != 2 or W.shape[0] == 0 or W.shape[1] == 0:
        raise ConfigError(f"{name} must be a non-empty 2-D matrix, got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise ConfigError(f"{name} must be a floating-point tensor, got {W.dtype}")
    W = W.detach().to(torch.float64)
    check_finite(W, name)
    return W


def check_finite(T: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(T).all()):
        bad = int((~torch.isfinite(T)).sum())
        raise NumericalError(
            f"{name} has {bad} non-finite entries (nan/inf) of {T.numel()}; "
            "fix the weights / statistics (e.g. reload the model, calibrate in float32) before factorizing"
        )


def check_rank(k: int, m: int, n: int, what: str = "rank") -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        try:
            k = int(k)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{what} must be an integer, got {k!r}") from e
    if k < 1 or k > min(m, n):
        raise ConfigError(f"{what} {k} is out of range for a {m} x {n} matrix: use 1 <= {what} <= {min(m, n)}")
    return k


def as_vector(v: torch.Tensor, size: int, name: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.ndim != 1 or v.shape[0] != size:
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ConfigError(f"{name} must be a vector of length {size}, got {shape}")
    v = v.detach().to(torch.float64)
    check_finite(v, name)
    return v


def as_covariance(C: torch.Tensor, n: int | None = None, name: str = "C") -> torch.Tensor:
    """Symmetrized float64 (n, n) covariance."""
    C = as_matrix(C, name)
    if C.shape[0] != C.shape[1] or (n is not None and C.shape[0] != n):
        want = f"({n}, {n})" if n is not None else "square"
        raise ConfigError(f"{name} must be {want} (inputs x inputs), got {tuple(C.shape)}")
    S = C + C.T  # one (n, n) temporary, not two: at n = 11008 (a 7B down_proj) each is ~1 GB
    return S.mul_(0.5)
