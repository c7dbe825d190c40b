"""The quantization frontier on SmolLM2-135M-Instruct: perplexity against bytes (issue 12).

Every row replaces the 210 targeted linear layers (q/k/v/o/gate/up/down of the 30 blocks) and
reports the perplexity on the first ``--eval-windows`` 512-token windows of the default corpus's
test split, the stored bytes of the targeted weights (bits per targeted weight, all overhead
counted) and the bytes of the whole model. Rows (``--rows``, comma-separated ids):

* ``rtn:b3:g128[:rot]``, ``gptq:b3:g64[:rot]``   uniform code width (``[:rot]``: Hadamard rotation)
* ``gptq:bpw2.5:g128[:rot]``                    mixed widths from the ``bits-greedy`` allocator
* ``lorc:bpw3:g128``, ``lq:bpw2.5:g128``        quantized + low rank, the rank filling the bytes
* ``lowrank:bpw3``                              low rank alone (svd-llm) at the same bytes
* ``hqq:b3:g128``, ``quanto:b4``                the external libraries (benchmark extras), CPU
* ``dense``

Calibration (rankwise rows): ``--calib-windows`` x 512 tokens of the calib split (seed 3), the
dense model's input covariances collected ONCE and shared by every row, i.e. the engine's
``--mode one-shot`` (identical to ``rankwise compress --mode one-shot``, checked by ``--check``);
they are cached in ``--cache`` between runs. Byte accounting, the same for every row: integer
tensors as stored, floating tensors at 2 bytes per value (the libraries keep their per-group
metadata in the model's compute dtype, float16 in normal use; rankwise stores float16); the
rest of the model (embeddings, norms) at 2 bytes per value.

    python benchmarks/quant_frontier.py --rows dense,rtn:b3:g128 --eval-windows 8 --threads 1
    python benchmarks/quant_frontier.py --latency --threads 1
    python benchmarks/quant_frontier.py --render        # table + plot from the results JSON
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DEFAULT_OUT = RESULTS / "quant_frontier.json"


# -- setup ---------------------------------------------------------------------------------------

class Setup:
    """The model, the test ids, the targeted layers and (lazily) the shared calibration statistics."""

    def __init__(self, args) -> None:
        from rankwise.calibration.corpus import load_corpus
        from rankwise.calibration.sampling import tokenize
        from rankwise.models.loading import load_model
        from rankwise.models.surgery import find_linears, linear_shape

        self.args = args
        self.model, self.tok, self.path = load_model(args.model)
        self.test_ids = tokenize(self.tok, load_corpus("test"))
        self.modules = find_linears(self.model)
        self.names = list(self.modules)
        self.shapes = {n: linear_shape(m) for n, m in self.modules.items()}
        self._stats = None
        self.fit_cache: dict = {}

    def stats(self):
        """``{name: LayerStats}`` of the dense model on the calibration windows (cached on disk)."""
        if self._stats is not None:
            return self._stats
        from safetensors.torch import load_file, save_file

        from rankwise.calibration.stats import InputStats, LayerStats, collect_input_stats
        from rankwise.compression.compress import calibration_windows

        a = self.args
        cache = Path(a.cache) / f"stats_{a.calib_windows}x{a.calib_seqlen}_s{a.seed}.safetensors"
        if cache.is_file():
            t = load_file(str(cache))
            raw = {n: InputStats(t[f"{n}.cov"], t[f"{n}.abs"], t[f"{n}.sq"], int(t[f"{n}.n"])) for n in self.names}
        else:
            t0 = time.perf_counter()
            windows, _ = calibration_windows(self.model, None, self.tok, a.calib_windows, a.calib_seqlen, a.seed)
            raw = collect_input_stats(self.model, windows, self.names, batch_size=4, progress=False)
            print(f"calibration statistics: {time.perf_counter() - t0:.0f} s", flush=True)
            cache.parent.mkdir(parents=True, exist_ok=True)
            flat = {}
            for n, s in raw.items():
                flat.update({f"{n}.cov": s.cov, f"{n}.abs": s.abs_sum, f"{n}.sq": s.sq_sum,
                             f"{n}.n": torch.tensor(s.n)})
            save_file(flat, str(cache))
        self._stats = {n: LayerStats(raw[n]) for n in self.names}
        return self._stats

    def ppl(self, windows: int) -> float:
        from rankwise.evaluation.perplexity import perplexity

        return perplexity(self.model, ids=self.test_ids, windows=windows, batch_size=4).ppl

    def rest_values(self) -> int:
        """Values of every tensor outside the targeted layers (tied embeddings counted once)."""
        targeted = {id(p) for m in self.modules.values() for p in m.parameters()}
        seen, total = set(), 0
        for p in self.model.parameters():
            if id(p) in targeted or id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
        return total


def counted_bytes(tensors) -> int:
    """The shared byte rule: integer tensors as stored, floating tensors at 2 bytes per value."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        total += t.numel() * (2 if t.is_floating_point() else t.element_size())
    return total


