"""Structured pruning end to end (issue 20): each structure compresses tiny Llama / GPT-2 / BERT models,
saves a plain directory that plain transformers loads in a process that never imports rankwise (same
logits), evaluates; rankwise.json says what was removed and why; bad input fails cleanly; a pruned model
compresses further; healing distils from the dense model."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import rankwise
from rankwise.errors import ArtifactError, ConfigError
from rankwise.evaluation.perplexity import perplexity
from rankwise.models.tiny import TINY_TEXT, tiny_model, tiny_tokenizer

WINDOWS = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(2))

#: name -> (arch, structure, ratio, options)
CASES = {
    "llama-depth": ("llama", "depth", 0.5, {}),
    "llama-width": ("llama", "width", 0.3, {}),
    "llama-slice": ("llama", "slice", 0.25, {}),
    "gpt2-depth": ("gpt2", "depth", 0.5, {"criterion": "taylor+", "protect_first": 1, "protect_last": 0}),
    "gpt2-width": ("gpt2", "width", 0.3, {}),
    "bert-depth": ("bert", "depth", 0.5, {"criterion": "angular"}),
    "bert-width": ("bert", "width", 0.3, {}),
}


def _model(arch):
    return tiny_model(arch, **({"n_layer": 4} if arch == "gpt2" else {"num_hidden_layers": 4}))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """``{case: (dense, pruned, report, saved dir)}``."""
    tok = tiny_tokenizer()
    out = {}
    for case, (arch, structure, ratio, opts) in CASES.items():
        dense = _model(arch)
        small, report = rankwise.compress(dense, structure, ratio, calib=WINDOWS, options=opts, progress=False)
        path = tmp_path_factory.mktemp("pruned") / case
        rankwise.save(small, path, tokenizer=tok, report=report)
        out[case] = (dense, small, report, path)
    return out


PLAIN_LOAD = r"""
import json, sys
sys.modules["rankwise"] = None  # any import of rankwise now fails
import torch, transformers
out = {}
for case, path, masked, kwargs in json.loads(sys.argv[1]):
    auto = transformers.AutoModelForMaskedLM if masked else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        out[case] = model(input_ids=torch.tensor(json.loads(sys.argv[2]))).logits.flatten().tolist()
