"""GPTQ on identical Hessians: rankwise's solver variants against llm-compressor's ``quantize_weight``.

Runs in llm-compressor's own venv (``/work/envs/llmc``, a ``.pth`` adding the project venv after its
own site-packages), rankwise from ``src``::

    PYTHONPATH=src /work/envs/llmc/bin/python benchmarks/gptq_parity.py --bits 3 --group-size 64

One-shot input covariances ``H = sum_t x_t x_t^T`` (float64) of the dense SmolLM2 for a few layers
(``--layers``), on the same calibration windows as the quality table (reference text, seed 3,
``--calib-windows`` x 512). Each layer's ``W`` and ``H`` go to every solver; the score is the output
error ``||(W - Q) X||_F^2 = tr((W - Q) H (W - Q)^T)``, relative to ``tr(W H W^T)``, and relative to
llm-compressor's. Solvers:

* ``llmc``: ``llmcompressor.modifiers.gptq.gptq_quantize.quantize_weight`` with the qparams of its
  default weight observer (``memoryless_minmax`` on the original ``W``), static act-order, float32
  (its ``GPTQ_PRECISION``), damping 0.01, block 128: exactly what ``GPTQModifier`` runs per layer;
* ``rtn``: rankwise round-to-nearest on the min/max grid;
* ``rw-*``: :func:`rankwise.linalg.gptq.gptq` with the options named in the row.

Writes ``results/gptq_parity.json``.
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
REFTEXT = Path("/work/team/reftext")


def collect_hessians(model, windows, names):
    H = {n: None for n in names}
    hooks = []
    for n in names:
        def hook(mod, args, n=n):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            H[n] = x.T @ x if H[n] is None else H[n] + x.T @ x
        hooks.append(model.get_submodule(n).register_forward_pre_hook(hook))
    with torch.no_grad():
        for i in range(0, windows.shape[0], 4):
            model(input_ids=windows[i:i + 4])
    for h in hooks:
        h.remove()
    return H


def llmc_solve(W, H, bits, g, actorder="static"):
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from llmcompressor.observers import Observer

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=g,
                            actorder=actorder)
    obs = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=args)
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data = W.float().clone()
    obs(lin.weight)
    qp = obs.get_qparams()
    Hn = (H / H.trace() * H.shape[0]).float()  # any positive scale: the solver is scale-invariant in H
    Q, _, fallback = quantize_weight(W.float()[None].clone(), Hn[None].clone(), qp["scale"][None], qp["zero_point"][None],
                                     None, args, blocksize=128, percdamp=0.01)
    return Q[0].double(), bool(fallback[0])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--layers", default="model.layers.2.self_attn.q_proj,model.layers.2.self_attn.o_proj,"
                                        "model.layers.2.mlp.up_proj,model.layers.2.mlp.down_proj,"
                                        "model.layers.15.mlp.down_proj,model.layers.28.self_attn.v_proj")
    ap.add_argument("--variants", default="")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "gptq_parity.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from rankwise.calibration.sampling import calib_windows, tokenize
    from rankwise.linalg.gptq import gptq, quant_objective
    from rankwise.linalg.quant import rtn
    from rankwise.models.loading import load_model

    model, tok, _ = load_model("smollm2-135m-instruct")
    ids = tokenize(tok, (REFTEXT / "wiki_calib.txt").read_text())
    windows = calib_windows(ids, args.calib_windows, 512, 3)
    names = args.layers.split(",")
    cache = Path(f"/tmp/gptq_parity_H_{args.calib_windows}.safetensors")
    from safetensors.torch import load_file, save_file

    Hs = load_file(cache) if cache.is_file() else {}
    missing = [n for n in names if n not in Hs]
    if missing:
        Hs.update(collect_hessians(model, windows, missing))
        save_file({k: v.contiguous() for k, v in Hs.items()}, cache)
    variants = {
        "rw-default": {},
        "rw-float-min": {"zero_point": "float"},
        "rw-static": {"static_groups": True},
        "rw-noact": {"act_order": False},
        "rw-clip-mse": {"clip": "mse"},
        "rw-static-clip-mse": {"static_groups": True, "clip": "mse"},
    }
    extra = [v for v in args.variants.split(",") if v]
    for v in extra:
        k, _, val = v.partition("=")
        variants[f"rw-{k}={val}"] = {k: json.loads(val)}
    rows = []
    for n in names:
        W = model.get_submodule(n).weight.detach().double()
        H = Hs[n]
        den = quant_objective(W, torch.zeros_like(W), H)
        row = {"layer": n, "shape": list(W.shape)}
        t = time.perf_counter()
        Ql, fb = llmc_solve(W, H, args.bits, args.group_size)
        row["llmc"] = quant_objective(W, Ql, H) / den
        row["llmc_fallback"] = fb
        row["llmc_s"] = time.perf_counter() - t
        row["rtn"] = quant_objective(W, rtn(W, args.bits, args.group_size).dense(torch.float64), H) / den
        row["rtn-clip-mse"] = quant_objective(W, rtn(W, args.bits, args.group_size, clip="mse",
                                                     importance=torch.diagonal(H)).dense(torch.float64), H) / den
        for vname, kw in variants.items():
            t = time.perf_counter()
            qm = gptq(W, H, args.bits, args.group_size, **kw)
            row[vname] = quant_objective(W, qm.dense(torch.float64), H) / den
            row[vname + "_solver"] = qm.info["solver"]
            row[vname + "_s"] = time.perf_counter() - t
        print(json.dumps({k: (round(v / row["llmc"], 4) if isinstance(v, float) and not k.endswith("_s") and k != "llmc"
                              else v) for k, v in row.items()}), flush=True)
        rows.append(row)
    out = {"bits": args.bits, "group_size": args.group_size, "calib_windows": args.calib_windows,
           "metric": "tr((W-Q) H (W-Q)^T) / tr(W H W^T), H = dense one-shot input covariance", "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
