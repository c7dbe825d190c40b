"""Cached hidden states on disk (``--low-memory``): bit-exact round trips in every dtype, copy on
write between the compressed and the dense cache, files removed when no cache needs them, and a
low-memory run that really goes through the files and leaves none behind."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise.compression.compress import compress_low_memory
from rankwise.compression.engine import spill as spill_mod
from rankwise.compression.engine.spill import SpilledBatches, spill_directory
from rankwise.errors import ArtifactError
from rankwise.models.saved import load_structured

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _files(d):
    return sorted(p.name for p in d.iterdir())


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=3), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_round_trip_is_bit_exact(tmp_path_factory, shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g) * 1e3).to(dtype)
    t.view(-1)[0] = float("nan") if dtype.is_floating_point else 0  # any bit pattern survives
    with spill_directory(tmp_path_factory.mktemp("s") / "out") as files:
        x = SpilledBatches(files)
        x.append(t)
        back = x[0]
        assert back.dtype == t.dtype and back.shape == t.shape
        assert torch.equal(back.view(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_copy_on_write_and_file_lifetime(tmp_path):
    with spill_directory(tmp_path / "out") as files:
        a = SpilledBatches(files)
        for v in range(3):
            a.append(torch.full((2, 4), float(v)))
        b = a.copy()
        assert len(_files(files.dir)) == 3, "a copy shares the files"
        b[1] = torch.full((2, 4), 10.0)
        assert float(a[1][0, 0]) == 1.0 and float(b[1][0, 0]) == 10.0
        assert len(_files(files.dir)) == 4
        a[1] = torch.full((2, 4), 20.0)  # the old file of batch 1 is now unused: deleted
        assert len(_files(files.dir)) == 4
        assert [float(t[0, 0]) for t in a] == [0.0, 20.0, 2.0]
        assert [float(t[0, 0]) for t in b] == [0.0, 10.0, 2.0]
        a.close()
        assert len(_files(files.dir)) == 3, "b still needs its three files"
        b.close()
        assert _files(files.dir) == []
        d = files.dir
        assert d.parent == tmp_path and d.name.startswith(".rankwise-activations-")
    assert not d.exists()


def test_a_place_that_cannot_hold_the_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")  # the output's parent is a file: no directory can be made beside it
    with pytest.raises(ArtifactError, match="cached calibration activations.*writable"):
        with spill_directory(blocker / "out"):
            pass
    assert blocker.read_text() == "x"


def test_low_memory_run_goes_through_the_files_and_leaves_none(tmp_path, random_ids, tiny_dir, monkeypatch):
    windows = random_ids[:8 * 48].view(8, 48)
    cal = dict(calib_options=dict(windows=8, seqlen=48), progress=False)
    writes, reads = [0], [0]
    real_write, real_get = spill_mod.SpillFiles.write, SpilledBatches.__getitem__

    def write(self, t):
        writes[0] += 1
        return real_write(self, t)

    def get(self, b):
        reads[0] += 1
        return real_get(self, b)

    monkeypatch.setattr(spill_mod.SpillFiles, "write", write)
    monkeypatch.setattr(SpilledBatches, "__getitem__", get)
    compress_low_memory(tiny_dir, tmp_path / "disk", "lowrank", 0.4, calib=windows, **cal)
    n_blocks = len(load_structured(tmp_path / "disk").model.layers)
    batches, slots = 2, 4  # 8 windows, batch size 4; the dense inputs of q/k/v, o, gate/up, down
    # captured once; the compressed cache advanced after every block but the last; the dense one by the
    # dense forward of every block, which also writes its layers' inputs (engine/dense.py)
    assert writes[0] == batches + batches * (n_blocks - 1) + (1 + slots) * batches * n_blocks
    assert reads[0] > writes[0]
    before = writes[0]
    compress_low_memory(tiny_dir, tmp_path / "mem", "lowrank", 0.4, calib=windows, cache_on_disk=False, **cal)
    assert writes[0] == before, "cache_on_disk=False keeps the activations in memory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "mem"], "no spill directory left behind"
    a, b = load_structured(tmp_path / "disk").state_dict(), load_structured(tmp_path / "mem").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
