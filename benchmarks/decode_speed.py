"""Batch-1 decode and 512-token prefill speed of rankwise's runtime forms against dense (issue 19, section 1).

All rows are built from the one bundled SmolLM2 loaded by ``rankwise.load()`` (float32) and timed in
one process, at the same thread count, in interleaved rounds (the row order rotates each round);
the medians over the rounds are reported, with ratios to dense float32. Rows:

* ``dense-fp32``, ``dense-bf16`` (the whole model cast to bfloat16);
* ``gptq-b4-g32/g64/g128``, ``gptq-b3-g128``, ``gptq-b8`` (8-bit, one symmetric group per row):
  ``QuantLinear`` layers of exactly the spec ``rankwise compress --structure gptq`` writes (asymmetric
  unless said), **fitted by RTN** (speed depends on the layer type and spec, not on the values: the
  label says ``rtn-fitted``); in a float32 model (the kernels compute in bfloat16 inside);
* ``gptq-b4-g128-bf16``: the same layers in the bfloat16 model;
* ``lowrank-40``: ``LowRankLinear`` at the uniform rank removing 40 % of the parameters (SVD factors);
* ``lorc``: ``LowRankQuantLinear`` planned by ``--structure lorc`` at 4.0 bits per weight (RTN codes,
  plain-SVD factors of the quantization error);
* ``hqq-b4-g64`` (HQQ's ``HQQLinear``, default PyTorch backend, float32 compute; same bytes as
  ``gptq-b4-g64``: 4-bit codes + 16-bit scale and zero per 64) and ``quanto-int4`` (optimum-quanto
  ``qint4`` weights, frozen; its own groups): only when those packages import (the benchmark venv
  ``/work/envs/kernels-bench``, never a rankwise dependency);
* ``llama.cpp`` on a GGUF file (``--gguf FILE --llama-bench PATH``): ``llama-bench`` at the same
  threads, run after the torch rounds (its own process; tokens/s as llama-bench reports them);
* ``floor`` (diagnostic, not a model): every target linear replaced by a layer that returns zeros
  without computing anything, so its decode time is what the rest of the model costs (attention,
  norms, the 576 x 49152 LM head, Python): no structure can decode faster than this.

Decode: ``generate`` of ``--new-tokens`` tokens minus ``generate`` of 1 token, greedy, KV cache, a
16-token prompt: ``(N - 1) / (t_N - t_1)`` tokens/s. Prefill: one forward of 512 random tokens with
``logits_to_keep=1`` (what ``generate`` runs before the first token). Each row also records its
runtime table (``rankwise.models.runtime.prepare_inference``: kernel path per layer, stored and
runtime bytes). ``/proc/loadavg`` is recorded before, after and at each round.

    flock /work/team/heavy.lock nice -n 5 /work/envs/kernels-bench/bin/python benchmarks/decode_speed.py --threads 2 --values random --micro
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ROWS = ("dense-fp32", "dense-bf16", "gptq-b4-g32", "gptq-b4-g64", "gptq-b4-g128", "gptq-b4-g128-bf16",
        "gptq-b3-g128", "gptq-b8", "lowrank-40", "lorc", "hqq-b4-g64", "quanto-int4", "floor")


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


class Zero(nn.Module):
    """The ``floor`` row's layer: returns zeros of the output shape (no product)."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def share_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` sharing every parameter and buffer (the target layers are swapped afterwards)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def random_quantized(W: torch.Tensor, bits: int, g: int, symmetric: bool, seed: int = 0):
    """Random codes on a grid of ``W``'s per-row range (``--values random``: same spec, no fit)."""
    from rankwise.linalg.quant import QuantGrid, QuantizedMatrix, num_groups

    gen = torch.Generator().manual_seed(seed)
    m, n = W.shape
    G = num_groups(n, g)
    scale = (2 * W.abs().amax(1, keepdim=True) / (2 ** bits - 1)).expand(m, G).half().contiguous()
    mins = None if symmetric else (-W.abs().amax(1, keepdim=True)).expand(m, G).half().contiguous()
    codes = torch.randint(0, 2 ** bits, (m, n), generator=gen, dtype=torch.uint8)
    return QuantizedMatrix(codes, QuantGrid(bits, min(g, n), n, scale, mins))


