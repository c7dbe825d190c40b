import numpy as np
import pytest
import torch

from rankwise.errors import ConfigError
from rankwise.linalg import activation_error, plain_svd, refit_left, scaled_svd, whitened_svd


def _data(m=10, n=8, T=30, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, n))
    X = (rng.standard_normal((n, n)) * np.logspace(0, 1.5, n)) @ rng.standard_normal((n, T))
    return W, X


def test_refit_matches_lstsq_and_never_worse():
    W, X = _data()
    C = torch.from_numpy(X @ X.T)
    for k in (1, 3, 5):
        L0, R = plain_svd(torch.from_numpy(W), dtype=torch.float64).factors(k, dtype=torch.float64)
        L = refit_left(torch.from_numpy(W), R, C, dtype=torch.float64).numpy()
        Rn = R.numpy()
        ref = np.linalg.lstsq((Rn @ X).T, (W @ X).T, rcond=None)[0].T
        np.testing.assert_allclose(L, ref, rtol=1e-6, atol=1e-8)
        before = np.linalg.norm((W - L0.numpy() @ Rn) @ X)
        after = np.linalg.norm((W - L @ Rn) @ X)
        assert after <= before * (1 + 1e-12)
        assert activation_error(torch.from_numpy(W), torch.from_numpy(L @ Rn), C) == pytest.approx(after, rel=1e-9)


def test_refit_improves_asvd_and_keeps_whitened_optimum():
    W, X = _data(seed=1)
    C = torch.from_numpy(X @ X.T)
    Wt = torch.from_numpy(W)
    L0, R = scaled_svd(Wt, torch.from_numpy(np.abs(X).mean(1) ** 0.5)).factors(3, dtype=torch.float64)
    L = refit_left(Wt, R, C)
    assert activation_error(Wt, L.double() @ R, C) < activation_error(Wt, L0 @ R, C)
    f = whitened_svd(Wt, C, dtype=torch.float64)
    Lw, Rw = f.factors(3, dtype=torch.float64)
    Lr = refit_left(Wt, Rw, C, dtype=torch.float64)
    assert activation_error(Wt, Lr @ Rw, C) == pytest.approx(f.error(3), rel=1e-7)


def test_refit_with_shifted_inputs_cross_covariance():
    W, X = _data(seed=2)
    Xp = X + 0.1 * np.random.default_rng(3).standard_normal(X.shape) * X.std()
    _, R = plain_svd(torch.from_numpy(W)).factors(4, dtype=torch.float64)
    Rn = R.numpy()
    L = refit_left(torch.from_numpy(W), R, torch.from_numpy(Xp @ Xp.T), cross=torch.from_numpy(X @ Xp.T),
                   dtype=torch.float64).numpy()
    ref = np.linalg.lstsq((Rn @ Xp).T, (W @ X).T, rcond=None)[0].T
    np.testing.assert_allclose(L, ref, rtol=1e-6, atol=1e-8)


def test_refit_bad_shapes():
    with pytest.raises(ConfigError):
        refit_left(torch.randn(4, 5), torch.randn(2, 6), torch.eye(5))
    with pytest.raises(ConfigError):
        refit_left(torch.randn(4, 5), torch.randn(2, 5), torch.eye(4))


def test_linalg_modules_have_no_model_knowledge():
    """Design rule: the math layer imports neither nn.Module code nor model/calibration code."""
    import ast
    import pathlib

    import rankwise.linalg as pkg

    root = pathlib.Path(pkg.__file__).parent
    for name in ("__init__", "_checks", "svd", "whitening", "factorization", "refit"):
        tree = ast.parse((root / f"{name}.py").read_text())
        mods = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not any(m.startswith(("torch.nn", "transformers")) or m.split(".")[0] in ("models", "calibration")
                       for m in mods), (name, mods)
        assert not any(isinstance(n, ast.Attribute) and n.attr == "nn" for n in ast.walk(tree)), name