print(json.dumps(out))
"""


def _plain_logits(jobs: list) -> dict:
    """``{case: flat float32 logits of IDS}`` for ``jobs`` = ``[case, dir, masked, from_pretrained kwargs]``, each
    loaded by plain transformers in a process where rankwise cannot be imported."""
    res = subprocess.run([sys.executable, "-c", PLAIN_LOAD, json.dumps(jobs), json.dumps(IDS.tolist())],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_plain_transformers_loads_every_pruned_model_with_the_same_logits(pruned):
    got = _plain_logits([[case, str(p), CASES[case][0] == "bert", {}] for case, (_, _, _, p) in pruned.items()])
    for case, (dense, small, report, path) in pruned.items():
        want = _logits(small).flatten()
        assert np.allclose(got[case], want.numpy(), atol=1e-4), case
        assert report.model_params_after < report.model_params_before
        # smaller than dense, and not the same function
        assert not torch.allclose(_logits(dense).flatten(), want, atol=1e-3)


def _as_written(model, dense):
    """``model`` with every block linear rounded the way the GGUF file stores it, by gguf-py's own reference
    quantizer (llama.cpp's round-to-nearest): F16, or Q8_0 / Q4_0 where the inputs are a multiple of 32 and
    F16 otherwise; embeddings and norms stay float32 (``embedding_type=f32``)."""
    import copy

    from gguf import GGMLQuantizationType as T, quants

    model = copy.deepcopy(model)
    with torch.no_grad():
        for block in model.model.layers:
            for lin in (m for m in block.modules() if isinstance(m, torch.nn.Linear)):
                w = lin.weight.detach().numpy()
                if dense == "f16" or w.shape[1] % 32:
                    lin.weight.copy_(torch.from_numpy(w.astype(np.float16).astype(np.float32)))
                else:
                    qt = {"q8_0": T.Q8_0, "q4_0": T.Q4_0}[dense]
                    lin.weight.copy_(torch.from_numpy(quants.dequantize(quants.quantize(w, qt), qt).reshape(w.shape)))
    return model


def test_pruned_llamas_export_to_gguf_that_plain_transformers_reads(pruned, tmp_path):
    """Depth, width and slice (fewer blocks; fewer heads with ``head_dim`` kept, so ``key_length`` is written;
    fewer FFN channels; a 48-wide residual stream whose readers cannot be Q4_0 / Q8_0 blocks) written as F16,
    Q8_0 and Q4_0 GGUF files; transformers' GGUF reader, in a process that cannot import rankwise, gives the
    logits of the pruned model rounded as the file says."""
    from gguf import GGMLQuantizationType as T, GGUFReader

    from rankwise.export import export

    tok, jobs, want = tiny_tokenizer(), [], {}
    heads, _ = rankwise.compress(_model("llama"), "width", 0.4, calib=WINDOWS, progress=False)
    assert heads.config.num_attention_heads == 2 and heads.config.head_dim == 16  # 64 / 2 != 16: key_length
    models = {"llama-depth": pruned["llama-depth"][1], "llama-width": heads, "llama-slice": pruned["llama-slice"][1]}
    assert models["llama-slice"].config.hidden_size == 48
    for case, small in models.items():
        for dense in ("f16", "q8_0", "q4_0"):
            name = f"{case}-{dense}"
            export(small, "gguf", tmp_path / name, tokenizer=tok, progress=False,
                   options={"dense_type": dense, "embedding_type": "f32"})
            reader = GGUFReader(tmp_path / name / "model.gguf")
            fields = {f.name: f.contents() for f in reader.fields.values()}
            cfg = small.config
            assert fields["llama.block_count"] == cfg.num_hidden_layers
            assert fields["llama.embedding_length"] == cfg.hidden_size
            assert fields["llama.feed_forward_length"] == cfg.intermediate_size
            assert fields["llama.attention.head_count"] == cfg.num_attention_heads
            if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:  # llama.cpp would assume hidden / heads
                assert fields["llama.attention.key_length"] == fields["llama.attention.value_length"] == cfg.head_dim
            types = {t.name: t.tensor_type for t in reader.tensors}
            down_in = small.model.layers[0].mlp.down_proj.in_features
            assert types["blk.0.ffn_down.weight"] == (T.F16 if dense == "f16" or down_in % 32 else T[dense.upper()])
            assert types["blk.0.attn_q.weight"] == (T.F16 if dense == "f16" or cfg.hidden_size % 32 else
                                                    T[dense.upper()])
            jobs.append([name, str(tmp_path / name), False, {"gguf_file": "model.gguf"}])
            want[name] = _logits(_as_written(small, dense)).flatten().numpy()
    got = _plain_logits(jobs)
    for name, ref in want.items():
        rel = np.abs(np.asarray(got[name]) - ref).max() / np.abs(ref).max()
        assert rel < 1e-4, (name, rel)


def test_pruned_models_evaluate_and_record_what_was_removed(pruned):
    tok = tiny_tokenizer()
    for case, (dense, small, report, path) in pruned.items():
        meta = json.loads((path / "rankwise.json").read_text())
        rec = meta["pruning"]
        assert meta["layers"] == {} and meta["structure"] == CASES[case][1]
        assert report.achieved_ratio >= CASES[case][2] - 0.05
        if CASES[case][1] == "depth":
            assert len(rec["removed_blocks"]) == 2 and len(rec["kept_blocks"]) == 2 and rec["scores"]
            assert small.config.num_hidden_layers == 2
        elif CASES[case][1] == "slice":
            assert (rec["hidden_before"], rec["hidden_after"]) == (64, 48) == (64, small.config.hidden_size)
            assert 0.5 < rec["energy_kept"] < 1.0 and len(rec["eigenvalues"]) == 64
        else:
            assert len(rec["blocks"]) == 4 and all("kept_channels" in b and "kept_heads" in b for b in rec["blocks"])
            assert rec["options_table"]
            assert rec["weighting"] == ("stream" if CASES[case][0] == "bert" else "fisher")
        if CASES[case][0] != "bert":
            model, _, _ = rankwise.load(path)
            ppl = perplexity(model, tok, text=TINY_TEXT, seqlen=16, windows=2).ppl
            assert np.isfinite(ppl) and ppl > 1.0
            assert torch.allclose(_logits(model), _logits(small), atol=1e-5)


def test_width_prunes_heads_evenly_and_refits_the_reader_by_least_squares():
    """Block 0's o_proj reads the same inputs in the dense and the pruned model: with the ridge fixed
    at 0 its refit is numpy's least squares of the dense output on the kept heads' inputs."""
    dense = _model("llama")
    small, report = rankwise.compress(dense, "width", 0.3, calib=WINDOWS, options={"parts": "heads,channels"},
                                      refit_ridge=0.0, progress=False)
    rec = report.pruning["blocks"][0]
    assert small.config.num_attention_heads * 2 >= 2 and small.config.num_attention_heads % small.config.num_key_value_heads == 0
    captured = []
    hook = dense.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        for s in range(0, 8, 4):
            dense(input_ids=WINDOWS[s:s + 4])
    hook.remove()
    X = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).double().numpy()
    W = dense.model.layers[0].self_attn.o_proj.weight.detach().double().numpy()
    cols = [c for h in rec["kept_heads"] for c in range(16 * h, 16 * h + 16)]
    sol, *_ = np.linalg.lstsq(X[:, cols], X @ W.T, rcond=None)
    got = small.model.layers[0].self_attn.o_proj.weight.detach().double().numpy()
    assert got.shape == (64, len(cols))
    assert np.allclose(got, sol.T, atol=2e-4 * np.abs(sol).max())


def test_width_refit_all_layers_plain_and_loadable():
    dense = _model("llama")
    small, report = rankwise.compress(dense, "width", 0.15, calib=WINDOWS, options={"refit": "all", "parts": "heads"},
                                      progress=False)  # a whole KV group: every linear of every block is fitted
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 1)
    assert report.pruning["refit"] == "all" and torch.isfinite(_logits(small)).all()
    assert all(type(m).__name__ != "ColumnSubsetLinear" for m in small.modules())
    from rankwise.models.saved import check_config_shapes
    check_config_shapes(small)


def test_per_block_widths_stay_in_memory_and_refuse_a_plain_save(tmp_path):
    dense = _model("llama")
    small, report = rankwise.compress(dense, "width", 0.3, calib=WINDOWS, options={"widths": "per-block"},
                                      progress=False)
    assert torch.isfinite(_logits(small)).all()
    assert report.achieved_ratio >= 0.3 - 1e-9
    attrs = small.config.rankwise_attributes  # what the remote-code export's per-layer table reads
    assert [a["num_key_value_groups"] for a in attrs.values()] == \
        [b.self_attn.num_key_value_groups for b in small.model.layers]
    with pytest.raises(ArtifactError, match="remote code"):
        rankwise.save(small, tmp_path / "pb", report=report)
    assert not (tmp_path / "pb").exists()


@pytest.mark.parametrize("structure, ratio, options, match", [
    ("width", 0.97, {}, "keeps at least one KV group and 32 FFN channels per block; the largest feasible ratio is 0.66"),
    ("width", 0.7, {"parts": "channels"}, "largest feasible ratio is 0.5"),
    ("depth", 0.95, {}, "largest feasible ratio is 0.75"),
    ("depth", 0.25, {"criterion": "taylor+"}, "protects the first 4 and last 2"),
])
def test_infeasible_ratios_name_the_largest_feasible_one(structure, ratio, options, match):
    model = _model("llama")
    with pytest.raises(ConfigError, match=match):
        rankwise.compress(model, structure, ratio, calib=WINDOWS, options=options, progress=False)


def test_configs_that_cannot_express_the_shape_name_the_option_that_can():
    with pytest.raises(ConfigError, match="parts=channels"):
        rankwise.compress(_model("gpt2"), "width", 0.3, calib=WINDOWS, options={"parts": "heads,channels"},
                          progress=False)
    with pytest.raises(ConfigError, match="criterion=angular"):
        rankwise.compress(_model("bert"), "depth", 0.5, calib=WINDOWS, progress=False)
    with pytest.raises(ConfigError, match="use --structure width or depth"):
        rankwise.compress(_model("gpt2"), "slice", 0.25, calib=WINDOWS, progress=False)
    with pytest.raises(ConfigError, match="use --structure width or depth"):
        rankwise.compress(_model("bert"), "slice", 0.25, calib=WINDOWS, progress=False)
    with pytest.raises(ConfigError, match="--targets does not apply"):
        rankwise.compress(_model("llama"), "depth", 0.5, calib=WINDOWS, targets="q_proj", progress=False)


def test_a_pruned_model_compresses_further_and_round_trips(pruned, tmp_path):
    tok = tiny_tokenizer()
    model, _, _ = rankwise.load(pruned["llama-width"][3])
    low, report = rankwise.compress(model, "lowrank", 0.3, calib=WINDOWS, progress=False)
    assert report.achieved_ratio > 0.25
    rankwise.save(low, tmp_path / "chain", tokenizer=tok, report=report)
    back, _, _ = rankwise.load(tmp_path / "chain")
    assert torch.allclose(_logits(back), _logits(low), atol=1e-5)
    assert np.isfinite(perplexity(back, tok, text=TINY_TEXT, seqlen=16, windows=2).ppl)


def test_healing_distils_the_pruned_model_from_the_dense_one():
    dense = _model("llama")
    small, report = rankwise.compress(dense, "depth", 0.5, calib=WINDOWS, progress=False)
    healed, rep2 = rankwise.compress(dense, "depth", 0.5, calib=WINDOWS, progress=False,
                                     heal={"steps": 12, "lr": 3e-3, "rank": 4})
    h = rep2.healing
    assert h["loss"] == "kl-to-dense" and h["loss_last"] < h["loss_first"]
    assert h["layers"] == 7 * len(small.model.layers)  # q/k/v/o/gate/up/down of every kept block

    def kl(model):
        t = _logits(dense, WINDOWS).log_softmax(-1)
        s = _logits(model, WINDOWS).log_softmax(-1)
        return float((t.exp() * (t - s)).sum(-1).mean())

    assert kl(healed) < kl(small)
    assert sum(p.numel() for p in healed.parameters()) == sum(p.numel() for p in small.parameters())
    assert all(type(m).__name__ in ("Linear", "LlamaDecoderLayer") or "Lora" not in type(m).__name__
               for m in healed.modules())


def test_slice_keeps_the_principal_directions():
    """The PCA rotation loses less than a random orthonormal basis of the same width (same fold)."""
    from rankwise.models.stream import fold_norms, rotate_stream, stream_layout

    dense = _model("llama")
    small, report = rankwise.compress(dense, "slice", 0.25, calib=WINDOWS, progress=False)
    rand = tiny_model("llama", num_hidden_layers=4)
    rand.load_state_dict(dense.state_dict())
    layout = stream_layout(rand)
    fold_norms(rand, layout)
    Q, _ = torch.linalg.qr(torch.randn(64, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    rotate_stream(rand, Q, layout)

    def err(model):
        return float((_logits(model, WINDOWS) - _logits(dense, WINDOWS)).norm())

    assert err(small) < 0.8 * err(rand)


def test_cli_prunes_to_a_plain_directory_and_fails_cleanly_before_writing(tiny_dir, tmp_path, capsys):
    from rankwise.cli import main

    base = ["compress", str(tiny_dir), "--calib-windows", "8", "--calib-seqlen", "32", "--quiet"]
    assert main(base + ["--structure", "depth", "--ratio", "0.5", "--out", str(tmp_path / "d")]) == 0
    meta = json.loads((tmp_path / "d" / "rankwise.json").read_text())
    assert meta["pruning"]["blocks_after"] == 1 and (tmp_path / "d" / "config.json").is_file()
    capsys.readouterr()
    for extra, match in ((["--structure", "depth", "--ratio", "0.9"], "largest feasible ratio is 0.5"),
                         (["--structure", "width", "--set", "widths=per-block"], "remote code"),
                         (["--structure", "width", "--low-memory"], "drop --low-memory")):
        rc = main(base + extra + ["--out", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and match in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "x").exists()


def test_slice_with_the_refit_computes_what_it_fitted(monkeypatch):
    """``--refit``: the engine's pass runs on the rotated model with the cut directions zeroed, which the
    final cut must reproduce (up to the norms' eps); the result is a plain model."""
    import rankwise.compression.methods.slice as slice_mod

    real, seen = slice_mod.rotate_stream, []

    def spy(model, Q, layout=None):
        if Q.shape[0] != Q.shape[1]:  # the cut: logits just before and just after
            seen.append(_logits(model))
            real(model, Q, layout)
            seen.append(_logits(model))
        else:
            real(model, Q, layout)

    monkeypatch.setattr(slice_mod, "rotate_stream", spy)
    dense = _model("llama")
    small, report = rankwise.compress(dense, "slice", 0.25, calib=WINDOWS, refit=True, progress=False)
    assert len(seen) == 2 and torch.allclose(seen[0], seen[1], atol=2e-3 * float(seen[0].abs().max()))
    assert report.refit and report.pruning["hidden_after"] == small.config.hidden_size == 48
    assert torch.isfinite(_logits(small)).all()
    assert not any(type(m).__name__ == "ColumnSubsetLinear" for m in small.modules())


def test_output_fisher_is_the_squared_loss_gradient_of_the_layer_output():
    """Against an independent route: a zero tensor added to the layer's output, differentiated."""
    from rankwise.calibration.gradients import output_fisher

    model = _model("llama")
    name = "model.layers.1.self_attn.o_proj"
    got = output_fisher(model, WINDOWS[:2], [name], batch_size=2)[name]
    layer = model.get_submodule(name)
    delta = torch.zeros(2, WINDOWS.shape[1], layer.out_features, requires_grad=True)
    handle = layer.register_forward_hook(lambda m, a, out: out + delta)
    logits = model(input_ids=WINDOWS[:2]).logits[:, :-1]
    handle.remove()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), WINDOWS[:2, 1:].flatten(), reduction="sum")
    loss.backward()
    want = delta.grad.double().square().sum((0, 1)) / (2 * (WINDOWS.shape[1] - 1))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-12)
