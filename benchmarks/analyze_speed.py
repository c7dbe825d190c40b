"""`rankwise analyze` as a user runs it against WeightWatcher as its users call it, one run, same machine.

Each measurement is a fresh subprocess timed from outside (interpreter start-up, imports and model
load included), with the same environment for both sides (same thread settings: the defaults, or
``--threads N`` exported as OMP/MKL/OPENBLAS_NUM_THREADS to both):

* rankwise: ``rankwise analyze [MODEL] --json OUT`` -- the CLI default (metrics spectrum, powerlaw,
  farms; progress bars and the table included). ``MODEL`` defaults to the built-in default model.
* WeightWatcher: ``model = AutoModelForCausalLM.from_pretrained(path)`` then
  ``weightwatcher.WeightWatcher(model=model).analyze()`` (its defaults: every layer it supports,
  which for a causal LM includes the token embedding and the LM head).
* with ``--ww-same-layers``: also WeightWatcher restricted (``layers=ids``) to the linear layers
  rankwise analyzes by default, i.e. without the embedding and the LM head.

Runs alternate (rankwise first on even repetitions, WeightWatcher first on odd), ``--reps`` each;
the speed-up is the ratio of medians. Also recorded: each run's child CPU seconds and the load average,
rankwise's own time split, per-layer |alpha_rankwise - alpha_ww|, and the FLOP count of the
decomposition against this machine's measured matmul rate. Writes benchmarks/results/analyze_speed.json.

    python benchmarks/analyze_speed.py [--reps 3] [--threads N] [--ww-same-layers] [--model NAME]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WW_SCRIPT = r"""
import json, logging, sys, time
t0 = time.perf_counter()
from transformers import AutoModelForCausalLM
import weightwatcher as ww
logging.getLogger("weightwatcher").setLevel(logging.ERROR)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
t1 = time.perf_counter()
watcher = ww.WeightWatcher(model=model)
layers = json.loads(sys.argv[3])
if layers:
    desc = watcher.describe()
    ids = [int(i) for i, n in zip(desc["layer_id"], desc["longname"]) if n in set(layers)]
    details = watcher.analyze(layers=ids)
else:
    details = watcher.analyze()
t2 = time.perf_counter()
details[["longname", "alpha", "N", "M"]].to_csv(sys.argv[2], index=False)
print(json.dumps({"import_load_s": t1 - t0, "analyze_s": t2 - t1, "layers": len(details)}))
"""

BREAKDOWN_SCRIPT = r"""
import json, resource, sys, time
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime + r.ru_stime
t = [(time.perf_counter(), cpu())]
import rankwise.cli
t.append((time.perf_counter(), cpu()))
from rankwise.models.loading import load_model
model = load_model(sys.argv[1] or None)[0]
t.append((time.perf_counter(), cpu()))
from rankwise.analysis.run import analyze
res = analyze(model, metrics=sys.argv[2] or None)
t.append((time.perf_counter(), cpu()))
names = ["import_cli", "load_model", "analyze"]
out = {n: {"wall_s": b[0] - a[0], "cpu_s": b[1] - a[1]} for n, a, b in zip(names, t, t[1:])}
out["analyze_timing"] = res.summary["timing"]
print(json.dumps(out))
"""

FLOPS_SCRIPT = r"""
import json, time
import numpy as np, torch
def best(f, reps=5):
    f(); ts = []
    for _ in range(reps):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return min(ts)
out = {"torch_threads": torch.get_num_threads()}
n = 2048
for dt in ("float64", "float32"):
    a = np.random.default_rng(0).standard_normal((n, n)).astype(dt); ta = torch.from_numpy(a)
    out[f"numpy_matmul_{dt}_gflops"] = 2 * n**3 / best(lambda: a @ a) / 1e9
    out[f"torch_matmul_{dt}_gflops"] = 2 * n**3 / best(lambda: ta @ ta) / 1e9
