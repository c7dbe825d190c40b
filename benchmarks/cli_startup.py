"""Start-up time of ``rankwise --help``: median wall time of N fresh interpreters.

    .venv/bin/python benchmarks/cli_startup.py                      # this checkout's src/
    .venv/bin/python benchmarks/cli_startup.py --src /tmp/old/src --label before

Each run is ``python -m rankwise.cli --help`` with ``PYTHONPATH=<src>``; the result (all runs, median,
min) is merged into ``benchmarks/results/cli_startup.json`` under ``--label``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def time_runs(src: Path, runs: int, args: list[str]) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "rankwise.cli", *args], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=ROOT / "src")
    ap.add_argument("--label", default="after")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cli_startup.json")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from rankwise.files import write_json

    res = {}
    for name, args in (("help", ["--help"]), ("eval_help", ["eval", "--help"])):
        t = time_runs(a.src, a.runs, args)
        res[name] = {"median_s": round(statistics.median(t), 3), "min_s": round(min(t), 3),
                     "runs_s": [round(x, 3) for x in t]}
        print(f"{a.label} rankwise {' '.join(args)}: median {res[name]['median_s']:.2f} s over {a.runs} runs")
    data = json.loads(a.out.read_text()) if a.out.is_file() else {}
    data[a.label] = {"src": str(a.src), "python": sys.version.split()[0], **res}
    write_json(a.out, data)


if __name__ == "__main__":
    main()
