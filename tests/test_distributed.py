"""Data and layer parallel compression on torch.distributed: 2 gloo processes on a tiny model give the
single-process result (same ranks, ridges and report; factors within float64 summation-order noise),
bad input fails on every rank with the same message, and a dying rank leaves no output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from rankwise.compression.compress import compress, compress_low_memory
from rankwise.compression.engine.distributed import Comm, leave, shutdown
from rankwise.compression.saving import save_compressed
from rankwise.models.loading import load_model
from rankwise.models.saved import load_structured
from rankwise.models.tiny import save_tiny

#: The 2-rank result vs one process. The statistics are the same float64 sums added in another order
#: (each rank's batches, then all_reduce), so factors agree to float32 rounding wherever the whitening
#: is well conditioned; where a layer's inputs are nearly rank deficient (o_proj under the refit) the
#: factors differ along directions the inputs never take. Each layer is therefore compared by what it
#: computes on the calibration inputs X: ||(W'_1 - W'_2) X||_F <= REL * ||W'_1 X||_F, and the logits.
REL, LOGITS_REL = 1e-4, 1e-5
WINDOWS = dict(n=12, L=40)  # 3 batches of 4: rank 0 runs batches 0 and 2, rank 1 batch 1
CAL = dict(calib_options=dict(windows=12, seqlen=40), progress=False)
JOBS = {
    # low memory, sequential refit with the ridge chosen on held-out windows (batch 2: rank 0 only)
    "low-refit": dict(low=True, engine=dict(refit=True, granularity="subgroup")),
    # in memory, plain svd-llm (block granularity, no refit; the default sub-groups + refit is "low-refit")
    "mem": dict(low=False, engine=dict(granularity="block", refit=False)),
    "low-plain": dict(low=True, engine=dict(granularity="block", refit=False)),
    # every rank raises the same error
    "disagree": dict(low=True, engine=dict(), ratio_by_rank=[0.4, 0.5]),
    "exists": dict(low=True, engine=dict(), out_exists=True),
}


def _windows() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 320, (WINDOWS["n"], WINDOWS["L"]), generator=g)


def _run_job(name: str, job: dict, src: Path, out: Path, rank: int = 0):
    ratio = job.get("ratio_by_rank", [0.4, 0.4])[rank]
    if job["low"]:
        return compress_low_memory(src, out, "lowrank", ratio, calib=_windows(), engine=job["engine"], **CAL)
    model, tok, _ = load_model(src)
    model, rep = compress(model, "lowrank", ratio, calib=_windows(), engine=job["engine"], **CAL)
    if Comm.current().is_main:
        save_compressed(model, tok, out, rep)
    return rep


def _summary(rep) -> dict:
    d = rep.to_dict()
    d.pop("seconds")
    return d


def _worker(rank: int, world: int, init: str, src: str, tmp: str, jobs: list[str], die: bool) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        if die:  # rank 1 dies in its second fit: rank 0 has written block 0 into its temp output by then
            from rankwise.compression.methods.lowrank import LowRank

            real, calls = LowRank.fit, [0]

            def fit(self, *a, **k):
                calls[0] += 1
                if rank == 1 and calls[0] == 2:
                    os._exit(3)
                return real(self, *a, **k)

            LowRank.fit = fit
        for name in jobs:
            job = JOBS[name]
            out = Path(tmp) / f"dist-{name}"
            if job.get("out_exists") and rank == 0:
                out.mkdir(exist_ok=True)
            try:
                res = {"report": _summary(_run_job(name, job, Path(src), out, rank))}
            except Exception as e:  # recorded for the parent to compare
                res = {"error": type(e).__name__, "message": str(e), "trace": traceback.format_exc()[-2000:]}
            (Path(tmp) / f"{name}.rank{rank}.json").write_text(json.dumps(res, default=str))
    except BaseException:
        shutdown()
        raise
    # as an API user ends a run that succeeded (the CLI under torchrun does the same): a barrier (not
    # with a dead rank), destroy the group, then exit without the interpreter teardown (see ``leave``)
    shutdown(sync=not die)
    leave(0)


def _spawn(tmp: Path, src: Path, jobs: list[str], die: bool = False) -> None:
    mp.start_processes(_worker, args=(2, str(tmp / "pg-init"), str(src), str(tmp), jobs, die), nprocs=2,
                       start_method="spawn", join=True)


def _result(tmp: Path, name: str, rank: int) -> dict:
    return json.loads((tmp / f"{name}.rank{rank}.json").read_text())


def _assert_same_model(a_dir: Path, b_dir: Path) -> None:
    from rankwise.calibration.stats import collect_input_stats
    from rankwise.models.saved import structured_layers

    a, b = load_structured(a_dir), load_structured(b_dir)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    layers = structured_layers(a)
    assert set(layers) == set(structured_layers(b))
    for k in sa:  # everything outside the compressed layers is copied, bit for bit
        if not any(k.startswith(n + ".") for n in layers):
            assert torch.equal(sa[k], sb[k]), k
    windows = _windows()
    stats = collect_input_stats(a, windows, list(layers))
    for n, la in layers.items():
        lb = b.get_submodule(n)
        assert la.spec() == lb.spec(), n
        C = stats[n].cov
        A, D = la.dense().detach().double(), (la.dense() - lb.dense()).detach().double()
        err = float(((D @ C) * D).sum().clamp_min(0).sqrt() / ((A @ C) * A).sum().sqrt())
        assert err <= REL, (n, err)
    with torch.no_grad():
        za, zb = a(input_ids=windows).logits, b(input_ids=windows).logits
    assert float((za - zb).norm() / za.norm()) <= LOGITS_REL


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The jobs run once by 2 gloo ranks (spawned) and once in this process."""
    tmp = tmp_path_factory.mktemp("dist")
    src = save_tiny(tmp / "tiny", "llama")
    _spawn(tmp, src, list(JOBS))
    for name in ("low-refit", "mem"):
        rep = _run_job(name, JOBS[name], src, tmp / f"one-{name}")
        (tmp / f"{name}.one.json").write_text(json.dumps({"report": _summary(rep)}, default=str))
    return tmp


