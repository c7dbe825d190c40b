"""Activation error of each structure's fit on real SmolLM2 layers, against low rank at the same budget.

For a few layers (default: q_proj of block 12, k_proj of block 1, gate_proj of block 12, down_proj of
block 25) the input covariance ``C`` is collected from the dense model on ``--windows`` calibration
windows; each method plans the layer at ``--ratios`` of its weights removed (default options) and
fits it. Reported: ``||(W - W') X||_F / ||W X||_F`` (from ``C``), the fit time, and low rank's
(whitened SVD, SVD-LLM) error at the same budget. A method that cannot take the budget (2:4 at 60%)
is reported as ``null`` with its error message.

    python benchmarks/structure_fit_error.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LAYERS = ["model.layers.12.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.12.mlp.gate_proj",
          "model.layers.25.mlp.down_proj"]
METHODS = [("lowrank-sparse", {}), ("lowrank-sparse", {"pattern": "2:4"}), ("prune", {}), ("prune", {"pattern": "2:4"}),
           ("monarch", {}), ("blockdiag-lowrank", {}), ("kronecker", {})]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", nargs="+", default=LAYERS)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.4, 0.6])
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "structure_fit_error.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from rankwise.calibration.corpus import load_corpus
    from rankwise.calibration.sampling import calib_windows, tokenize
    from rankwise.calibration.stats import LayerStats, collect_input_stats
    from rankwise.compression.methods.base import get_method
    from rankwise.errors import RankwiseError
    from rankwise.linalg import activation_error, whitened_svd
    from rankwise.models.loading import load_model

    model, tok, path = load_model()
    model.float().eval()
    windows = calib_windows(tokenize(tok, load_corpus("calib")), args.windows, args.seqlen, args.seed)
    stats = collect_input_stats(model, windows, args.layers)
    modules = dict(model.named_modules())
    rows = []
    for name in args.layers:
        W = modules[name].weight.detach().float()
        st = LayerStats(stats[name])
        C = st.covariance()
        m, n = W.shape
        base = activation_error(W, torch.zeros_like(W), C)
        fac = whitened_svd(W, C, dtype=torch.float64)
        for ratio in args.ratios:
            target = (1.0 - ratio) * m * n
            row = {"layer": name, "shape": [m, n], "ratio": ratio, "lowrank": fac.error(int(target // (m + n))) / base}
            for meth, opts in METHODS:
                key = meth + "".join(f" {k}={v}" for k, v in opts.items())
                method = get_method(meth, **opts)
                try:
                    spec = method.plan_layer((m, n), target)
                except RankwiseError as e:
                    row[key] = {"error": None, "message": str(e)}
                    continue
                t0 = time.perf_counter()
                layer = method.fit(W, None, st, spec)
                row[key] = {"error": activation_error(W, layer.weight, C) / base, "seconds": time.perf_counter() - t0,
                            "stored_fraction": layer.num_stored() / (m * n), "spec": layer.spec()}
            rows.append(row)
            print(json.dumps({k: (v if not isinstance(v, dict) else v["error"]) for k, v in row.items()}), flush=True)
    result = {"benchmark": "structure_fit_error", "model": str(path), "windows": args.windows, "seqlen": args.seqlen,
              "seed": args.seed, "threads": args.threads, "metric": "||(W - W') X||_F / ||W X||_F", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
