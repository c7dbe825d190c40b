"""rankwise analyze vs WeightWatcher on the default model: same layers, same metrics, one run.

Both compute, per linear layer, the ESD ``sigma(W)^2``, the power-law alpha (KS-optimal xmin),
alpha_weighted, stable rank and spectral norm. WeightWatcher runs its default ``analyze()``
(full SVD by SciPy on CPU, Python loop over xmin candidates); rankwise uses float64 Gram
eigenvalues batched by shape and a vectorized fit. Reports the speed ratio, the time split
and the per-layer |alpha difference|. Writes benchmarks/results/analyze_speed.json.

    python benchmarks/analyze_speed.py [--quick] [--threads 1] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--quick", action="store_true", help="only blocks 0-3 (28 layers)")
    ap.add_argument("--layers", default=None, help="regex of layers (default: all linear layers)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default=None, help="also time rankwise on this device (e.g. cuda)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "analyze_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)

    from rankwise.analysis.run import analyze
    from rankwise.models.loading import load_model
    from rankwise.models.surgery import find_linears

    model = load_model(args.model)[0]
    pattern = args.layers or (r"layers\.[0-3]\." if args.quick else ".*")
    names = list(find_linears(model, pattern))

    t = time.perf_counter()
    ours = analyze(model, layers=pattern, metrics="spectrum,powerlaw")
    t_ours = time.perf_counter() - t
    timing = ours.summary["timing"]
    t = time.perf_counter()
    farms = analyze(model, layers=pattern, metrics="farms")
    t_farms = time.perf_counter() - t

    gpu = None
    if args.device:
        analyze(model, layers=names[0], metrics="spectrum,powerlaw", device=args.device)  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        g = analyze(model, layers=pattern, metrics="spectrum,powerlaw", device=args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        gpu = {"device": args.device, "name": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
               "total_s": time.perf_counter() - t, **{k: v for k, v in g.summary["timing"].items()},
               "max_abs_alpha_diff_vs_cpu": max(abs(a["alpha"] - b["alpha"]) for a, b in zip(g.layers, ours.layers))}

    import weightwatcher as ww

    watcher = ww.WeightWatcher(model=model)
    desc = watcher.describe()
    ids = [int(i) for i, n in zip(desc["layer_id"], desc["longname"]) if n in set(names)]
    t = time.perf_counter()
    details = watcher.analyze(layers=ids)
    t_ww = time.perf_counter() - t
    # WeightWatcher's own decomposition step alone (what it calls on CPU): SciPy SVD of float64 W.
    import scipy.linalg as sl

    from rankwise.models.surgery import linear_weight

    t = time.perf_counter()
    for n in names:
        sl.svd(linear_weight(model.get_submodule(n)).detach().double().numpy(), compute_uv=False)
    t_ww_svd = time.perf_counter() - t

    ww_alpha = dict(zip(details["longname"], details["alpha"]))
    rows = []
    for r in ours.layers:
        a_ww = float(ww_alpha[r["name"]]) if r["name"] in ww_alpha else None
        rows.append({"name": r["name"], "alpha": r["alpha"], "alpha_ww": a_ww,
                     "abs_diff": None if (a_ww is None or r["alpha"] is None) else abs(r["alpha"] - a_ww)})
    diffs = [x["abs_diff"] for x in rows if x["abs_diff"] is not None]
    res = {
        "command": "python benchmarks/analyze_speed.py " + " ".join(
            a for a in ["--quick" if args.quick else "", f"--threads {args.threads}",
                        f"--layers '{args.layers}'" if args.layers else "",
                        f"--device {args.device}" if args.device else ""] if a),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": args.threads, "note": "shared CPU; absolute seconds are noisy, ratios less so"},
        "model": args.model, "layers": len(names), "ww_layers": len(details),
        "rankwise_s": t_ours, "rankwise_decomposition_s": timing["decomposition_s"],
        "rankwise_fitting_s": timing["metrics_s"],
        "weightwatcher_s": t_ww, "weightwatcher_svd_only_s": t_ww_svd,
        "speedup": t_ww / t_ours,
        "farms_extra_s": t_farms,
        "alpha_max_abs_diff": max(diffs) if diffs else None,
        "alpha_layers_over_0.05": sum(d > 0.05 for d in diffs),
        "alpha_layers_compared": len(diffs),
        "gpu": gpu,
        "per_layer": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "per_layer"}, indent=2))


if __name__ == "__main__":
    main()