# -- rows ----------------------------------------------------------------------------------------

def parse_row(row: str) -> dict:
    parts = row.split(":")
    d = {"id": row, "kind": parts[0], "rotate": "rot" in parts[1:], "alloc": "alloc" in parts[1:],
         "sequential": "seq" in parts[1:]}
    for p in parts[1:]:
        if p.startswith("bpw"):
            d["bpw"] = float(p[3:])
        elif p in ("rot", "alloc", "seq"):
            continue
        elif p == "qrtn":  # quantized + low rank with round-to-nearest Q-steps
            d["quantizer"] = "rtn"
        elif p.startswith("b"):
            d["bits"] = int(p[1:])
        elif p.startswith("g"):
            d["group_size"] = int(p[1:])
        elif p.startswith("it"):
            d["iters"] = int(p[2:])
    return d


def swap_in(setup: Setup, layers: dict) -> dict:
    """Put ``layers`` into the model; returns the originals to restore."""
    from rankwise.models.surgery import set_module

    old = {}
    for n, layer in layers.items():
        old[n] = setup.model.get_submodule(n)
        set_module(setup.model, n, layer)
    return old


def rankwise_layers(setup: Setup, r: dict) -> tuple[dict, dict]:
    """Fitted layers of a rankwise row (one-shot on the shared statistics) and the plan info."""
    from rankwise.compression.allocation import AllocationContext
    from rankwise.compression.compress import build_config, make_plan, measure_layer
    from rankwise.compression.allocation import get_allocator
    from rankwise.models.surgery import linear_bias, linear_weight

    kind = r["kind"]
    opts: dict = {}
    if kind != "lowrank":
        opts = {"group_size": r.get("group_size", 128), "rotate": r["rotate"]}
        if "bits" in r:
            opts["bits"] = r["bits"]
        if "iters" in r:
            opts["iters"] = r["iters"]
        if "quantizer" in r:
            opts["quantizer"] = r["quantizer"]
    if kind == "lowrank":
        elem = 2  # factors counted at 2 bytes per value, as everything else
        cfg, meth = build_config("lowrank", ratio=1.0 - r["bpw"] / (8 * elem), options={"method": "svd-llm"},
                                 engine={"mode": "one-shot"})
    else:
        bpw = r.get("bpw")
        if bpw is None:  # a uniform width: the budget is exactly that width's size
            bpw = 16.0
        cfg, meth = build_config(kind, bits_per_weight=bpw, options=opts,
                                 allocate="bits-greedy" if r["alloc"] else "uniform",
                                 allocate_options={"bits": setup.args.alloc_bits} if r["alloc"] else None,
                                 engine={"mode": "one-shot"})
    stats = setup.stats() if (meth.needs() or r["alloc"] or kind == "lowrank") else {}
    inputs = {n: linear_weight(setup.modules[n]).detach().float() for n in setup.names}
    memoize_fit(setup, meth)
    alloc = get_allocator(cfg.allocate)
    measured: dict = {}
    t0 = time.perf_counter()
    if alloc.needs != "none":
        measured = {n: measure_layer(meth, alloc.needs, inputs[n], stats[n]) for n in setup.names}
    plan, info = make_plan(meth, cfg, setup.shapes, measured, AllocationContext())
    t_alloc = time.perf_counter() - t0
    layers = {}
    t0 = time.perf_counter()
    for n, spec in plan.items():
        if spec is None:
            continue
        if linear_bias(setup.modules[n]) is not None:
            raise SystemExit("this benchmark assumes bias-free target layers (SmolLM2)")
        layers[n] = meth.fit(inputs[n], None, stats.get(n), spec)
    return layers, {"allocation_seconds": t_alloc, "fit_seconds": time.perf_counter() - t0,
                    "specs": {n: layers[n].spec() for n in layers}, "options": cfg.options}