def quant_layers(lins: dict, bits: int, g: int, symmetric: bool, values: str = "rtn") -> dict:
    from rankwise.linalg.quant import rtn
    from rankwise.models.surgery import linear_bias, linear_weight
    from rankwise.structures.quant import QuantLinear

    out = {}
    for i, (name, lin) in enumerate(lins.items()):
        W = linear_weight(lin).float()
        qm = (rtn(W, bits, min(g, W.shape[1]), symmetric) if values == "rtn"
              else random_quantized(W, bits, g, symmetric, i))
        out[name] = QuantLinear.from_quantized(qm, linear_bias(lin))
    return out


def lowrank_layers(lins: dict, ratio: float, values: str = "rtn") -> dict:
    from rankwise.compression.allocation.budget import uniform_rank
    from rankwise.models.surgery import linear_bias, linear_weight
    from rankwise.structures.lowrank import LowRankLinear

    out = {}
    for name, lin in lins.items():
        W = linear_weight(lin).float()
        k = uniform_rank(*W.shape, ratio)
        if k is None:
            continue
        if values == "random":
            out[name] = LowRankLinear(W.shape[1], W.shape[0], k, bias=linear_bias(lin) is not None)
            continue
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        out[name] = LowRankLinear.from_factors(U[:, :k] * S[:k], Vh[:k], linear_bias(lin))
    return out


def lorc_layers(lins: dict, bpw: float, group_size: int = 128, values: str = "rtn") -> dict:
    from rankwise.compression.methods.lorc import LowRankQuantOptions, plan_lowrank_quant
    from rankwise.linalg.lowrank_quant import LowRankQuant, lorc
    from rankwise.models.surgery import linear_bias, linear_weight
    from rankwise.structures.lowrank_quant import LowRankQuantLinear

    opts = LowRankQuantOptions(group_size=group_size, quantizer="rtn")
    out = {}
    for name, lin in lins.items():
        W = linear_weight(lin).double()
        m, n = W.shape
        spec = plan_lowrank_quant((m, n), bpw * m * n / 8, opts)
        if values == "random":
            k = spec["rank"]
            res = LowRankQuant(random_quantized(W.float(), spec["bits"], spec["group_size"], spec["symmetric"]),
                               (torch.randn(m, k) * 0.01).half(), (torch.randn(k, n) * 0.01).half(), {})
        else:
            res = lorc(W, torch.eye(n, dtype=torch.float64), spec["bits"], spec["group_size"], spec["rank"],
                       spec["symmetric"], quantizer="rtn")
        out[name] = LowRankQuantLinear.from_lowrank_quant(res, linear_bias(lin))
    return out


def hqq_layers(lins: dict, bits: int, g: int) -> dict:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=bits, group_size=g, axis=1)
    return {n: HQQLinear(copy.deepcopy(lin), cfg, del_orig=True, compute_dtype=torch.float32, device="cpu")
            for n, lin in lins.items()}


def nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def build_rows(model, names: list[str], wanted: list[str], log, values: str = "rtn") -> dict[str, dict]:
    """``{row: {"model", "label", "stored_mb", "runtime", ...}}`` for every wanted row that can be built."""
    from rankwise.models.runtime import prepare_inference, runtime_summary
    from rankwise.models.surgery import get_module, set_module

    lins = {n: get_module(model, n) for n in names}
    dense_bytes = nbytes(lin.weight for lin in lins.values())
    rows: dict[str, dict] = {}

    def add(row: str, label: str, layers: dict | None = None, dtype: torch.dtype | None = None, base=None):
        t0 = time.perf_counter()
        # a cast converts parameters in place: a row cast to another dtype must not share them
        m = share_copy(base or model) if dtype is None else copy.deepcopy(base or model)
        for n, layer in (layers or {}).items():
            set_module(m, n, layer)
        if dtype is not None:
            m = m.to(dtype)
        m.eval()
        table = prepare_inference(m)
        targets = [r for r in table if r.name in lins]
        summary = runtime_summary(targets)
        rows[row] = {"model": m, "label": label, "target_stored_mb": summary["stored_bytes"] / 1e6,
                     "target_runtime_mb": summary["runtime_bytes"] / 1e6, "paths": summary["paths"],
                     "runtime_table": [r.to_json() for r in targets], "build_s": time.perf_counter() - t0}
        log(f"built {row}: {summary['paths']}, stored {summary['stored_bytes'] / 1e6:.1f} MB, runtime forms "
            f"{summary['runtime_bytes'] / 1e6:.1f} MB ({time.perf_counter() - t0:.0f} s)")

    quant = {"gptq-b4-g32": (4, 32, False), "gptq-b4-g64": (4, 64, False), "gptq-b4-g128": (4, 128, False),
             "gptq-b3-g128": (3, 128, False), "gptq-b8": (8, 1 << 30, True)}
    fitted: dict[tuple, dict] = {}
    for row in wanted:
        t0 = time.perf_counter()
        if row == "dense-fp32":
            add(row, "dense float32 (the loaded model)")
        elif row == "dense-bf16":
            rows[row] = {"model": copy.deepcopy(model).to(torch.bfloat16).eval(), "label": "dense bfloat16",
                         "target_stored_mb": dense_bytes / 2e6, "target_runtime_mb": 0.0, "paths": {"dense": len(lins)}}
        elif row in quant or row == "gptq-b4-g128-bf16":
            spec = quant[row] if row in quant else quant["gptq-b4-g128"]
            if spec not in fitted:
                fitted[spec] = quant_layers(lins, *spec, values=values)
                log(f"{values} {spec} in {time.perf_counter() - t0:.0f} s")
            layers = fitted[spec] if row != "gptq-b4-g128-bf16" else copy.deepcopy(fitted[spec])
            bits, g, sym = spec
            what = f"{bits}-bit {'symmetric' if sym else 'asymmetric'} " + ("per channel" if g > 4096 else f"g{g}")
            how = "rtn-fitted" if values == "rtn" else "random codes"
            if row == "gptq-b4-g128-bf16":
                add(row, f"gptq layer spec ({what}), {how}, bfloat16 model", layers, torch.bfloat16)
            else:
                add(row, f"gptq layer spec ({what}), {how}", layers)
        elif row == "lowrank-40":
            add(row, "low rank, uniform 40 % of the parameters removed (" +
                ("SVD factors)" if values == "rtn" else "random factors)"), lowrank_layers(lins, 0.4, values))
        elif row == "lorc":
            add(row, "lorc at 4.0 bits/weight (g128 codes + rank from the budget; " +
                ("rtn codes, low-rank error fit)" if values == "rtn" else "random values)"),
                lorc_layers(lins, 4.0, values=values))
        elif row == "hqq-b4-g64":
            try:
                layers = hqq_layers(lins, 4, 64)
            except ImportError:
                log("hqq is not installed: row skipped (use the benchmark venv)")
                continue
            add(row, "HQQ 4-bit g64 (HQQLinear, PyTorch backend, float32 compute)", layers)
            rows[row]["target_stored_mb"] = sum(nbytes([h.W_q, h.meta["scale"], h.meta["zero"]])
                                                for h in layers.values()) / 1e6
            rows[row]["paths"] = {"hqq": len(layers)}
        elif row == "quanto-int4":
            try:
                from optimum.quanto import freeze, qint4, quantize
            except ImportError:
                log("optimum-quanto is not installed: row skipped (use the benchmark venv)")
                continue
            m = copy.deepcopy(model)
            quantize(m, weights=qint4, include=names)
            freeze(m)
            stored = 0
            for n in names:
                w = get_module(m, n).weight
                parts = [w._data, w._scale, getattr(w, "_shift", None)]
                parts[0] = getattr(parts[0], "_data", parts[0])
                stored += nbytes(parts)
            rows[row] = {"model": m.eval(), "label": "optimum-quanto qint4 weights (frozen)",
                         "target_stored_mb": stored / 1e6, "target_runtime_mb": 0.0, "paths": {"quanto": len(names)}}
        elif row == "floor":
            add(row, "diagnostic: target linears return zeros (the rest of the model's cost)",
                {n: Zero(lin.out_features) for n, lin in lins.items()})
            rows[row]["paths"] = {"zero": len(lins)}
        else:
            raise SystemExit(f"unknown row {row!r}; rows: {', '.join(ROWS)}")
    return rows


