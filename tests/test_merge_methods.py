"""Merging fine-tunes: each method against a numpy reference, directory output == in-memory output and
loads in plain transformers, PEFT adapters give the same task vectors as their merged models, bad input."""
from __future__ import annotations

import copy
import json
import numpy as np
import pytest
import torch

from rankwise.errors import ConfigError
from rankwise.linalg.task_vectors import orthogonal_update, split_rank, ties, trim
from rankwise.merging.merge import merge
from rankwise.models.tiny import tiny_model, tiny_tokenizer


def _finetune(base, seed: int, size: float = 0.02):
    """A fake fine-tune: every floating weight moved by a small random step."""
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(size * torch.randn(p.shape, generator=g) * p.detach().abs().mean())
    return ft


@pytest.fixture(scope="module")
def family():
    base = tiny_model("llama")
    return base, [_finetune(base, s) for s in (1, 2, 3)]


def _taus(base, fts, key):
    b = base.state_dict()[key].double().numpy()
    return b, [ft.state_dict()[key].double().numpy() - b for ft in fts]


def _np_ties(taus, density):
    out = []
    for t in taus:
        k = int(np.ceil(density * t.size))
        thresh = np.sort(np.abs(t).ravel())[-k]
        out.append(np.where(np.abs(t) >= thresh, t, 0.0))
    T = np.stack(out)
    sign = np.sign(T.sum(0))
    agree = (np.sign(T) == sign) & (T != 0)
    return (T * agree).sum(0) / np.maximum(agree.sum(0), 1)


def test_average_task_arithmetic_and_ties_against_numpy(family):
    base, fts = family
    key = "model.layers.1.mlp.up_proj.weight"
    b, taus = _taus(base, fts, key)
    avg, _ = merge(base, fts, "average")
    assert np.allclose(avg.state_dict()[key].numpy(), b + np.mean(taus, 0), atol=1e-6)
    ta, _ = merge(base, fts, "task-arithmetic", options={"scale": 0.4})
    assert np.allclose(ta.state_dict()[key].numpy(), b + 0.4 * np.sum(taus, 0), atol=1e-6)
    ti, _ = merge(base, fts, "ties", options={"density": 0.3, "scale": 1.0})
    assert np.allclose(ti.state_dict()[key].numpy(), b + _np_ties(taus, 0.3), atol=1e-6)


def test_ties_pieces():
    t = torch.tensor([0.1, -3.0, 2.0, 0.5])
    assert torch.equal(trim(t, 0.5), torch.tensor([0.0, -3.0, 2.0, 0.0]))
    merged = ties([torch.tensor([1.0, -2.0, 0.0]), torch.tensor([3.0, 1.0, 0.0])], density=1.0)
    assert torch.allclose(merged, torch.tensor([2.0, -2.0, 0.0]))  # sign of -2+1 is -, only -2 agrees


