"""Low-rank compression quality against the official SVD-LLM numbers, on the same text, as users run it.

Every row is the command a user types, run in a fresh subprocess and timed from outside (peak RSS of the
whole process from ``/usr/bin/time -v``; the compression seconds are rankwise's own ``report.seconds``,
the part the official numbers measure: calibration, statistics, factorization)::

    rankwise compress --calib-file DIR/wiki_calib.txt --eval-file DIR/wiki_test.txt --ratio R [OPTIONS] \\
        --eval --out TMP --quiet

Protocol (../shared/reference/reference.md): 64 x 512 calibration windows at seeded starts of
wiki_calib.txt (seed 3), perplexity over the first 64 non-overlapping 512-token windows of wiki_test.txt.
Rows are appended to ``results/svd_llm_reference.jsonl`` as they finish (the run can be resumed; a row
already there is skipped); ``--render`` writes the Markdown table for BENCHMARKS.md.

    python ../shared/reference/make_text.py /tmp/ref
    python benchmarks/svd_llm_reference.py --text-dir /tmp/ref --rows default,plain --ratios 0.2,0.4,0.6
    python benchmarks/svd_llm_reference.py --text-dir /tmp/ref --rows default --ratios 0.4 --tag s17  # re-measure
    python benchmarks/svd_llm_reference.py --render
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "svd_llm_reference.jsonl"

#: The official SVD-LLM rows (reference.md): ratio -> {row: (ppl, compress seconds, peak RSS MB)}.
OFFICIAL = {
    0.2: {"whitening (step 1)": (129.27, 136, 3030), "whitening + update (step 2)": (116.67, 608, 5440)},
    0.4: {"whitening (step 1)": (524.40, 130, 2993), "whitening + update (step 2)": (397.81, 569, 5435)},
    0.6: {"whitening (step 1)": (1575.80, 135, 2972), "whitening + update (step 2)": (1865.46, 535, 6358)},
}
DENSE = 26.576

#: Row name -> extra CLI arguments (the rest of the command is shared).
ROWS = {
    "default": [],
    "plain": ["--granularity", "block", "--no-refit"],
    "subgroup": ["--granularity", "subgroup", "--no-refit"],
    "block+refit": ["--granularity", "block", "--refit"],
    "subgroup+refit": ["--granularity", "subgroup", "--refit"],
    "svd-llm-v2": ["--method", "svd-llm-v2", "--granularity", "block", "--no-refit"],
    "default+svd-llm-v2-alloc": ["--allocate", "svd-llm-v2"],
    "default+heal": ["--heal-steps", "100"],
    "default+low-memory": ["--low-memory"],
    "default+search": ["--allocate", "search"],
}


def run_row(name: str, ratio: float, text_dir: Path, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        cmd = ["rankwise", "compress", "--calib-file", str(text_dir / "wiki_calib.txt"), "--eval-file",
               str(text_dir / "wiki_test.txt"), "--ratio", str(ratio), *extra, "--eval", "--out", str(out),
               "--quiet"]
        env = dict(os.environ)
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{name} at {ratio} failed:\n{proc.stderr[-2000:]}")
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
        meta = json.loads((out / "rankwise.json").read_text())
    rep = meta["report"]
    return {"row": name, "ratio": ratio, "args": extra, "ppl": meta["perplexity"]["compressed"],
            "compress_s": rep["seconds"], "wall_s": wall, "peak_rss_mb": rss,
            "achieved_ratio": rep["achieved_ratio"], "granularity": rep["granularity"], "refit": rep["refit"],
            "allocate": rep["allocate"], "method": rep["method"], "healing": meta.get("healing"),
            "ridges": sorted({str(lr["ridge"]) for lr in rep["layers"]}),
            "seed": seed_of(extra), "validation": (rep.get("allocation") or {}).get("validation"),
            "threads": os.environ.get("OMP_NUM_THREADS", "default"),
            "load_avg_1min_at_end": os.getloadavg()[0], "when": time.strftime("%Y-%m-%d %H:%M")}


def seed_of(extra: list[str]) -> int:
    """The calibration seed of a row's command (the CLI's default 3 unless ``--seed`` is in it)."""
    return int(extra[extra.index("--seed") + 1]) if "--seed" in extra else 3


def done() -> list[dict]:
    if not OUT.is_file():
        return []
    return [json.loads(line) for line in OUT.read_text().splitlines() if line.strip()]


def render() -> str:
    rows = done()
    lines = ["| ratio | row | perplexity | vs best official | compress s | peak RSS MB | threads, how run |",
             "|---|---|---|---|---|---|---|"]
    for ratio in sorted(OFFICIAL):
        best = min(p for p, _, _ in OFFICIAL[ratio].values())
        for name, (p, s, rss) in OFFICIAL[ratio].items():
            lines.append(f"| {ratio:.0%} | official SVD-LLM {name} | {p:.2f} | {p / best:.2f}x | {s} | {rss} | "
                         "2, reference.md |")
        for r in [r for r in rows if r["ratio"] == ratio]:
            how = f"{r.get('threads', 'default')}, {r.get('via', 'CLI')}"
            lines.append(f"| {ratio:.0%} | rankwise {r['row']} | {r['ppl']:.2f} | {r['ppl'] / best:.2f}x | "
                         f"{r['compress_s']:.0f} | {r['peak_rss_mb']:.0f} | {how} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text-dir", type=Path, help="directory written by ../shared/reference/make_text.py")
    ap.add_argument("--rows", default="default,plain", help=f"comma-separated rows: {', '.join(ROWS)}")
    ap.add_argument("--ratios", default="0.2,0.4,0.6")
    ap.add_argument("--tag", default=None, help="store the rows as ROW@TAG (a re-measurement of a row already in "
                    "the results, e.g. after an engine change)")
    ap.add_argument("--seed", type=int, default=None, help="calibration seed (--seed K in every command; the "
                    "rows are stored as ROW@seedK unless --tag names them)")
    ap.add_argument("--render", action="store_true", help="print the Markdown table of the results so far")
    args = ap.parse_args()
    if args.render:
        print(render())
        return
    if args.text_dir is None:
        sys.exit("--text-dir is required (python ../shared/reference/make_text.py DIR writes it)")
    RESULTS.mkdir(exist_ok=True)
    have = {(r["row"], r["ratio"]) for r in done()}
    for ratio in [float(x) for x in args.ratios.split(",")]:
        for name in args.rows.split(","):
            tag = args.tag or (f"seed{args.seed}" if args.seed is not None else None)
            stored = f"{name}@{tag}" if tag else name
            if (stored, ratio) in have:
                continue
            extra = ROWS[name] + (["--seed", str(args.seed)] if args.seed is not None else [])
            res = run_row(stored, ratio, args.text_dir, extra)
            print(json.dumps(res), flush=True)
            with open(OUT, "a") as f:
                f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