def numerics(row: dict, ids: torch.Tensor, new_tokens: int, ppl_ids: torch.Tensor | None, windows: int) -> dict:
    """The fast path against :func:`rankwise.structures.kernels.exact` (the float32 reference) on one row:
    logits, greedy tokens, and perplexity on ``windows`` windows of 512 tokens of ``ppl_ids``."""
    from rankwise.evaluation.perplexity import perplexity
    from rankwise.structures.kernels import exact

    m = row["model"]
    out = {}
    with torch.no_grad():
        if ppl_ids is not None:
            out["ppl_fast"] = perplexity(m, ids=ppl_ids, windows=windows).ppl
            with exact():
                out["ppl_reference"] = perplexity(m, ids=ppl_ids, windows=windows).ppl
            out["ppl_windows"] = windows
        fast = m(ids).logits[0, -8:].double()
        with exact():
            ref = m(ids).logits[0, -8:].double()
        gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        g_fast = m.generate(ids[:, :16], **gen)[0, 16:]
        with exact():
            g_ref = m.generate(ids[:, :16], **gen)[0, 16:]
    return {**out, "logits_rel_diff_prefill_last8": float((fast - ref).norm() / ref.norm()),
            "greedy_tokens_equal": int((g_fast == g_ref).sum()), "greedy_tokens": int(g_ref.numel()),
            "first_divergence": int((g_fast != g_ref).nonzero()[0]) if bool((g_fast != g_ref).any()) else None,
            "note": "fast = the runtime forms (bfloat16 kernels); reference = inside kernels.exact()"}


