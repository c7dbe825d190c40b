"""Power-law fit: Hill MLE closed form, a known Pareto tail, and agreement with weightwatcher."""
import math

import numpy as np
import pytest

from rankwise.analysis.powerlaw import fit_power_law


def _pareto(alpha, n, xmin=1.0, seed=0):
    u = np.random.default_rng(seed).random(n)
    return xmin * (1 - u) ** (-1 / (alpha - 1))  # inverse CDF of p(x) ~ x^-alpha on [xmin, inf)


def test_known_pareto_alpha_recovered():
    x = _pareto(2.5, 4000)
    f = fit_power_law(x)
    assert abs(f.alpha - 2.5) < 0.08
    assert f.D < 0.05 and f.num_tail > 1000
    assert f.alpha_weighted == pytest.approx(f.alpha * math.log10(x.max()))


def test_mid_rule_is_the_hill_estimator():
    x = np.sort(_pareto(3.0, 501, seed=1))
    f = fit_power_law(x, xmin="mid")
    i = x.size // 2
    tail = x[i:]
    hill = 1 + tail.size / np.log(tail / x[i]).sum()
    assert f.alpha == pytest.approx(hill, rel=1e-12)
    assert f.xmin == x[i] and f.num_tail == tail.size


@pytest.mark.parametrize("shape,df", [((60, 150), 3), ((200, 300), 2.5), ((15, 40), 3), ((120, 120), 4)])
def test_agrees_with_weightwatcher_fit(shape, df):
    ww_powerlaw = pytest.importorskip("weightwatcher.WW_powerlaw")
    w = np.random.default_rng(7).standard_t(df, size=shape)
    ev = np.linalg.svd(w, compute_uv=False) ** 2
    ref = ww_powerlaw.WWFit(ev[ev > 1e-5])
    f = fit_power_law(ev)
    assert f.alpha == pytest.approx(ref.alpha, rel=1e-9)
    assert f.xmin == pytest.approx(ref.xmin, rel=1e-12)
    assert f.D == pytest.approx(ref.D, rel=1e-8)


def test_agrees_with_weightwatcher_analyze_on_a_module():
    """End to end: weightwatcher's own layer walk, ESD convention (no 1/N) and fit."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("weightwatcher")
    import weightwatcher as ww

    from rankwise.analysis.run import analyze

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(80, 40), torch.nn.ReLU(), torch.nn.Linear(40, 120))
    with torch.no_grad():
        for m in (net[0], net[2]):
            m.weight.copy_(torch.distributions.StudentT(3.0).sample(m.weight.shape) * 0.1)
    ref = ww.WeightWatcher(model=net).analyze()
    ours = {r["name"]: r for r in analyze(net, metrics="powerlaw").layers}
    for name, a in zip(("0", "2"), ref["alpha"]):
        assert ours[name]["alpha"] == pytest.approx(a, abs=1e-6)


def test_too_short_spectrum_reports_missing_with_reason():
    f = fit_power_law(np.array([1.0, 2.0, 3.0, 1e-9]))
    assert f.alpha is None and f.alpha_weighted is None
    assert "only 3 eigenvalues" in f.reason