@pytest.mark.parametrize("name", ["low-refit", "mem"])
def test_two_gloo_ranks_equal_one_process(two_ranks, name):
    tmp = two_ranks
    one = json.loads((tmp / f"{name}.one.json").read_text())["report"]
    for rank in (0, 1):
        got = _result(tmp, name, rank)
        assert "report" in got, got.get("trace")
        rep = got["report"]
        assert [(lr["name"], lr["kind"], lr["spec"], lr["ridge"]) for lr in rep["layers"]] == \
               [(lr["name"], lr["kind"], lr["spec"], lr["ridge"]) for lr in one["layers"]]
        for a, b in zip(rep["layers"], one["layers"]):
            assert a["damping"] == pytest.approx(b["damping"], rel=1e-6, abs=1e-12)
        drop = lambda d: {k: v for k, v in d.items() if k != "layers"}  # noqa: E731
        assert drop(rep) == drop(one)
    if name == "low-refit":  # the held-out choice did run, and picked a finite ridge somewhere
        assert any(lr["ridge"] is not None for lr in one["layers"])
    _assert_same_model(tmp / f"one-{name}", tmp / f"dist-{name}")
    assert not any(p.name.startswith(f".dist-{name}") for p in tmp.iterdir()), "no temp dir left"


def test_ranks_that_disagree_fail_on_every_rank_with_one_message(two_ranks):
    r0, r1 = _result(two_ranks, "disagree", 0), _result(two_ranks, "disagree", 1)
    assert r0["error"] == r1["error"] == "ConfigError"
    assert r0["message"] == r1["message"]
    assert "disagree" in r0["message"] and "ratio" in r0["message"] and "same command" in r0["message"]
    assert not (two_ranks / "dist-disagree").exists()


def test_existing_output_on_rank0_fails_on_every_rank(two_ranks):
    r0, r1 = _result(two_ranks, "exists", 0), _result(two_ranks, "exists", 1)
    assert r0["error"] == r1["error"] == "OutputExistsError"
    assert r0["message"] == r1["message"] and "rank 0" in r0["message"] and "--overwrite" in r0["message"]
    assert list((two_ranks / "dist-exists").iterdir()) == []  # left as it was


def test_a_dying_rank_leaves_no_output(tmp_path):
    src = save_tiny(tmp_path / "tiny", "llama")
    with pytest.raises(mp.ProcessExitedException, match="exit code 3"):  # the spawner reports the dead rank
        _spawn(tmp_path, src, ["low-plain"], die=True)
    survivor = tmp_path / "low-plain.rank0.json"
    if survivor.exists():  # rank 0 saw the collective fail before the spawner stopped it
        assert "error" in json.loads(survivor.read_text())
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((".dist-", "dist-"))]
    assert leftovers == [], leftovers


def test_torchrun_cli_writes_the_single_process_model(tmp_path):
    """``torchrun --nproc-per-node 2 -m rankwise compress ... --low-memory``, the command users run."""
    src = save_tiny(tmp_path / "tiny", "llama")
    text = tmp_path / "calib.txt"
    from rankwise.models.tiny import TINY_TEXT

    text.write_text(TINY_TEXT * 40)
    args = [str(src), "--low-memory", "--calib-file", str(text), "--calib-windows", "8", "--calib-seqlen", "32",
            "-q"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src")] + sys.path),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    one = subprocess.run([sys.executable, "-m", "rankwise", "compress", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "rankwise", "compress", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    _assert_same_model(tmp_path / "one", tmp_path / "two")
    a = json.loads((tmp_path / "one" / "rankwise.json").read_text())["report"]
    b = json.loads((tmp_path / "two" / "rankwise.json").read_text())["report"]
    assert [lr["spec"] for lr in a["layers"]] == [lr["spec"] for lr in b["layers"]]