def llama_bench(binary: str, gguf: str, threads: int, prompt: int, new_tokens: int, reps: int) -> dict:
    cmd = [binary, "-m", gguf, "-p", str(prompt), "-n", str(new_tokens), "-t", str(threads), "-r", str(reps),
           "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    res = {"command": " ".join(cmd)}
    for r in json.loads(out):
        key = "prefill_tok_s" if r.get("n_prompt", 0) else "decode_tok_s"
        res[key] = float(r["avg_ts"])
    return res


def micro(threads: int, log) -> dict:
    """Per-layer products at 1 row on SmolLM2's shapes (best of 15 timings): dense float32 / bfloat16, the
    int4 kernel, low rank at 40 %, and CSR at 10/25/50 % kept (the sparse layers' merge rule)."""
    import warnings

    import torch.nn.functional as F

    from rankwise.compression.allocation.budget import uniform_rank
    from rankwise.linalg.quant import rtn
    from rankwise.structures.quant import QuantLinear

    def best(f, n=200):
        f()
        out = 1e9
        for _ in range(15):
            t = time.perf_counter()
            for _ in range(n):
                f()
            out = min(out, (time.perf_counter() - t) / n)
        return out * 1e6

    res = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        for m, n in [(576, 576), (192, 576), (1536, 576), (576, 1536)]:
            W = torch.randn(m, n) * 0.05
            x = torch.randn(1, n)
            r = {"dense_fp32_us": best(lambda: F.linear(x, W))}
            Wb, xb = W.bfloat16(), x.bfloat16()
            r["dense_bf16_us"] = best(lambda: F.linear(xb, Wb))
            q = QuantLinear.from_quantized(rtn(W, 4, 64), None)
            q.prepare()
            r["int4_g64_us"] = best(lambda: q(x))
            k = uniform_rank(m, n, 0.4)
            A, B = torch.randn(k, n), torch.randn(m, k)
            r[f"lowrank40_rank{k}_us"] = best(lambda: F.linear(F.linear(x, A), B))
            for d in (0.1, 0.25, 0.5):
                kk = int(d * n)
                cols = torch.rand(m, n).argsort(1)[:, :kk].sort(1).values
                S = torch.sparse_csr_tensor(torch.arange(0, m * kk + 1, kk, dtype=torch.int32),
                                            cols.int().reshape(-1), torch.randn(m * kk), (m, n))
                r[f"csr_{int(d * 100)}pct_us"] = best(lambda: (S @ x.T).T)
            res[f"{m}x{n}"] = r
            log(f"micro {m}x{n}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()))
    return {"threads": threads, "rows": 1, "unit": "microseconds, best of 15", "shapes": res}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model name or directory (default: the bundled SmolLM2)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default all: {', '.join(ROWS)})")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--gguf", default=None, help="a GGUF file for the llama.cpp row")
    ap.add_argument("--llama-bench", default=None, help="path of llama.cpp's llama-bench binary")
    ap.add_argument("--values", choices=("rtn", "random"), default="rtn",
                    help="layer values of the timed rows: RTN / SVD fits, or random values of the same spec (speed "
                         "does not depend on values; the numerics check always uses an RTN-fitted 4-bit g128 row)")
    ap.add_argument("--micro", action="store_true", help="also time single layers (per-shape products)")
    ap.add_argument("--ppl-text", default="/work/team/reftext/wiki_test.txt",
                    help="text for the fast-vs-reference perplexity check (skipped when missing)")
    ap.add_argument("--ppl-windows", type=int, default=4, help="512-token windows of that check (0: skip)")
    ap.add_argument("--out", default=str(RESULTS / "decode_speed.json"))
    ap.add_argument("--render", default=None, help="print the BENCHMARKS.md section of a results JSON and exit")
    args = ap.parse_args(argv)
    if args.render:
        print(render_section(json.loads(Path(args.render).read_text())))
        return {}
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    from rankwise import load
    from rankwise.evaluation.latency import decode_tokens_per_second, prefill_seconds
    from rankwise.models.surgery import find_linears

    load_before = loadavg()
    model, tok, path = load(args.model)
    names = list(find_linears(model))
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    t0 = time.perf_counter()
    rows = build_rows(model, names, wanted, log, args.values)
    build_s = time.perf_counter() - t0
    checked = rows if args.values == "rtn" else build_rows(model, names, ["gptq-b4-g128"], log, "rtn")
    micro_res = micro(args.threads, log) if args.micro else None

    ids = tok("The history of the city begins with a small settlement on the river, where traders from the "
              "north and the south met to exchange salt, wool and iron.", return_tensors="pt").input_ids
    ppl_ids = None
    if args.ppl_windows and Path(args.ppl_text).is_file():
        from rankwise.calibration.sampling import tokenize

        ppl_ids = tokenize(tok, Path(args.ppl_text).read_text())
    checks = {}
    if ppl_ids is not None and "dense-fp32" in rows:
        from rankwise.evaluation.perplexity import perplexity

        with torch.no_grad():
            checks["dense-fp32"] = {"ppl": perplexity(rows["dense-fp32"]["model"], ids=ppl_ids,
                                                      windows=args.ppl_windows).ppl, "ppl_windows": args.ppl_windows}
    for r in ("gptq-b4-g128", "gptq-b8", "lorc"):
        if r in checked:
            checks[r] = numerics(checked[r], ids, 16, ppl_ids, args.ppl_windows)
            log(f"numerics {r} (rtn-fitted): {checks[r]}")
    if checked is not rows:
        del checked

    dec = {k: [] for k in rows}
    pre = {k: [] for k in rows}
    loads = []
    order = list(rows)
    for rnd in range(args.rounds):
        for k in order[rnd % len(order):] + order[:rnd % len(order)]:
            m = rows[k]["model"]
            warm = 1 if rnd == 0 else 0
            dec[k].append(decode_tokens_per_second(m, args.new_tokens, repeats=1, warmup=warm))
            pre[k].append(prefill_seconds(m, args.prefill, repeats=1, warmup=warm, last_logits_only=True))
        loads.append(loadavg())
        log(f"round {rnd + 1}/{args.rounds} load {loads[-1]}: " +
            ", ".join(f"{k} {dec[k][-1]:.1f} tok/s" for k in rows))

    base = "dense-fp32" if "dense-fp32" in rows else order[0]
    b_dec, b_pre = statistics.median(dec[base]), statistics.median(pre[base])
    table = []
    for k, row in rows.items():
        d, p = statistics.median(dec[k]), statistics.median(pre[k])
        table.append({"row": k, "label": row["label"], "decode_tok_s": d, "decode_vs_dense_fp32": d / b_dec,
                      "prefill_s": p, "prefill_time_vs_dense_fp32": p / b_pre,
                      "decode_tok_s_rounds": dec[k], "prefill_s_rounds": pre[k],
                      "target_stored_mb": row["target_stored_mb"], "target_runtime_mb": row["target_runtime_mb"],
                      "paths": row["paths"], "runtime_table": row.get("runtime_table")})
    llama = None
    if args.gguf and args.llama_bench:
        llama = llama_bench(args.llama_bench, args.gguf, args.threads, args.prefill, args.new_tokens, args.rounds)
        llama["decode_vs_dense_fp32"] = llama.get("decode_tok_s", 0) / b_dec
        llama["prefill_time_vs_dense_fp32"] = (args.prefill / llama["prefill_tok_s"]) / b_pre \
            if llama.get("prefill_tok_s") else None
        log(f"llama.cpp: {llama}")
    res = {"benchmark": "decode_speed", "model": str(path), "torch": torch.__version__, "threads": args.threads,
           "rounds": args.rounds, "new_tokens": args.new_tokens, "prompt_tokens": 16, "prefill_tokens": args.prefill,
           "loadavg_before": load_before, "loadavg_rounds": loads, "loadavg_after": loadavg(),
           "build_seconds": build_s, "values": args.values, "numerics": checks, "rows": table, "llama_cpp": llama, "micro": micro_res,
           "note": ("gptq rows hold QuantLinear layers of the exact spec GPTQ writes, with RTN-fitted or random "
                    "values ('values'; speed depends on the spec, not the values); medians over interleaved rounds; "
                    "ratios are to dense-fp32 in this run")}
    print(render(res))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    log(f"wrote {out}")
    return res