def test_orthogonal_update_clears_the_merged_subspace():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(8, 6, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 6, dtype=torch.float64)
    tau = torch.randn(8, 6, generator=g)
    out = orthogonal_update(M, tau, alpha=0.5).double()
    U, S, Vh = torch.linalg.svd(M, full_matrices=True)
    T = U.T @ out @ Vh.T
    r = split_rank(S, 0.5)
    assert r >= 1 and torch.allclose(T[:r, :r], torch.zeros(r, r, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(T.diagonal(), torch.zeros(6, dtype=torch.float64), atol=1e-6)
    keep = T.clone()  # everything else passes through unchanged
    ref = U.T @ tau.double() @ Vh.T
    ref[:r, :r] = 0
    ref.diagonal().zero_()
    assert torch.allclose(keep, ref, atol=1e-5)
    assert torch.allclose(orthogonal_update(torch.zeros(8, 6, dtype=torch.float64), tau), tau)
    assert split_rank(torch.tensor([3.0, 1.0]), 0.5) == 1 and split_rank(torch.tensor([1.0, 1.0]), 0.6) == 2


def test_opcm_rescales_to_the_mean_task_vector_norm_and_one_model_is_itself(family):
    base, fts = family
    merged, rep = merge(base, fts, "opcm")
    sb, sm = base.state_dict(), merged.state_dict()
    keys = list(dict.fromkeys(k for k in sb if k != "lm_head.weight"))  # tied to the embeddings
    norm = sum(float((sm[k].double() - sb[k].double()).pow(2).sum()) for k in keys) ** 0.5
    mean = np.mean([sum(float((ft.state_dict()[k].double() - sb[k].double()).pow(2).sum()) for k in keys) ** 0.5
                    for ft in fts])
    assert norm == pytest.approx(mean, rel=1e-4)
    one, _ = merge(base, fts[:1], "opcm")
    for k in keys:
        assert torch.allclose(one.state_dict()[k], fts[0].state_dict()[k], atol=1e-6)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, family):
    base, fts = family
    root = tmp_path_factory.mktemp("merge")
    tok = tiny_tokenizer()
    paths = []
    for i, m in enumerate([base, *fts]):
        d = root / f"m{i}"
        m.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
        paths.append(d)
    return root, paths


@pytest.mark.parametrize("method", ["opcm", "ties"])
def test_directory_output_equals_memory_and_loads_in_plain_transformers(saved, family, method):
    root, paths = saved
    base, fts = family
    want, _ = merge(base, fts, method)
    out, rep = merge(paths[0], paths[1:], method, root / f"out-{method}", max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file() and json.loads((out / "merge.json").read_text())["method"] == method
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()  # a plain sharded checkpoint
    x = torch.arange(12).view(1, 12)
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, want(x).logits, atol=1e-5)


def test_peft_adapters_merge_like_their_merged_models(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_model("llama")
    adapters, fulls = [], []
    for s in (1, 2):
        torch.manual_seed(s)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                              rank_pattern={"down_proj": 2}, init_lora_weights=False)
        pm = peft.get_peft_model(copy.deepcopy(base), cfg)
        with torch.no_grad():  # a fine-tune-sized update (random B would dwarf the tiny weights)
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.05)
        pm.save_pretrained(tmp_path / f"a{s}")
        adapters.append(tmp_path / f"a{s}")
        fulls.append(pm.merge_and_unload())
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    via_adapters, _ = merge(tmp_path / "base", adapters, "task-arithmetic", tmp_path / "o1", options={"scale": 0.5})
    via_models, _ = merge(base, fulls, "task-arithmetic", options={"scale": 0.5})
    from safetensors.torch import load_file

    got = load_file(str(via_adapters / "model.safetensors"))
    for k, v in got.items():
        assert torch.allclose(v, via_models.state_dict()[k], atol=1e-5), k


def test_bad_input_is_refused_before_anything_is_written(tmp_path, family):
    base, fts = family
    with pytest.raises(ConfigError, match="shape"):
        merge(base, [tiny_model("llama", intermediate_size=96)])
    with pytest.raises(ConfigError, match="does not look like a fine-tune"):
        merge(base, [tiny_model("llama", seed=7)])
    with pytest.raises(ConfigError, match="density"):
        merge(base, fts, "ties", options={"density": 1.5})
    with pytest.raises(ConfigError, match="unknown merge method"):
        merge(base, fts, "slerp")
    base.save_pretrained(tmp_path / "b", safe_serialization=True)
    with pytest.raises(ConfigError, match="does not look like a fine-tune"):
        merge(tmp_path / "b", [tiny_model("llama", seed=7)], out=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_cli_merge_and_a_wrong_option(saved, capsys):
    from rankwise.cli import main

    root, paths = saved
    out = root / "cli-out"
    assert main(["merge", *map(str, paths), "--method", "ties", "--density", "0.5", "--out", str(out), "-q"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["merge", *map(str, paths), "--method", "opcm", "--density", "0.5", "--out", str(root / "x"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--density does not apply to --method opcm (it takes: --alpha)" in err
    assert not (root / "x").exists()
