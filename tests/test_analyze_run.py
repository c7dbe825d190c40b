"""rankwise.analyze on tiny models: records vs numpy, layer selection, bad input, whitened spectrum."""
import numpy as np
import pytest
import torch

from rankwise.analysis.run import analyze
from rankwise.calibration.stats import collect_input_stats
from rankwise.errors import ConfigError, NoTargetLayersError, UnknownMethodError
from rankwise.linalg.spectrum import rank_for_energy, singular_values
from rankwise.linalg.svd import truncated_svd
from rankwise.linalg.whitening import cholesky_whitener
from rankwise.models.surgery import linear_weight
from rankwise.models.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")



def test_records_match_numpy_on_every_family(tiny_any):
    res = analyze(tiny_any)
    assert res.layers and res.summary["layers"] == len(res.layers)
    r = res.layers[0]
    w = linear_weight(tiny_any.get_submodule(r["name"])).detach().double().numpy()
    s = np.linalg.svd(w, compute_uv=False)
    assert r["shape"] == list(w.shape)
    assert r["spectral_norm"] == pytest.approx(s[0], rel=1e-9)
    assert r["stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-9)
    assert r["rank90"] == int(np.searchsorted(np.cumsum(s**2) / (s**2).sum(), 0.9) + 1)
    assert {"alpha", "farms_alpha", "effective_rank", "condition_number"} <= set(r)


def test_layer_pattern_and_bad_input(tiny_llama):
    res = analyze(tiny_llama, layers="down_proj")
    assert [r["type"] for r in res.layers] == ["down_proj", "down_proj"]
    with pytest.raises(NoTargetLayersError, match="no linear layer"):
        analyze(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.LayerNorm(4)))
    with pytest.raises(UnknownMethodError, match="nosuch"):
        analyze(tiny_llama, metrics="spectrum,nosuch")
    with pytest.raises(ConfigError, match="--calib"):
        analyze(tiny_llama, metrics="whitened")


def test_non_finite_layer_is_skipped_and_run_continues(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    res = analyze(tiny_llama)
    assert [s["name"] for s in res.skipped] == ["model.layers.0.mlp.up_proj"]
    assert "non-finite" in res.skipped[0]["reason"] and res.summary["skipped"] == res.skipped
    assert len(res.layers) == 13


def test_compare_mismatch_names_the_layers(tiny_llama):
    other = tiny_model("llama", intermediate_size=96)
    with pytest.raises(ConfigError, match=r"shapes differ: \['model.layers.0.mlp.gate_proj"):
        analyze(tiny_llama, compare=other)
    fewer = tiny_model("llama", num_hidden_layers=1)
    with pytest.raises(ConfigError, match="only in the analyzed model"):
        analyze(tiny_llama, compare=fewer)
    same = analyze(tiny_llama, compare=tiny_model("llama"))
    assert same.summary["intruders_total"] == 0 and all(r["relative_change"] == 0 for r in same.layers)


def test_whitened_spectrum_predicts_truncation_error():
    """||(W - W'_k) X||_F^2 == sum_{i>k} sigma_i(W S)^2 for the whitened rank-k truncation W'_k."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g, dtype=torch.float64)
    x = torch.randn(40, 40, generator=g, dtype=torch.float64) @ torch.randn(40, 300, generator=g, dtype=torch.float64)
    wh = cholesky_whitener(x @ x.T)
    sw = singular_values(wh.whiten(w))
    for k in (1, 5, 12):
        u, s, vh = truncated_svd(wh.whiten(w), k, dtype=torch.float64)
        wk = wh.unwhiten(u @ torch.diag(s) @ vh)
        err = torch.linalg.matrix_norm((w - wk) @ x) ** 2
        assert float(err) == pytest.approx(float((sw[k:] ** 2).sum()), rel=1e-8)


def test_whitened_metrics_from_calibration(tiny_llama, random_ids):
    windows = random_ids[:512].view(8, 64)
    res = analyze(tiny_llama, layers="q_proj", calib=windows)
    name = res.layers[0]["name"]
    st = collect_input_stats(tiny_llama, windows, [name])[name]
    w = linear_weight(tiny_llama.get_submodule(name)).detach()
    s = np.linalg.svd((w.double() @ torch.linalg.cholesky(st.covariance_mean)).numpy(), compute_uv=False)
    np.testing.assert_allclose(res.white_spectra[name].numpy(), s, rtol=1e-7)
    assert res.layers[0]["w_rank90"] == rank_for_energy(torch.from_numpy(s), 0.9)


def test_parallel_layers_give_the_serial_result(tiny_llama):
    """Layers run on several worker threads give exactly the one-worker records, in model order."""
    one = analyze(tiny_llama, workers=1)
    three = analyze(tiny_llama, workers=3)
    assert [r["name"] for r in three.layers] == [r["name"] for r in one.layers]
    assert three.layers == one.layers
    t = three.summary["timing"]
    assert t["workers"] == 3 and set(t["metric_cpu_s"]) == set(three.summary["metrics"])
    assert t["decomposition_cpu_s"] > 0 and all(v > 0 for v in t["metric_cpu_s"].values())
    assert torch.get_num_threads() == 1                             # the one_thread fixture's setting, restored