def engine_layers(setup: Setup, r: dict) -> tuple[dict, dict]:
    """The row through :func:`rankwise.compression.compress.compress` (sequential calibration, the same
    calibration windows), on a copy of the model; returns its structured layers and the report summary."""
    import copy

    from rankwise.compression.compress import compress
    from rankwise.models.saved import structured_layers

    a = setup.args
    opts = {"group_size": r.get("group_size", 128), "rotate": r["rotate"]}
    if "bits" in r:
        opts["bits"] = r["bits"]
    if "iters" in r:
        opts["iters"] = r["iters"]
    model, rep = compress(copy.deepcopy(setup.model), r["kind"], bits_per_weight=r.get("bpw", 16.0), options=opts,
                          tokenizer=setup.tok, allocate="bits-greedy" if r["alloc"] else "uniform",
                          allocate_options={"bits": a.alloc_bits} if r["alloc"] else None,
                          calib_options={"windows": a.calib_windows, "seqlen": a.calib_seqlen, "seed": a.seed},
                          progress=False)
    layers = structured_layers(model)
    bits = [lr.spec.get("bits") for lr in rep.layers if lr.spec]
    return layers, {"fit_seconds": rep.seconds, "mode": rep.mode, "report_bits_per_weight": rep.bits_per_weight,
                    "bits_histogram": {str(b): bits.count(b) for b in sorted(set(bits))}}


def memoize_fit(setup: Setup, meth) -> None:
    """``meth.fit`` memoized on (weight, options, spec): the allocator's cost table and the final fit,
    and rows with the same options, share their fits."""
    import dataclasses

    plain = meth.fit
    opts = json.dumps(dataclasses.asdict(meth.options), sort_keys=True)

    def fit(W, bias, stats, spec):
        key = (meth.name, opts, _wkey(W), json.dumps(spec, sort_keys=True))
        if key not in setup.fit_cache:
            setup.fit_cache[key] = plain(W, bias, stats, spec)
        return setup.fit_cache[key]

    meth.fit = fit


def _wkey(W: torch.Tensor) -> tuple:
    return (tuple(W.shape), W.data_ptr(), float(W.double().abs().sum()))


