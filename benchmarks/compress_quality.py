"""Perplexity of every compression method x refit x ratio on the default model, one calibration pass.

Sweep (default): the dense model's calibration statistics (input covariance / abs-mean on
``--calib-windows`` x ``--calib-seqlen`` tokens, Fisher on ``--fisher-windows``) are collected ONCE;
each method factorizes every layer once; each (ratio, refit) is then a truncation + swap + eval.
This is exactly the one-shot pipeline, sharing work across configurations.

``--pipeline``: runs ``rankwise.compression.compress.compress`` end to end, one fresh subprocess per
(method, refit, mode) at ``--pipeline-ratio``, to compare one-shot vs sequential calibration and to
measure real wall time and peak RSS.

    python benchmarks/compress_quality.py --windows 16 --threads 1
    python benchmarks/compress_quality.py --pipeline --windows 16 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def sweep(args) -> dict:
    from rankwise.calibration.gradients import accumulate_gradients
    from rankwise.calibration.stats import collect_input_stats
    from rankwise.compression.allocation.budget import plan_params, uniform_rank
    from rankwise.compression.methods import METHODS, LayerStats, truncate
    from rankwise.compression.compress import calibration_windows
    from rankwise.evaluation.perplexity import perplexity
    from rankwise.models.loading import load_model
    from rankwise.models.surgery import find_linears, linear_bias, linear_shape, linear_weight, set_module
    from rankwise.structures.lowrank import LowRankLinear

    model, tok, path = load_model(args.model)
    layers = find_linears(model)
    names = list(layers)
    shapes = {n: linear_shape(m) for n, m in layers.items()}
    test_text = None
    out = {"model": str(path), "eval_windows": args.windows, "eval_seqlen": 512, "calib_windows": args.calib_windows,
           "calib_seqlen": args.calib_seqlen, "fisher_windows": args.fisher_windows, "seed": args.seed,
           "threads": torch.get_num_threads(), "ratios": args.ratios, "rows": []}

    def ppl():
        return perplexity(model, tok, text=test_text, windows=args.windows).ppl

    t = time.perf_counter()
    out["dense_ppl"] = ppl()
    out["dense_eval_seconds"] = time.perf_counter() - t
    print(f"dense ppl {out['dense_ppl']:.3f}", flush=True)

    windows, _ = calibration_windows(model, None, tok, args.calib_windows, args.calib_seqlen, args.seed)
    t = time.perf_counter()
    stats = collect_input_stats(model, windows, names, batch_size=4, cov=True)
    out["calib_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    fisher = {}
    if "fwsvd" in args.methods:
        fisher = accumulate_gradients(model, windows[: args.fisher_windows], names, batch_size=1, squared=True)
    out["fisher_seconds"] = time.perf_counter() - t
    out["rss_after_calibration_mb"] = peak_rss_mb()
    print(f"calibration {out['calib_seconds']:.0f}s fisher {out['fisher_seconds']:.0f}s", flush=True)

    facs_by_method, fact_s = {}, {}
    for method in args.methods:
        meth = METHODS[method]
        t = time.perf_counter()
        facs_by_method[method] = {n: meth.factorize(linear_weight(layers[n]).detach().float(),
                                                    LayerStats(stats[n], fisher.get(n))) for n in names}
        fact_s[method] = time.perf_counter() - t
        print(f"factorized {method} in {fact_s[method]:.0f}s", flush=True)
    out["factorize_seconds"] = fact_s
    for ratio in args.ratios:
        plan = {n: uniform_rank(m, k, ratio) for n, (m, k) in shapes.items()}
        before, after = plan_params(shapes, plan)
        for method in args.methods:
            facs = facs_by_method[method]
            for refit in ((False, True) if method in args.refit_methods else (False,)):
                t = time.perf_counter()
                for n in names:
                    if plan[n] is None:
                        continue
                    W = linear_weight(layers[n]).detach().float()
                    L, R = truncate(W, facs[n], plan[n], LayerStats(stats[n]), refit)
                    b = linear_bias(layers[n])
                    set_module(model, n, LowRankLinear.from_factors(L, R, None if b is None else b.detach()))
                apply_s = time.perf_counter() - t
                t = time.perf_counter()
                p = ppl()
                row = {"method": method, "refit": refit, "ratio": ratio, "ppl": p,
                       "removed": 1 - after / before, "apply_seconds": apply_s,
                       "eval_seconds": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb()}
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
                for n in names:
                    set_module(model, n, layers[n])
                write(args, out)
    return out


def pipeline_child(args) -> None:
    """One end-to-end compress() run (fresh process), printing a JSON line."""
    from rankwise.compression.compress import compress
    from rankwise.evaluation.perplexity import perplexity
    from rankwise.models.loading import load_model

    if args.child_cross_ridge is not None:
        import rankwise.compression.methods as methods

        methods.CROSS_RIDGE = args.child_cross_ridge
    model, tok, _ = load_model(args.model)
    rss0 = peak_rss_mb()
    t = time.perf_counter()
    model, rep = compress(model, args.child_method, args.pipeline_ratio, tokenizer=tok, refit=args.child_refit,
                          calib_windows=args.calib_windows, calib_seqlen=args.calib_seqlen, seed=args.seed,
                          sequential=args.child_mode == "sequential", fisher_windows=args.fisher_windows,
                          progress=False)
    secs = time.perf_counter() - t
    rss1 = peak_rss_mb()
    p = perplexity(model, tok, windows=args.windows).ppl
    print("RESULT " + json.dumps({"method": args.child_method, "refit": args.child_refit, "mode": rep.mode,
                                  "ratio": args.pipeline_ratio, "ppl": p, "removed": rep.achieved_ratio,
                                  "compress_seconds": secs, "peak_rss_mb": rss1,
                                  "rss_after_load_mb": rss0}), flush=True)


def pipeline(args) -> dict:
    out = {"eval_windows": args.windows, "calib_windows": args.calib_windows, "calib_seqlen": args.calib_seqlen,
           "ratio": args.pipeline_ratio, "threads": args.threads, "rows": []}
    prev = RESULTS / "compress_quality_pipeline.json"
    if args.append and prev.is_file():  # keep earlier rows measured with the same settings
        old = json.loads(prev.read_text())
        if all(old.get(k) == out[k] for k in ("eval_windows", "calib_windows", "calib_seqlen", "ratio")):
            out["rows"] = old["rows"]
    for spec in args.pipeline_runs:
        method, refit, mode, *ridge = spec.split(":")
        cmd = [sys.executable, __file__, "--child", "--child-method", method, "--child-mode", mode,
               "--windows", str(args.windows), "--calib-windows", str(args.calib_windows),
               "--calib-seqlen", str(args.calib_seqlen), "--pipeline-ratio", str(args.pipeline_ratio),
               "--threads", str(args.threads), "--fisher-windows", str(args.fisher_windows)]
        if refit == "refit":
            cmd.append("--child-refit")
        if ridge:
            cmd += ["--child-cross-ridge", ridge[0]]
        res = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if res.returncode != 0 or not line:
            raise SystemExit(f"pipeline run {spec} failed:\n{res.stderr[-3000:]}")
        row = json.loads(line[0][7:])
        if ridge:
            row["cross_ridge"] = float(ridge[0])
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        write(args, out)
    return out


def write(args, out) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    f = Path(args.out) if args.out else RESULTS / ("compress_quality_pipeline.json" if args.pipeline
                                                   else "compress_quality.json")
    f.write_text(json.dumps({**out, "command": " ".join(["python"] + sys.argv)}, indent=2) + "\n")


def render() -> str:
    """Markdown tables from the two result files (for BENCHMARKS.md)."""
    lines = []
    f = RESULTS / "compress_quality.json"
    if f.is_file():
        d = json.loads(f.read_text())
        ratios = sorted({r["ratio"] for r in d["rows"]})
        lines += [f"Dense perplexity: {d['dense_ppl']:.2f} ({d['eval_windows']} x {d['eval_seqlen']} eval windows).", "",
                  "| method | refit | " + " | ".join(f"{int(r * 100)}% removed" for r in ratios) + " |",
                  "|---|---|" + "---|" * len(ratios)]
        keys = []
        for r in d["rows"]:
            if (r["method"], r["refit"]) not in keys:
                keys.append((r["method"], r["refit"]))
        for m, rf in keys:
            cells = []
            for ratio in ratios:
                hit = [r["ppl"] for r in d["rows"] if (r["method"], r["refit"], r["ratio"]) == (m, rf, ratio)]
                cells.append(f"{hit[0]:,.2f}" if hit else "-")
            lines.append(f"| {m} | {'lstsq' if rf else 'no'} | " + " | ".join(cells) + " |")
        lines += ["", f"Calibration {d['calib_seconds']:.0f} s, Fisher {d['fisher_seconds']:.0f} s; factorize (all layers) "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in d.get("factorize_seconds", {}).items())
                  + f"; peak RSS {max(r['peak_rss_mb'] for r in d['rows']):,.0f} MB.", ""]
    f = RESULTS / "compress_quality_pipeline.json"
    if f.is_file():
        d = json.loads(f.read_text())
        lines += ["| method | refit | calibration | ppl | compress seconds | peak RSS MB |", "|---|---|---|---|---|---|"]
        for r in d["rows"]:
            lines.append(f"| {r['method']} | {'lstsq' if r['refit'] else 'no'} | {r['mode']} | {r['ppl']:,.2f} | "
                         f"{r['compress_seconds']:.0f} | {r['peak_rss_mb']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--windows", type=int, default=64, help="eval windows of 512 tokens (protocol: 64)")
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--fisher-windows", type=int, default=8)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.4, 0.2, 0.6])
    ap.add_argument("--methods", type=lambda s: s.split(","), default=["svd", "asvd", "fwsvd", "svd-llm", "svd-llm-v2"])
    ap.add_argument("--refit-methods", type=lambda s: s.split(","), default=["svd", "asvd", "fwsvd"],
                    help="methods also run with the lstsq refit (for svd-llm / svd-llm-v2 the one-shot refit "
                         "is a no-op: whitened truncation already minimizes the refit objective)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="4 eval windows, 8 calib windows, ratio 0.4 only")
    ap.add_argument("--out", default=None)
    ap.add_argument("--pipeline", action="store_true", help="end-to-end one-shot vs sequential runs")
    ap.add_argument("--pipeline-ratio", type=float, default=0.4)
    ap.add_argument("--append", action="store_true", help="add rows to an existing pipeline result file")
    ap.add_argument("--pipeline-runs", type=lambda s: s.split(","),
                    default=["svd-llm:norefit:one-shot", "svd-llm:norefit:sequential",
                             "svd-llm:refit:sequential"])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-method", default="svd-llm", help=argparse.SUPPRESS)
    ap.add_argument("--child-mode", default="sequential", help=argparse.SUPPRESS)
    ap.add_argument("--child-refit", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-cross-ridge", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--render", action="store_true", help="print the markdown tables of the saved results")
    args = ap.parse_args()
    if args.render:
        return print(render())
    if args.quick:
        args.windows, args.calib_windows, args.ratios = 4, 8, [0.4]
    torch.set_num_threads(args.threads)
    if args.child:
        return pipeline_child(args)
    out = pipeline(args) if args.pipeline else sweep(args)
    write(args, out)


if __name__ == "__main__":
    main()
