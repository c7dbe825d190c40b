"""Low-memory (block by block from safetensors) compression equals the in-memory path, every option."""
from __future__ import annotations

import struct

import pytest
import torch

from rankwise.compression.compress import compress, compress_low_memory
from rankwise.compression.engine import source as source_mod
from rankwise.compression.saving import save_compressed
from rankwise.errors import ConfigError
from rankwise.models.loading import load_model
from rankwise.models.saved import load_structured
from rankwise.models.streaming import stream_merge
from rankwise.models.tiny import save_tiny

CAL = dict(calib_options=dict(windows=8, seqlen=48), progress=False)
OPTIONS = [
    dict(engine=dict()),                                        # the default: sub-groups + refit
    dict(engine=dict(granularity="block", refit=False)),
    dict(engine=dict(granularity="subgroup")),
    dict(engine=dict(mode="one-shot")),
    dict(engine=dict(refit=True)),                              # ridge chosen on held-out windows
    dict(engine=dict(granularity="subgroup", refit=True, refit_ridge=0.01)),
    dict(allocate="spectrum-band"),                             # dry spectra pass streamed too
    dict(method="asvd"),
    dict(method="svd-llm-v2"),                                  # eigh truncation + its per-type allocator
]


@pytest.fixture
def windows(random_ids):
    return random_ids[:8 * 48].view(8, 48)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: str(o).replace(" ", ""))
def test_low_memory_equals_in_memory(tmp_path, windows, arch, opts):
    src = save_tiny(tmp_path / f"tiny-{arch}", arch)
    model, tok, _ = load_model(src)
    model, rep = compress(model, "lowrank", 0.4, calib=windows, **opts, **CAL)
    save_compressed(model, tok, tmp_path / "mem", rep)
    rep_low = compress_low_memory(src, tmp_path / "low", "lowrank", 0.4, calib=windows, **opts, **CAL)
    assert rep_low.ranks == rep.ranks
    assert [lr.ridge for lr in rep_low.layers] == [lr.ridge for lr in rep.layers]
    a = load_structured(tmp_path / "mem").state_dict()
    b = load_structured(tmp_path / "low").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "low" / "ranks.png").is_file() and (tmp_path / "low" / "ranks.md").is_file()


def test_interrupted_run_leaves_nothing_and_rerun_is_clean(tmp_path, windows, monkeypatch, tiny_dir):
    out = tmp_path / "out"
    real = source_mod.save_shard
    calls = {"n": 0}

    def boom(state, file):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interrupt after the first block")
        real(state, file)

    monkeypatch.setattr(source_mod, "save_shard", boom)
    with pytest.raises(KeyboardInterrupt):
        compress_low_memory(tiny_dir, out, calib=windows, **CAL)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "no temp dir left behind"
    monkeypatch.setattr(source_mod, "save_shard", real)
    compress_low_memory(tiny_dir, out, calib=windows, **CAL)
    assert load_structured(out) is not None


@pytest.mark.parametrize("allocate", ["sensitivity", "sensitivity-band"])
def test_low_memory_rejects_whole_model_allocators(tmp_path, windows, tiny_dir, allocate):
    with pytest.raises(ConfigError, match=f"--low-memory cannot use --allocate {allocate}: .*drop --low-memory"):
        compress_low_memory(tiny_dir, tmp_path / "o", allocate=allocate, calib=windows, **CAL)
    assert not (tmp_path / "o").exists()


def test_low_memory_rejects_fisher(tmp_path, windows, tiny_dir):
    with pytest.raises(ConfigError, match="gradients"):
        compress_low_memory(tiny_dir, tmp_path / "o", method="fwsvd", calib=windows, **CAL)
    assert not (tmp_path / "o").exists()


def test_layers_outside_the_blocks_are_compressed_in_memory():
    """BERT's MLM head transform is a linear layer outside the repeated blocks: one extra pass fits it."""
    from rankwise.models.tiny import tiny_model

    model, rep = compress(tiny_model("bert"), "lowrank", 0.4, targets=r"layer\.1\.output\.dense|transform\.dense",
                          calib=torch.randint(0, 320, (2000,), generator=torch.Generator().manual_seed(0)), **CAL)
    assert set(rep.ranks) == {"bert.encoder.layer.1.output.dense", "cls.predictions.transform.dense"}
    assert all(r is not None for r in rep.ranks.values())


def test_stream_merge_matches_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    a = {"x": torch.randn(3, 5, generator=g), "n": torch.arange(7)}
    b = {"y": torch.randn(4, generator=g).to(torch.bfloat16), "z": torch.zeros(0, 2)}
    save_file(a, str(tmp_path / "a.st"))
    save_file(b, str(tmp_path / "b.st"))
    stream_merge([tmp_path / "a.st", tmp_path / "b.st"], tmp_path / "m.st", {"k": "v"})
    got = load_file(str(tmp_path / "m.st"))
    assert got.keys() == {"x", "n", "y", "z"}
    for k, v in {**a, **b}.items():
        assert torch.equal(got[k], v) and got[k].dtype == v.dtype
    raw = (tmp_path / "m.st").read_bytes()
    assert struct.unpack("<Q", raw[:8])[0] % 8 == 0


def test_skeleton_never_moves_to_the_compute_device(tmp_path, windows, tiny_dir, monkeypatch):
    """With a compute device other than the weights' home, only one decoder block at a time is moved
    there: ``.to(device)`` is never called on the meta skeleton (or anything outside the blocks), and
    when a block is loaded every other block and the embeddings are still on ``meta``."""
    import rankwise.compression.compress as compress_mod
    from rankwise.compression.engine.source import StreamedSource

    other = torch.device("cpu", 0)  # compares unequal to the home device "cpu": the moves happen
    monkeypatch.setattr(compress_mod, "run_device", lambda cfg, dtype, comm: other)
    moved, loads = [], []
    real_to, real_load = torch.nn.Module.to, StreamedSource.load

    def to(self, *args, **kwargs):
        dev = kwargs.get("device", args[0] if args else None)
        if dev is not None and not isinstance(dev, torch.dtype) and torch.device(dev) == other:
            moved.append(self)
        return real_to(self, *args, **kwargs)

    def load(self, i):
        block = real_load(self, i)
        resident = [j for j, b in enumerate(self.blocks) if any(not p.is_meta for p in b.parameters())]
        assert resident == [i]
        assert self.model.get_input_embeddings().weight.is_meta
        loads.append((self.blocks, i))
        return block

    monkeypatch.setattr(torch.nn.Module, "to", to)
    monkeypatch.setattr(StreamedSource, "load", load)
    compress_low_memory(tiny_dir, tmp_path / "o", "lowrank", 0.4, calib=windows, **CAL)
    blocks = loads[0][0]
    assert [i for _, i in loads] == list(range(len(blocks)))
    assert moved and all(any(m is b for b in blocks) for m in moved), \
        f"moved to the device: {sorted({type(m).__name__ for m in moved})}"