def hqq_layers(setup: Setup, r: dict) -> dict:
    """HQQ (``HQQLinear``, PyTorch backend, CPU, float32 compute) at ``bits`` / ``group_size``."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=r["bits"], group_size=r.get("group_size", 64), axis=1)
    out = {}
    for n in setup.names:
        lin = setup.modules[n]
        out[n] = HQQLinear(lin, cfg, del_orig=False, compute_dtype=torch.float32, device="cpu")
    return out


def hqq_bytes(layer) -> int:
    return counted_bytes([layer.W_q, layer.meta["scale"], layer.meta["zero"]])


def quanto_model_bytes(model, names) -> tuple[int, dict]:
    from optimum.quanto import QTensor  # noqa: F401

    total, gs = 0, {}
    for n in names:
        w = model.get_submodule(n).weight
        parts = [w._data, w._scale, w._shift] if hasattr(w, "_shift") else [w._data, w._scale]
        data = parts[0]
        if hasattr(data, "_data"):  # packed
            parts[0] = data._data
        total += counted_bytes(parts)
        gs[n] = getattr(w, "_group_size", None)
    return total, gs


def run_row(setup: Setup, row: str, windows: int, more: tuple[int, ...] = ()) -> list[dict]:
    """The row's results at ``windows`` evaluation windows (and at each of ``more``, same layers)."""
    r = parse_row(row)
    targeted_values = sum(m * n for m, n in setup.shapes.values())
    rest = 2 * setup.rest_values()
    t0 = time.perf_counter()
    extra: dict = {}
    counts = (windows, *more)
    if r["kind"] == "dense":
        tbytes = 2 * targeted_values
        ppl = [setup.ppl(w) for w in counts]
    elif r["kind"] == "quanto":
        import copy

        from optimum.quanto import freeze, qint2, qint4, qint8, quantize

        qt = {2: qint2, 4: qint4, 8: qint8}[r["bits"]]
        base = setup.model
        model = copy.deepcopy(base)
        quantize(model, weights=qt, include=setup.names)
        freeze(model)
        tbytes, gs = quanto_model_bytes(model, setup.names)
        extra["group_sizes"] = sorted({str(v) for v in gs.values()})
        setup.model = model
        try:
            ppl = [setup.ppl(w) for w in counts]
        finally:
            setup.model = base
    elif r["sequential"]:  # the real engine end to end (rankwise.compress's default sequential mode)
        layers, extra = engine_layers(setup, r)
        tbytes = sum(layer.nbytes() for layer in layers.values())
        old = swap_in(setup, layers)
        try:
            ppl = [setup.ppl(w) for w in counts]
        finally:
            swap_in(setup, old)
    else:
        if r["kind"] == "hqq":
            layers = hqq_layers(setup, r)
            tbytes = sum(hqq_bytes(layer) for layer in layers.values())
        else:
            layers, extra = rankwise_layers(setup, r)
            if r["kind"] == "lowrank":  # float32 factors in memory: counted by the shared rule (2 bytes/value)
                tbytes = counted_bytes(t for layer in layers.values() for t in layer.state_dict().values())
            else:
                tbytes = sum(layer.nbytes() for layer in layers.values())
            bits = [s.get("bits") for s in extra["specs"].values() if s.get("bits") is not None]
            extra["bits_histogram"] = {str(b): bits.count(b) for b in sorted(set(bits))}
            ranks = [s.get("rank") for s in extra["specs"].values() if s.get("rank") is not None]
            if ranks:
                extra["rank_mean"] = sum(ranks) / len(ranks)
            extra.pop("specs")
        old = swap_in(setup, layers)
        try:
            ppl = [setup.ppl(w) for w in counts]
        finally:
            swap_in(setup, old)
    calibrated = r["kind"] in ("gptq", "lorc", "lq", "lowrank") or r["alloc"] or r["sequential"]
    calib = setup.args.calib_windows if calibrated else None
    return [{"row": row, **r, "eval_windows": w, "calib_windows": calib, "ppl": p, "targeted_bytes": tbytes,
             "bits_per_weight": 8.0 * tbytes / targeted_values, "model_bytes": tbytes + rest,
             "seconds": time.perf_counter() - t0, **extra} for w, p in zip(counts, ppl)]


# -- latency -------------------------------------------------------------------------------------

def empty_layers(setup: Setup, row: str) -> dict:
    """Layers of a row's structure filled with random codes: latency depends on the shapes and specs,
    not on the fitted values, so nothing is fitted."""
    from rankwise.compression.methods.lorc import plan_lowrank_quant
    from rankwise.compression.methods.base import get_method
    from rankwise.structures.base import build_layer

    r = parse_row(row)
    if r["kind"] == "hqq":
        return hqq_layers(setup, r)
    meth = get_method(r["kind"], group_size=r.get("group_size", 128), rotate=r["rotate"],
                      **({"bits": r["bits"]} if "bits" in r else {}))
    g = torch.Generator().manual_seed(0)
    out = {}
    for n, (m, k) in setup.shapes.items():
        spec = meth.plan_layer((m, k), r.get("bpw", 16.0) * m * k / 8)
        layer = build_layer({"kind": "lowrank-quant" if "rank" in spec else "quant", "shape": [m, k], "bias": False,
                             "spec": spec}, device="cpu")
        with torch.no_grad():
            for key, t in layer.state_dict().items():
                if t.dtype == torch.uint8:
                    t.copy_(torch.randint(0, 256, t.shape, generator=g, dtype=torch.uint8))
                elif key.endswith("signs"):
                    continue
                else:
                    t.copy_((torch.rand(t.shape, generator=g) * 1e-2).to(t.dtype))
        out[n] = layer
    return out


