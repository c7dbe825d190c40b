"""How good is the default candidate measurement of GPTQ (``measure="estimate"``) on SmolLM2's layers?

For the 7 layers of a few blocks, on the dense model's input covariances (one-shot, ``--windows`` x 512
calibration windows of the reference text, seed 3), every GPTQ candidate of the default grid (widths
2, 3, 4 x group sizes 32, 64, 128) is fitted (``measure="exact"``) and compared with the estimate
(GPTQ run at g128 only, the other group sizes scaled by round-to-nearest's ratio). Reports the ratio
estimate / exact per (width, group size) and the seconds of each measurement::

    flock /work/team/heavy.lock nice -n 5 python benchmarks/quant_candidates_estimate.py --blocks 0,15,29

Writes ``results/quant_candidates_estimate.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from rankwise.calibration.sampling import calib_windows, tokenize
from rankwise.calibration.stats import collect_input_stats
from rankwise.compression.methods.base import CandidateGrid, LayerStats, get_method
from rankwise.models.loading import load_model
from rankwise.models.surgery import find_linears

OUT = Path(__file__).parent / "results" / "quant_candidates_estimate.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", default="0,15,29")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--text", default="/work/team/reftext/wiki_calib.txt")
    a = ap.parse_args()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    model, tok, _ = load_model(None)
    ids = tokenize(tok, Path(a.text).read_text())
    windows = calib_windows(ids, a.windows, 512, 3)
    blocks = [int(b) for b in a.blocks.split(",")]
    names = [n for n in find_linears(model) if int(n.split(".")[2]) in blocks]
    stats = collect_input_stats(model, windows, names)
    meth = get_method("gptq")
    grid = dict(widths=(2, 3, 4), group_sizes=(32, 64, 128))
    rows, secs = [], {"estimate": 0.0, "exact": 0.0}
    for n in names:
        W = model.get_submodule(n).weight.detach().float()
        st = LayerStats(stats[n])
        got = {}
        for how in ("estimate", "exact"):
            t0 = time.perf_counter()
            got[how] = {(c.spec["bits"], c.spec["group_size"]): c.cost
                        for c in meth.candidates(W, st, CandidateGrid(**grid, measure=how))}
            secs[how] += time.perf_counter() - t0
        for key in got["exact"]:
            rows.append({"layer": n, "bits": key[0], "group_size": key[1], "exact": got["exact"][key],
                         "estimate": got["estimate"][key], "ratio": got["estimate"][key] / got["exact"][key]})
        print(n, {f"{b}b g{g}": round(got["estimate"][b, g] / got["exact"][b, g], 3) for b, g in got["exact"]},
              flush=True)
    summary = {}
    for b in grid["widths"]:
        for g in grid["group_sizes"]:
            r = [x["ratio"] for x in rows if x["bits"] == b and x["group_size"] == g]
            summary[f"{b}-bit g{g}"] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
    res = {"blocks": blocks, "windows": a.windows, "layers": len(names), "seconds": secs, "summary": summary,
           "rows": rows, "loadavg_before": load_before, "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
           "threads": torch.get_num_threads()}
    OUT.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({"seconds": secs, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