def render_section(res: dict) -> str:
    """The BENCHMARKS.md section of a results JSON: the table, the numerics check, the per-layer timings."""
    out = [render(res), ""]
    rounds = res["loadavg_rounds"]
    out.append(f"threads {res['threads']}, {res['rounds']} interleaved rounds (medians), decode {res['new_tokens']} "
               f"new tokens after a {res['prompt_tokens']}-token prompt, prefill {res['prefill_tokens']} tokens "
               f"(`logits_to_keep=1`), values: {res['values']}; load average before {res['loadavg_before'][0]:.2f}, "
               f"per round {', '.join(f'{r[0]:.2f}' for r in rounds)}, after {res['loadavg_after'][0]:.2f}.")
    if res.get("numerics"):
        out += ["", "| numerics (rtn-fitted) | ppl fast | ppl reference (`exact()`) | logits rel. diff | greedy tokens equal |",
                "|---|---:|---:|---:|---:|"]
        for k, v in res["numerics"].items():
            if "ppl_fast" in v:
                out.append(f"| {k} | {v['ppl_fast']:.3f} | {v['ppl_reference']:.3f} | "
                           f"{v['logits_rel_diff_prefill_last8']:.4f} | {v['greedy_tokens_equal']}/{v['greedy_tokens']} |")
            elif "ppl" in v:
                out.append(f"| {k} | {v['ppl']:.3f} | | | |")
    if res.get("micro"):
        mic = res["micro"]["shapes"]
        def col(k: str) -> str:  # the low-rank key names its rank, which differs per shape
            return "lowrank40" if k.startswith("lowrank40") else k.removesuffix("_us")
        keys = [col(k) for k in next(iter(mic.values()))]
        out += ["", "| one row, us (best of 15) | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        for shape, r in mic.items():
            vals = {col(k): v for k, v in r.items()}
            out.append(f"| {shape} | " + " | ".join(f"{vals[k]:.1f}" for k in keys) + " |")
    return "\n".join(out)


def render(res: dict) -> str:
    lines = ["| row | decode tok/s | decode vs dense fp32 | prefill 512 (s) | prefill time vs dense fp32 | "
             "target layers stored MB | runtime forms MB | paths |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        paths = ", ".join(f"{k} {v}" for k, v in r["paths"].items())
        lines.append(f"| {r['row']} | {r['decode_tok_s']:.1f} | {r['decode_vs_dense_fp32']:.2f}x | {r['prefill_s']:.2f} "
                     f"| {r['prefill_time_vs_dense_fp32']:.2f}x | {r['target_stored_mb']:.1f} | "
                     f"{r['target_runtime_mb']:.1f} | {paths} |")
    if res.get("llama_cpp"):
        ll = res["llama_cpp"]
        lines.append(f"| llama.cpp ({Path(ll['command'].split(' -m ')[1].split()[0]).name}) | "
                     f"{ll.get('decode_tok_s', float('nan')):.1f} | {ll.get('decode_vs_dense_fp32', float('nan')):.2f}x "
                     f"| {res['prefill_tokens'] / ll['prefill_tok_s']:.2f} | "
                     f"{ll.get('prefill_time_vs_dense_fp32') or float('nan'):.2f}x | | | llama-bench |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