def latency(setup: Setup, rows: list[str], rounds: int) -> dict:
    """Prefill (512 tokens, ``logits_to_keep=1``) and decode seconds per token of dense vs the rows'
    structures, interleaved round-robin, medians."""
    import statistics

    from rankwise.evaluation.latency import decode_tokens_per_second, prefill_seconds

    variants = {"dense": None}
    for row in rows:
        variants[row] = empty_layers(setup, row)
    res = {v: {"prefill": [], "decode": []} for v in variants}
    for _ in range(rounds):
        for v, layers in variants.items():
            old = swap_in(setup, layers) if layers else {}
            try:
                res[v]["prefill"].append(prefill_seconds(setup.model, 512, repeats=1, warmup=1, last_logits_only=True))
                res[v]["decode"].append(1.0 / decode_tokens_per_second(setup.model, new_tokens=16, repeats=1))
            finally:
                if old:
                    swap_in(setup, old)
            print(v, res[v]["prefill"][-1], res[v]["decode"][-1], flush=True)
    out = {}
    for v, d in res.items():
        out[v] = {"prefill_s": statistics.median(d["prefill"]), "decode_s_per_token": statistics.median(d["decode"]),
                  "raw": d}
    for v in out:
        out[v]["prefill_vs_dense"] = out[v]["prefill_s"] / out["dense"]["prefill_s"]
        out[v]["decode_vs_dense"] = out[v]["decode_s_per_token"] / out["dense"]["decode_s_per_token"]
    return out


# -- results -------------------------------------------------------------------------------------

def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"rows": []}


def save_results(path: Path, data: dict) -> None:
    from rankwise.files import write_json

    write_json(path, data)


