"""Perplexity at 20/40/60% removed: uniform vs spectrum vs sensitivity rank allocation, one calibration.

One-shot calibration of the dense model (``--calib-windows`` x ``--calib-seqlen``, seed 3), each layer
factorized ONCE with ``--method`` (default svd-llm, no refit); every (allocator, ratio) is then a
truncation + swap + perplexity, exactly what the one-shot pipeline does. The sensitivity table (loss
with one layer truncated, ``--sens-windows`` x ``--sens-seqlen`` tokens, ``--sens-points`` ranks per
layer) is measured once and shared by all ratios; its time is reported next to the spectrum
allocator's. ``--speed-aware`` caps every allocator with the measured break-even ranks.

    python benchmarks/allocation.py --calib-windows 16 --eval-windows 16 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--method", default="svd-llm")
    ap.add_argument("--ratios", default="0.2,0.4,0.6")
    ap.add_argument("--allocators", default="uniform,spectrum,sensitivity")
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--sens-windows", type=int, default=2)
    ap.add_argument("--sens-seqlen", type=int, default=256)
    ap.add_argument("--sens-points", type=int, default=3)
    ap.add_argument("--min-rank", type=int, default=1)
    ap.add_argument("--speed-aware", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="4 calib / 4 eval windows, ratio 0.4 only")
    ap.add_argument("--out", default=str(RESULTS / "allocation.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.calib_windows, args.eval_windows, args.ratios = 4, 4, "0.4"
    if args.threads:
        torch.set_num_threads(args.threads)

    from rankwise.calibration.stats import collect_input_stats
    from rankwise.compression.allocation.measure import make_layer_loss
    from rankwise.compression.allocation.solvers import allocate_sensitivity, allocate_spectrum
    from rankwise.compression.allocation.budget import plan_params, uniform_rank
    from rankwise.calibration.stats import LayerStats
    from rankwise.compression.methods import get_method
    from rankwise.compression.compress import calibration_windows
    from rankwise.compression.rankplot import plot_ranks
    from rankwise.evaluation.perplexity import perplexity
    from rankwise.models.loading import load_model
    from rankwise.models.surgery import find_linears, linear_bias, linear_shape, linear_weight, set_module
    from rankwise.structures.lowrank import LowRankLinear

    t_all = time.perf_counter()
    model, tok, path = load_model(args.model)
    layers = find_linears(model)
    names = list(layers)
    shapes = {n: linear_shape(m) for n, m in layers.items()}
    windows, _ = calibration_windows(model, None, tok, args.calib_windows, args.calib_seqlen, 3)
    from rankwise.calibration.corpus import load_corpus
    from rankwise.calibration.sampling import tokenize

    test_ids = tokenize(tok, load_corpus("test"))

    def ppl() -> float:
        return perplexity(model, ids=test_ids, windows=args.eval_windows).ppl

    t0 = time.perf_counter()
    stats = collect_input_stats(model, windows, names, cov=True)
    meth = get_method("lowrank", {"method": args.method})
    facs = {n: meth.factorize(linear_weight(layers[n]).detach().float(), LayerStats(stats[n])) for n in names}
    del stats
    t_factorize = time.perf_counter() - t0
    spectra = {n: facs[n].spectrum.double().numpy() for n in names}
    dense_ppl = ppl()
    print(f"dense ppl {dense_ppl:.3f}; calibration + factorization {t_factorize:.0f}s", flush=True)

    caps = None
    if args.speed_aware:
        from rankwise.compression.allocation.speed import load_speed_profile

        prof = load_speed_profile(list(shapes.values()))
        caps = {n: prof.cap(*shapes[n]) for n in names}

    memo: dict = {}
    loss_fn, base = make_layer_loss(model, windows[:args.sens_windows, :args.sens_seqlen], facs)

    def memo_loss(name, k):
        if (name, k) not in memo:
            memo[(name, k)] = loss_fn(name, k)
        return memo[(name, k)]

    def apply(plan):
        for n in names:
            k = plan[n]
            if k is not None:
                L, R = facs[n].factors(k)
                b = linear_bias(layers[n])
                set_module(model, n, LowRankLinear.from_factors(L, R, None if b is None else b.detach()))

    def restore():
        for n in names:
            set_module(model, n, layers[n])

    rows, plans40, timing = [], {}, {"calibrate_and_factorize_s": t_factorize}
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for alloc in args.allocators.split(","):
            t0 = time.perf_counter()
            if alloc == "uniform":
                plan = {n: uniform_rank(*shapes[n], ratio) for n in names}
                if caps:
                    from rankwise.compression.allocation.solvers import uniform_speed_aware

                    plan = uniform_speed_aware(ratio, shapes, caps)
            elif alloc == "spectrum":
                plan = allocate_spectrum(ratio, shapes, spectra, args.min_rank, caps)
            elif alloc == "spectrum-typed":
                from rankwise.compression.allocation.solvers import allocate_spectrum_by_type

                plan = allocate_spectrum_by_type(ratio, shapes, spectra, args.min_rank, caps)
            elif alloc.startswith(("spectrum-band", "sens-band")):  # spectrum-band[:BAND], sens-band[:BAND]
                from rankwise.compression.allocation.solvers import allocate_spectrum_banded, relative_tail

                band = float(alloc.split(":")[1]) if ":" in alloc else 0.5
                weights = None
                if alloc.startswith("sens-band"):  # w_l = measured loss increase at the uniform rank / e_l(u_l)
                    weights = {}
                    for n in names:
                        u = uniform_rank(*shapes[n], ratio)
                        e_u = relative_tail(spectra[n])[u]
                        weights[n] = max(memo_loss(n, u) - base, 1e-6) / max(e_u, 1e-12)
                plan = allocate_spectrum_banded(ratio, shapes, spectra, band, args.min_rank, caps, weights)
            elif alloc == "sensitivity":
                plan, _ = allocate_sensitivity(ratio, shapes, spectra, memo_loss, base, args.min_rank, caps,
                                               args.sens_points)
            else:
                sys.exit(f"unknown allocator {alloc}")
            dt = time.perf_counter() - t0
            timing.setdefault(f"{alloc}_s", []).append(dt)
            before, after = plan_params(shapes, plan)
            apply(plan)
            p = ppl()
            restore()
            row = {"ratio": ratio, "allocator": alloc, "ppl": p, "removed": 1 - after / before,
                   "dense_layers": sum(v is None for v in plan.values()), "allocation_seconds": dt}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if abs(ratio - 0.4) < 1e-9:
                plans40[alloc] = plan
    unif = {r["ratio"]: r["ppl"] for r in rows if r["allocator"] == "uniform"}
    for r in rows:
        if r["ratio"] in unif:
            r["ppl_vs_uniform"] = r["ppl"] / unif[r["ratio"]]
    res = {
        "benchmark": "allocation", "model": str(path), "method": args.method, "refit": False, "mode": "one-shot",
        "calib": f"{args.calib_windows} x {args.calib_seqlen}", "eval_windows": args.eval_windows,
        "sensitivity": {"windows": args.sens_windows, "seqlen": args.sens_seqlen, "points": args.sens_points,
                        "loss_evaluations": len(memo)},
        "speed_aware": bool(args.speed_aware), "min_rank": args.min_rank, "threads": torch.get_num_threads(),
        "dense_ppl": dense_ppl, "rows": rows, "timing": timing, "plans_at_0.4": plans40,
        "total_seconds": time.perf_counter() - t_all,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    if plans40:
        plot_ranks(plans40, shapes, out.with_suffix(".ranks.png"), f"{args.method}: ranks at 40% removed")
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
