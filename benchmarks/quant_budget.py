"""One byte budget across structures (issue 23, section 3): the default byte allocation against uniform GPTQ at
the same budget, healed and unhealed, on the reference text, as users run it.

Each row x calibration seed is the command a user types, run in a fresh subprocess (peak RSS from
``/usr/bin/time -v``, the load average before and after), one per invocation so that each takes the shared
lock on its own::

    flock /work/team/heavy.lock nice -n 5 python benchmarks/quant_budget.py --row mixed-3.0 --seed 3

Rows (``ROWS``): ``mixed-B`` = ``rankwise compress --bits-per-weight B`` (the default: the ``mixed``
structure, widths / group sizes / LoRC ranks / dense chosen per layer, validated against uniform GPTQ on
held-out calibration windows) with ``--heal-steps``: the run reports the perplexity before healing (the
unhealed row: the same command without ``--heal-steps`` builds exactly that model, compression is
deterministic for a seed) and after (the healed row). ``uniform-B`` = ``rankwise compress --structure gptq
--bits-per-weight B --allocate uniform`` (one width and group size for every layer, the largest within the
budget: 2-bit g32 at 3.0, 2-bit g64 at 2.5). ``gptq-B`` = ``--structure gptq --bits-per-weight B`` (GPTQ
widths and group sizes only, and dense).

Protocol (../shared/reference/reference.md): 64 x 512 calibration windows at seeded starts of
wiki_calib.txt, perplexity on the first 64 non-overlapping 512-token windows of wiki_test.txt. Results:
``results/quant_quality/<row>-seed<k>.json``; ``--render`` prints the Markdown table (mean and spread
over the seeds present) for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "quant_quality"
TEXT = Path(os.environ.get("RANKWISE_REFTEXT", "/work/team/reftext"))
HEAL_STEPS = 100


def row_args(row: str) -> list[str]:
    kind, bpw = row.rsplit("-", 1)
    if kind == "mixed":
        return ["--bits-per-weight", bpw, "--heal-steps", str(HEAL_STEPS)]
    if kind == "mixed-noheal":
        return ["--bits-per-weight", bpw]
    if kind == "uniform":
        return ["--structure", "gptq", "--bits-per-weight", bpw, "--allocate", "uniform"]
    if kind == "gptq":
        return ["--structure", "gptq", "--bits-per-weight", bpw]
    raise SystemExit(f"unknown row {row!r}: mixed-B, mixed-noheal-B, uniform-B, gptq-B")


def layer_mix(layers: list[dict]) -> dict[str, int]:
    """``{"3-bit g128": 140, "2-bit g64 + r8": 3, "dense": 1, ...}``: layers per setting."""
    out: dict[str, int] = {}
    for lr in layers:
        s = lr.get("spec")
        key = "dense" if not s else (f"{s['bits']}-bit g{s['group_size']}"
                                     + (f" + r{s['rank']}" if s.get("rank") else ""))
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def run(row: str, seed: int) -> dict:
    extra = row_args(row)
    with tempfile.TemporaryDirectory(prefix="quant-budget-") as tmp:
        out = Path(tmp) / "model"
        cmd = ["rankwise", "compress", "--calib-file", str(TEXT / "wiki_calib.txt"), "--eval-file",
               str(TEXT / "wiki_test.txt"), "--seed", str(seed), *extra, "--eval", "--out", str(out), "--quiet"]
        load_before = Path("/proc/loadavg").read_text().split()[:3]
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        load_after = Path("/proc/loadavg").read_text().split()[:3]
        if proc.returncode != 0:
            raise SystemExit(f"{row} seed {seed} failed:\n{proc.stderr[-3000:]}")
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
        meta = json.loads((out / "rankwise.json").read_text())
    rep, ppl = meta["report"], meta["perplexity"]
    alloc = rep.get("allocation") or {}
    res = {
        "row": row, "seed": seed, "command": " ".join(cmd[:-3] + ["--out", "DIR", "--quiet"]),
        "protocol": {"calib_windows": 64, "seqlen": 512, "eval_windows": ppl["windows"], "text": str(TEXT)},
        "ppl": ppl["compressed"], "ppl_unhealed": ppl.get("before_healing"),
        "bits_per_weight": rep["bits_per_weight"], "targeted_bytes": rep["targeted_bytes_after"],
        "budget_bits_per_weight": rep["budget"].get("bits_per_weight"),
        "structure": rep["structure"], "allocate": rep["allocate"], "layers": layer_mix(rep["layers"]),
        "validation": alloc.get("validation"), "budget_use": alloc.get("budget"),
        "uniform_setting": (alloc.get("uniform") or {}).get("setting"),
        "planned": {k: v for k, v in (alloc.get("bits_greedy") or {}).items() if k != "costs"},
        "healing": meta.get("healing"), "compress_s": rep["seconds"], "wall_s": wall, "peak_rss_mb": rss,
        "loadavg_before": load_before, "loadavg_after": load_after, "when": time.strftime("%Y-%m-%d %H:%M"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{row}-seed{seed}.json").write_text(json.dumps(res, indent=1) + "\n")
    return res


def render() -> str:
    rows: dict[str, list[dict]] = {}
    for f in sorted(RESULTS.glob("*.json")):
        r = json.loads(f.read_text())
        if "seed" in r and r.get("row", "").split("-")[0] in ("mixed", "uniform", "gptq"):
            rows.setdefault(r["row"], []).append(r)

    def stat(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "-"
        m = statistics.mean(vals)
        return f"{m:,.2f}" + (f" ± {statistics.stdev(vals):,.2f}" if len(vals) > 1 else "")

    lines = ["| row | seeds | bits/weight | ppl (mean ± sd) | what was kept |", "|---|---|---:|---:|---|"]
    for name, rs in sorted(rows.items()):
        seeds = ",".join(str(r["seed"]) for r in rs)
        kept = "; ".join(sorted({(r["validation"] or {}).get("chosen", r["allocate"]) for r in rs}))
        if name.startswith("mixed-") and not name.startswith("mixed-noheal"):
            lines.append(f"| {name} unhealed | {seeds} | {stat([r['bits_per_weight'] for r in rs])} | "
                         f"{stat([r['ppl_unhealed'] for r in rs])} | {kept} |")
            lines.append(f"| {name} healed ({HEAL_STEPS} steps) | {seeds} | {stat([r['bits_per_weight'] for r in rs])} "
                         f"| {stat([r['ppl'] for r in rs])} | {kept} |")
        else:
            lines.append(f"| {name} | {seeds} | {stat([r['bits_per_weight'] for r in rs])} | "
                         f"{stat([r['ppl'] for r in rs])} | {kept} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--row")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--render", action="store_true")
    a = ap.parse_args()
    if a.render:
        print(render())
        return
    if not a.row:
        sys.exit("--row or --render")
    res = run(a.row, a.seed)
    print(json.dumps({k: res[k] for k in ("row", "seed", "ppl", "ppl_unhealed", "bits_per_weight", "validation",
                                          "compress_s", "wall_s")}, indent=1))


if __name__ == "__main__":
    main()
