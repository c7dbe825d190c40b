"""Per-layer GPTQ / RTN error of SmolLM2 as it is, with its norms folded, and folded + rotated.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/rotation_layers.py

The three models compute the same function (:mod:`rankwise.models.stream`), so the relative output
error of a layer, ``tr((W - Q) H (W - Q)^T) / tr(W H W^T)`` with ``H`` its one-shot input covariance
(8 x 512 calibration windows of the reference text, seed 3), compares like with like. Writes
``results/rotation_layers.json``; prints, per layer, the ratio of each variant's error to the plain
model's.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gptq_parity import REFTEXT, collect_hessians  # noqa: E402

LAYERS = [f"model.layers.{i}.{p}" for i in (2, 15, 28)
          for p in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")]


def main() -> None:
    from rankwise.calibration.sampling import calib_windows, tokenize
    from rankwise.linalg.gptq import gptq, quant_objective
    from rankwise.linalg.quant import rtn
    from rankwise.models.loading import load_model
    from rankwise.models.stream import fold_norms, rotate_stream, stream_layout
    from rankwise.linalg.orthogonal import stream_rotation

    torch.set_num_threads(1)
    model, tok, _ = load_model("smollm2-135m-instruct")
    win = calib_windows(tokenize(tok, (REFTEXT / "wiki_calib.txt").read_text()), 8, 512, 3)
    res: dict = {}
    for tag in ("plain", "folded", "rotated"):
        if tag == "folded":
            fold_norms(model)
        if tag == "rotated":
            rotate_stream(model, stream_rotation(576, 0)[0], stream_layout(model))
        H = collect_hessians(model, win, LAYERS)
        for n in LAYERS:
            W = model.get_submodule(n).weight.detach().double()
            den = quant_objective(W, torch.zeros_like(W), H[n])
            r = {}
            for b, g in ((3, 64), (4, 128)):
                r[f"gptq-b{b}-g{g}"] = gptq(W, H[n], b, g, clip="minmax").info["objective_gptq"] / den
                r[f"rtn-b{b}-g{g}"] = quant_objective(W, rtn(W, b, g).dense(torch.float64), H[n]) / den
            res.setdefault(n, {})[tag] = r
    for n, d in res.items():
        print(n, {t: {k: round(d[t][k] / d["plain"][k], 3) for k in d["plain"]} for t in ("folded", "rotated")})
    out = Path(__file__).parent / "results" / "rotation_layers.json"
    out.write_text(json.dumps({"metric": "tr((W-Q)H(W-Q)^T)/tr(WHW^T), one-shot H, 8x512 windows seed 3",
                               "layers": res}, indent=1) + "\n")


if __name__ == "__main__":
    main()