g = np.random.default_rng(1).standard_normal((1536, 576)); g = g.T @ g
out["numpy_eigvalsh_576_float64_gflops"] = (4 / 3) * 576**3 / best(lambda: np.linalg.eigvalsh(g)) / 1e9
print(json.dumps(out))
"""


def _env(threads: int | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[k] = str(threads)
    return env


def _timed(cmd: list[str], env: dict, stdout=subprocess.DEVNULL) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out = {"wall_s": wall, "cpu_s": cpu, "load_before": load, "load_after": os.getloadavg()[0]}
    if stdout is subprocess.PIPE:
        out["stdout"] = p.stdout
    return out


def _rankwise_cmd(model: str | None, out: Path, metrics: str | None = None) -> list[str]:
    exe = Path(sys.executable).with_name("rankwise")
    base = [str(exe)] if exe.exists() else ([shutil.which("rankwise")] if shutil.which("rankwise") else
                                            [sys.executable, "-m", "rankwise.cli"])
    return base + ["analyze"] + ([model] if model else []) + ["--json", str(out)] + \
        (["--metrics", metrics] if metrics else [])


def _flops(shapes: list[tuple[int, int]]) -> dict:
    """FLOPs of the decomposition: Gram of the smaller side + eigenvalues-only symmetric tridiagonalization."""
    gemm = sum(2 * max(s) * min(s) ** 2 for s in shapes)          # W^T W as a general product
    syrk = sum(max(s) * min(s) * (min(s) + 1) for s in shapes)    # symmetric rank-k update (what runs)
    tri = sum(4 * min(s) ** 3 / 3 for s in shapes)                 # Householder tridiagonalization
    return {"gram_gemm_gflop": gemm / 1e9, "gram_syrk_gflop": syrk / 1e9, "tridiag_gflop": tri / 1e9,
            "total_gemm_gflop": (gemm + tri) / 1e9, "total_syrk_gflop": (syrk + tri) / 1e9}


def _median(runs: list[dict], k: str) -> float:
    return statistics.median(r[k] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model name or directory (default: rankwise's default model)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="export OMP/MKL/OPENBLAS_NUM_THREADS=N to both sides (default: leave the defaults)")
    ap.add_argument("--metrics", default=None,
                    help="pass --metrics M to rankwise (default: none, i.e. the CLI default spectrum,powerlaw,farms)")
    ap.add_argument("--ww-same-layers", action="store_true",
                    help="also time WeightWatcher restricted to the layers rankwise analyzes by default")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "analyze_speed.json"))
    args = ap.parse_args()
    env = _env(args.threads)
    sys.path.insert(0, str(ROOT / "src"))
    from rankwise.models.registry import resolve_model

    path = str(resolve_model(args.model))
    tmp = Path(tempfile.mkdtemp(prefix="analyze_speed_"))
    rw_json, ww_csv = tmp / "rankwise.json", tmp / "ww.csv"
    same_layers: list[str] = []                       # filled from rankwise's first output

    def run_rankwise() -> dict:
        r = _timed(_rankwise_cmd(args.model, rw_json, args.metrics), env)
        same_layers[:] = same_layers or [x["name"] for x in json.loads(rw_json.read_text())["layers"]]
        return r

    sides = {"rankwise": run_rankwise, "weightwatcher": lambda: _ww(path, ww_csv, [], env)}
    if args.ww_same_layers:
        sides["weightwatcher_same_layers"] = lambda: _ww(path, tmp / "ww_same.csv", same_layers, env)
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for rep in range(args.reps):                      # rep 0 starts with rankwise: same_layers is known
        for k in (list(sides) if rep % 2 == 0 else list(sides)[::-1]):
            r = sides[k]()
            runs[k].append(r)
            print(f"rep {rep} {k}: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, load {r['load_before']:.1f}",
                  flush=True)

    breakdown = json.loads(subprocess.run([sys.executable, "-c", BREAKDOWN_SCRIPT, args.model or "",
                                           args.metrics or ""], env=env,
                                          cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    flops_1 = json.loads(subprocess.run([sys.executable, "-c", FLOPS_SCRIPT], env=_env(1), capture_output=True,
                                        text=True, check=True).stdout.splitlines()[-1])
    flops_n = json.loads(subprocess.run([sys.executable, "-c", FLOPS_SCRIPT], env=env, capture_output=True,
                                        text=True, check=True).stdout.splitlines()[-1])

    ours = json.loads(rw_json.read_text())
    import csv

    ww_alpha = {r["longname"]: float(r["alpha"]) for r in csv.DictReader(ww_csv.open()) if r["alpha"]}
    per_layer, diffs = [], []
    for r in ours["layers"]:
        a = ww_alpha.get(r["name"])
        d = None if a is None or r.get("alpha") is None else abs(r["alpha"] - a)
        per_layer.append({"name": r["name"], "alpha": r.get("alpha"), "alpha_ww": a, "abs_diff": d,
                          "farms_alpha": r.get("farms_alpha")})
        if d is not None:
            diffs.append(d)
    shapes = [tuple(r["shape"]) for r in ours["layers"]]
    fl = _flops(shapes)
    dec_s = breakdown["analyze_timing"]["decomposition_s"]
    workers = breakdown["analyze_timing"]["workers"]
    peak1 = flops_1["numpy_matmul_float64_gflops"]
    med = {k: {"wall_s": _median(v, "wall_s"), "cpu_s": _median(v, "cpu_s")} for k, v in runs.items()}
    res = {
        "command": "python benchmarks/analyze_speed.py " + " ".join(
            a for a in [f"--reps {args.reps}", f"--threads {args.threads}" if args.threads else "",
                        "--ww-same-layers" if args.ww_same_layers else "",
                        f"--metrics {args.metrics}" if args.metrics else "",
                        f"--model {args.model}" if args.model else ""] if a),
        "user_commands": {"rankwise": " ".join(["rankwise", "analyze"] + ([args.model] if args.model else [])
                                               + ["--json", "out.json"]
                                               + (["--metrics", args.metrics] if args.metrics else [])),
                          "weightwatcher": "WeightWatcher(model=AutoModelForCausalLM.from_pretrained(path)).analyze()"},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads_env": args.threads or "default (all cores)", "python": platform.python_version()},
        "model": path,
        "layers": {"rankwise": len(ours["layers"]), "weightwatcher": len(ww_alpha)},
        "runs": runs,
        "median": med,
        "speedup_wall": med["weightwatcher"]["wall_s"] / med["rankwise"]["wall_s"],
        "speedup_cpu": med["weightwatcher"]["cpu_s"] / med["rankwise"]["cpu_s"],
        "speedup_wall_same_layers": (med["weightwatcher_same_layers"]["wall_s"] / med["rankwise"]["wall_s"]
                                     if "weightwatcher_same_layers" in med else None),
        "rankwise_breakdown": breakdown,
        "flops": {**fl, "matmul_1_thread": flops_1, "matmul_default_threads": flops_n,
                  "decomposition_s": dec_s, "decomposition_workers": workers,
                  "decomposition_cpu_s": breakdown["analyze_timing"]["decomposition_cpu_s"],
                  "achieved_gflops": fl["total_syrk_gflop"] / dec_s,
                  "achieved_gflops_per_cpu_s": fl["total_syrk_gflop"] / breakdown["analyze_timing"]["decomposition_cpu_s"],
                  "lapack_floor_s_1_thread": fl["gram_syrk_gflop"] / peak1
                  + fl["tridiag_gflop"] / flops_1["numpy_eigvalsh_576_float64_gflops"],
                  "bound_s_at_1_thread_matmul_rate": fl["total_syrk_gflop"] / peak1,
                  "bound_s_at_workers_x_1_thread_rate": fl["total_syrk_gflop"] / (peak1 * workers)},
        "alpha_max_abs_diff": max(diffs) if diffs else None,
        "alpha_layers_over_1e-6": sum(d > 1e-6 for d in diffs),
        "alpha_layers_compared": len(diffs),
        "per_layer": per_layer,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k not in ("per_layer", "runs")}, indent=2))


def _ww(path: str, out: Path, layers: list[str], env: dict) -> dict:
    r = _timed([sys.executable, "-c", WW_SCRIPT, path, str(out), json.dumps(layers)], env, stdout=subprocess.PIPE)
    r.update(json.loads(r.pop("stdout").strip().splitlines()[-1]))       # its own import+load / analyze split
    return r


if __name__ == "__main__":
    main()