def render(data: dict, png: Path | None) -> str:
    rows, seen = [], set()
    for r in data["rows"]:  # one result per (row, windows), the first recorded
        key = (r["row"], r["eval_windows"], r.get("calib_windows"))
        if key not in seen:
            seen.add(key)
            rows.append(r)
    lines = ["| row | calibration | calib x eval windows | bits/weight | targeted MB | model MB | ppl | fit s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["eval_windows"], r["bits_per_weight"])):
        cal = r.get("calib_windows") or "-"
        if r["kind"] == "llmc-gptq":
            mode, fit = "llm-compressor (its sequential pipeline)", f"{r['seconds']:.0f}"
        elif not r.get("calib_windows"):
            mode, fit = "none (data-free)", f"{r['fit_seconds']:.0f}" if "fit_seconds" in r else f"({r['seconds']:.0f} incl. eval)"
        else:
            mode = "sequential (engine)" if r.get("sequential") else "one-shot (dense statistics)"
            fit = f"{r['fit_seconds']:.0f}"
        if r["kind"] == "dense":
            mode, fit = "-", "-"
        lines.append(f"| {r['row']} | {mode} | {cal} x {r['eval_windows']} | {r['bits_per_weight']:.3f} | "
                     f"{r['targeted_bytes'] / 1e6:.2f} | {r['model_bytes'] / 1e6:.2f} | {r['ppl']:.2f} | {fit} |")
    if png is not None and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5.5))
        w = max(r["eval_windows"] for r in rows if r["eval_windows"] < 64) if any(
            r["eval_windows"] < 64 for r in rows) else 64
        fam = {}
        for r in rows:
            if r["eval_windows"] != w or r["kind"] == "dense":
                continue
            label = r["kind"] + (" rot" if r.get("rotate") else "") + (" alloc" if r.get("alloc") else "")
            label += (" seq" if r.get("sequential") else "") + (" rtn-Q" if r.get("quantizer") == "rtn" else "")
            label += f" g{r['group_size']}" if r.get("group_size") else ""
            fam.setdefault(label, []).append(r)
        colors = plt.get_cmap("tab20").colors
        for i, (label, rs) in enumerate(sorted(fam.items())):  # distinct colour and marker per family
            rs = sorted(rs, key=lambda r: r["model_bytes"])
            ax.plot([r["model_bytes"] / 1e6 for r in rs], [r["ppl"] for r in rs], "-", marker="os^Dv<>"[i % 7],
                    color=colors[(2 * i) % 20 + (2 * i) // 20 % 2], label=label, ms=5)
        dense = [r for r in rows if r["kind"] == "dense" and r["eval_windows"] == w]
        if dense:
            ax.axhline(dense[0]["ppl"], color="k", lw=0.8, ls="--", label="dense (16-bit)")
        ax.set_yscale("log")
        ax.set_xlabel("bytes of the whole model (MB; non-targeted tensors at 16 bits)")
        ax.set_ylabel(f"perplexity ({w} x 512 test windows)")
        ax.set_title("SmolLM2-135M-Instruct: quantization frontier")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        fig.savefig(png, dpi=120)
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", default="")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--full-windows", type=int, default=64, help="evaluation windows of the --full-rows")
    ap.add_argument("--full-rows", default="", help="rows also evaluated at --full-windows (same fitted layers)")
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--alloc-bits", default="2,3,4", help="candidate widths of the bits-greedy rows")
    ap.add_argument("--cache", default="/tmp/rankwise_quant_frontier")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--latency", default="", help="rows to time against dense (comma-separated)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args(argv)
    args.alloc_bits = [int(b) for b in args.alloc_bits.split(",")]
    out = Path(args.out)
    data = load_results(out)
    if args.render:
        for extra in sorted(out.parent.glob(out.stem + "_*.json")):  # other runs: llm-compressor (own venv), ...
            more = json.loads(extra.read_text())
            data["rows"] += more.get("rows", [])
            if more.get("latency") and not data.get("latency"):
                data["latency"] = more["latency"]
        print(render(data, out.with_suffix(".png")))
        if data.get("latency"):
            print("\n| structure | prefill 512 tok (s) | vs dense | decode (s/token) | vs dense |\n|---|---:|---:|---:|---:|")
            for v, d in data["latency"]["results"].items():
                print(f"| {v} | {d['prefill_s']:.3f} | {d['prefill_vs_dense']:.2f}x | {d['decode_s_per_token']:.4f} | "
                      f"{d['decode_vs_dense']:.2f}x |")
        return
    torch.set_num_threads(args.threads)
    setup = Setup(args)
    data.setdefault("protocol", {"model": str(setup.path), "calib_windows": "per row (calib_windows)",
                                 "calib_seqlen": args.calib_seqlen, "seed": args.seed, "mode": "one-shot",
                                 "threads": args.threads, "eval_seqlen": 512,
                                 "byte_rule": "integer tensors as stored, floating at 2 bytes/value; "
                                              "non-targeted tensors at 2 bytes/value"})
    if args.latency:
        data["latency"] = {"threads": args.threads, "rounds": args.rounds,
                           "results": latency(setup, [r for r in args.latency.split(",") if r], args.rounds)}
        save_results(out, data)
        print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "raw"}
                          for k, v in data["latency"]["results"].items()}, indent=1))
        return
    for row in [r for r in args.rows.split(",") if r]:
        wanted = [args.eval_windows] + ([args.full_windows] if row in args.full_rows.split(",") else [])
        todo = [w for w in wanted if not any(x["row"] == row and x["eval_windows"] == w
                                             and x.get("calib_windows") in (None, args.calib_windows)
                                             for x in data["rows"])]
        if not todo:
            print("skip (done)", row, flush=True)
            continue
        for res in run_row(setup, row, todo[0], tuple(todo[1:])):
            print(json.dumps(res), flush=True)
            data["rows"].append(res)
            save_results(out, data)  # incrementally


if __name__ == "__main__":
    main()
