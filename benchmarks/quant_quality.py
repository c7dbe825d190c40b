"""The quantization quality table (issue 23): one row x one calibration seed per call, full protocol.

Protocol (``/work/shared/reference/reference.md``): SmolLM2-135M-Instruct; calibration = 64 windows of
512 tokens at seeded random starts of the reference text's ``wiki_calib.txt`` (``--seed``); perplexity =
exp(mean NLL) over the first 64 non-overlapping 512-token windows of ``wiki_test.txt``. The 210 linear
layers of the 30 blocks are quantized; embeddings and ``lm_head`` stay unquantized in every row.

Usage (each call is one heavy run: take the team lock)::

    flock /work/team/heavy.lock nice -n 5 .venv/bin/python benchmarks/quant_quality.py --row gptq-b3-g64 --seed 3
    .venv/bin/python benchmarks/quant_quality.py --render        # the table, mean and spread over seeds

Rows (``--row``):

=========================== ================================================================================
``dense``                   ``rankwise eval`` of the unquantized model (seed-independent)
``rtn-b{B}-g{G}``           ``rankwise compress --structure rtn --set bits=B --group-size G`` (data-free)
``gptq-b{B}-g{G}``          ``rankwise compress --structure gptq ...`` (the default: sequential, clip=mse)
``gptq-minmax-b{B}-g{G}``   the same with ``--set clip=minmax`` (the clipping search measured)
``gptq-rot-b{B}-g{G}``      the same with ``--rotate`` (residual-stream rotation; the head is untied)
``rtn-rot-b{B}-g{G}``       RTN with ``--rotate``
``rtn-lrot-b{B}-g{G}``      RTN with ``--set rotate=layer`` (the per-layer run-time Hadamard rotation)
``llmc-b{B}-g{G}``          llm-compressor's ``GPTQModifier`` (asymmetric int, group G, its defaults: static
                            act-order, min/max observer, damping 0.01), run by this script under
                            ``/work/envs/llmc/bin/python`` on the very same calibration windows
``hqq-b{B}-g{G}``           HQQ ``HQQLinear`` (data-free), ``quanto-b{B}`` optimum-quanto qint{B} (bench extra)
=========================== ================================================================================

Every rankwise row runs the CLI as a user types it (the command is stored), with ``OMP_NUM_THREADS=1``.

Result file ``benchmarks/results/quant_quality/<row>-seed<k>.json`` (schema version 1; other rows,
e.g. the byte-budget engineer's mixed-width ``gptq-bpw2.5`` and healed rows, use the same keys)::

    {"schema": 1, "row": str, "family": str,           # family: dense | rtn | gptq | llmc | hqq | quanto | ...
     "bits": int | null, "group_size": int | null,     # code width / group (null where mixed or n/a)
     "rotate": bool, "seed": int | null,               # calibration seed (null: data-free, seed-independent)
     "command": str,                                   # what reproduces the row
     "ppl": float,                                     # perplexity, full protocol
     "calib_windows": int | null, "eval_windows": 64, "seqlen": 512, "text": "/work/team/reftext",
     "targeted_values": int,                           # weights of the 210 quantized layers
     "targeted_bytes": int,                            # their stored bytes, all overhead counted
     "bits_per_weight": float,                         # 8 targeted_bytes / targeted_values
     "model_bytes": int,                               # targeted_bytes + every other value at 2 bytes (float16),
                                                       # an untied head included
     "extra": {...},                                   # row-specific (untied_params, clip, tool version, ...)
     "seconds": float, "loadavg_before": str, "loadavg_after": str}

``--render`` groups files by row: mean, spread (min..max) and the number of seeds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "quant_quality"
REFTEXT = Path("/work/team/reftext")
CALIB, TEST = REFTEXT / "wiki_calib.txt", REFTEXT / "wiki_test.txt"
MODEL = "smollm2-135m-instruct"
LLMC_PY = Path("/work/envs/llmc/bin/python")
SCHEMA = 1
WINDOWS, SEQLEN = 64, 512


def parse_row(row: str) -> dict:
    if row == "dense":
        return {"family": "dense", "bits": None, "group_size": None, "rotate": False, "variant": ""}
    m = re.fullmatch(r"(rtn|gptq|llmc|hqq|quanto)(-rot|-lrot|-minmax)?-b(\d)(?:-g(\d+))?", row)
    if not m:
        raise SystemExit(f"unknown row {row!r}: dense | rtn|gptq[-rot|-minmax]-bB-gG | llmc-bB-gG | hqq-bB-gG | "
                         "quanto-bB")
    fam, var, b, g = m.group(1), m.group(2) or "", int(m.group(3)), m.group(4)
    if fam != "quanto" and g is None:
        raise SystemExit(f"row {row!r} needs a group size (-gG)")
    return {"family": fam, "bits": b, "group_size": int(g) if g else None, "rotate": var == "-rot",
            "variant": var.lstrip("-")}


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[:3].__str__()


def shapes():
    from rankwise.models.loading import load_model
    from rankwise.models.surgery import find_linears

    model, tok, _ = load_model(MODEL)
    names = list(find_linears(model))
    return model, tok, names, {n: tuple(model.get_submodule(n).weight.shape) for n in names}


def rest_values(model, names) -> int:
    """Values outside the targeted layers, each shared tensor once."""
    seen, total = set(), 0
    for n, p in model.named_parameters(remove_duplicate=True):
        if any(n.startswith(t + ".") for t in names) or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def run_rankwise(r: dict, row: str, seed: int) -> dict:
    exe = str(ROOT / ".venv" / "bin" / "rankwise")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if r["family"] == "dense":
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "eval.json"
            cmd = [exe, "eval", MODEL, "--text-file", str(TEST), "--windows", str(WINDOWS), "--seqlen", str(SEQLEN),
                   "--json", str(out), "-q"]
            subprocess.run(cmd, check=True, env=env)
            res = json.loads(out.read_text())
        model, _, names, shp = shapes()
        tv = sum(a * b for a, b in shp.values())
        return {"command": " ".join(["rankwise"] + cmd[1:-3]), "ppl": float(res["ppl"]),
                "calib_windows": None, "targeted_values": tv, "targeted_bytes": 2 * tv,
                "model_bytes": 2 * tv + 2 * rest_values(model, names), "extra": {}}
    b, g = r["bits"], r["group_size"]
    bpw = round(b + 64.0 / g + 0.05, 2)  # generous: the width is fixed by --set bits=B, not by the budget
    structure = "rtn" if r["family"] == "rtn" else "gptq"
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        out = Path(d) / "model"
        cmd = [exe, "compress", MODEL, "--structure", structure, "--bits-per-weight", str(bpw), "--group-size", str(g),
               "--set", f"bits={b}", "--calib-file", str(CALIB), "--calib-windows", str(WINDOWS), "--calib-seqlen",
               str(SEQLEN), "--seed", str(seed), "--eval", "--eval-file", str(TEST), "--eval-windows", str(WINDOWS),
               "--eval-seqlen", str(SEQLEN), "--out", str(out), "-q"]
        if r["rotate"]:
            cmd.append("--rotate")
        if r["variant"] == "minmax":
            cmd += ["--set", "clip=minmax"]
        if r["variant"] == "lrot":
            cmd += ["--set", "rotate=layer"]
        subprocess.run(cmd, check=True, env=env)
        meta = json.loads((out / "rankwise.json").read_text())
        from safetensors import safe_open

        rep = meta["report"]
        layer_keys = tuple(lr["name"] + "." for lr in rep["layers"] if lr["kind"] is not None)
        rest = 0
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            for k in f.keys():
                if not k.startswith(layer_keys):
                    rest += math.prod(f.get_slice(k).get_shape())
        shown = " ".join(["rankwise"] + cmd[1:]).replace(f" --out {out}", " --out OUT").replace(" -q", "")
        tb = int(rep["targeted_bytes_after"])
        return {"command": shown, "ppl": float(meta["perplexity"]["compressed"]), "calib_windows": WINDOWS,
                "targeted_values": int(rep["targeted_params_before"]), "targeted_bytes": tb,
                "model_bytes": tb + 2 * rest,
                "extra": {"model_transform": rep.get("model_transform"), "report_seconds": rep.get("seconds")}}


def run_llmc(r: dict, row: str, seed: int) -> dict:
    """llm-compressor's GPTQModifier on the same calibration windows (this function runs in its venv)."""
    import torch
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    from rankwise.calibration.corpus import load_corpus
    from rankwise.calibration.sampling import tokenize
    from rankwise.compression.compress import calibration_windows
    from rankwise.evaluation.perplexity import perplexity

    torch.set_num_threads(1)
    model, tok, names, shp = shapes()
    rest = rest_values(model, names)
    windows, _ = calibration_windows(model, load_corpus("calib", CALIB), tok, WINDOWS, SEQLEN, seed)
    ds = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    scheme = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": r["bits"], "type": "int", "symmetric": False,
                                                              "strategy": "group", "group_size": r["group_size"]}}}
    oneshot(model=model, dataset=ds, recipe=GPTQModifier(config_groups=scheme, ignore=["lm_head"]),
            num_calibration_samples=WINDOWS, max_seq_length=SEQLEN)
    tb = 0
    for n in names:
        mod = model.get_submodule(n)
        m, k = shp[n]
        tb += -(-m * k * r["bits"] // 8)
        for key in ("weight_scale", "weight_zero_point"):
            t = getattr(mod, key, None)
            if t is not None:  # float scales at 2 bytes (float16 in use), integer zero points as stored
                tb += t.numel() * (2 if t.is_floating_point() else t.element_size())
    ids = tokenize(tok, load_corpus("test", TEST))
    ppl = perplexity(model, ids=ids, windows=WINDOWS, seqlen=SEQLEN, batch_size=4).ppl
    tv = sum(a * b for a, b in shp.values())
    return {"command": f"{LLMC_PY} benchmarks/quant_quality.py --row {row} --seed {seed}", "ppl": float(ppl),
            "calib_windows": WINDOWS, "targeted_values": tv, "targeted_bytes": tb, "model_bytes": tb + 2 * rest,
            "extra": {"llmcompressor": getattr(llmcompressor, "__version__", "?")}}


def run_external(r: dict, row: str) -> dict:
    """HQQ / optimum-quanto, data-free, in process."""
    import torch

    from rankwise.calibration.corpus import load_corpus
    from rankwise.calibration.sampling import tokenize
    from rankwise.evaluation.perplexity import perplexity
    from rankwise.models.surgery import set_module

    torch.set_num_threads(1)
    model, tok, names, shp = shapes()
    rest = rest_values(model, names)
    tv = sum(a * b for a, b in shp.values())

    def nb(ts):
        return sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in ts)

    if r["family"] == "hqq":
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        cfg = BaseQuantizeConfig(nbits=r["bits"], group_size=r["group_size"], axis=1)
        tb = 0
        for n in names:
            layer = HQQLinear(model.get_submodule(n), cfg, del_orig=True, compute_dtype=torch.float32, device="cpu")
            tb += nb([layer.W_q, layer.meta["scale"], layer.meta["zero"]])
            set_module(model, n, layer)
        extra = {"hqq": __import__("hqq").__version__ if hasattr(__import__("hqq"), "__version__") else "?"}
    else:
        from optimum.quanto import freeze, qint2, qint4, qint8, quantize

        quantize(model, weights={2: qint2, 4: qint4, 8: qint8}[r["bits"]], include=names)
        freeze(model)
        tb = 0
        for n in names:
            w = model.get_submodule(n).weight
            parts = [w._data, w._scale] + ([w._shift] if hasattr(w, "_shift") else [])
            if hasattr(parts[0], "_data"):
                parts[0] = parts[0]._data
            tb += nb(parts)
        extra = {}
    ids = tokenize(tok, load_corpus("test", TEST))
    ppl = perplexity(model, ids=ids, windows=WINDOWS, seqlen=SEQLEN, batch_size=4).ppl
    return {"command": f"python benchmarks/quant_quality.py --row {row}", "ppl": float(ppl), "calib_windows": None,
            "targeted_values": tv, "targeted_bytes": tb, "model_bytes": tb + 2 * rest, "extra": extra}


def run(row: str, seed: int) -> Path:
    r = parse_row(row)
    if r["family"] == "llmc" and Path(sys.prefix).resolve() != LLMC_PY.parent.parent.resolve():  # venvs share one interpreter
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        subprocess.run([str(LLMC_PY), __file__, "--row", row, "--seed", str(seed)], check=True, env=env)
        return RESULTS / f"{row}-seed{seed}.json"
    data_free = r["family"] in ("dense", "rtn", "hqq", "quanto")  # the rotation seed is not a calibration seed
    before, t0 = loadavg(), time.perf_counter()
    if r["family"] == "llmc":
        res = run_llmc(r, row, seed)
    elif r["family"] in ("hqq", "quanto"):
        res = run_external(r, row)
    else:
        res = run_rankwise(r, row, seed)
    out = {"schema": SCHEMA, "row": row, "family": r["family"], "bits": r["bits"], "group_size": r["group_size"],
           "rotate": r["rotate"], "seed": None if data_free else seed, **res,
           "eval_windows": WINDOWS, "seqlen": SEQLEN, "text": str(REFTEXT),
           "bits_per_weight": 8.0 * res["targeted_bytes"] / res["targeted_values"],
           "seconds": time.perf_counter() - t0, "loadavg_before": before, "loadavg_after": loadavg()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / (f"{row}-seed{seed}.json" if out["seed"] is not None else f"{row}.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("row", "seed", "ppl", "bits_per_weight", "model_bytes", "seconds")}))
    return path


def render() -> str:
    """Every row (this script's and ``quant_budget.py``'s): mean, sample SD and min..max over the seeds, and
    the ratio of the mean to llm-compressor's mean at the same code width and group size."""
    rows: dict[str, list[dict]] = {}
    for p in sorted(RESULTS.glob("*.json")):
        d = json.loads(p.read_text())
        rows.setdefault(d["row"], []).append(d)
    mean = {k: statistics.mean(d["ppl"] for d in ds) for k, ds in rows.items()}
    order = lambda k: (-(rows[k][0].get("bits") or 99), rows[k][0].get("group_size") or 0, k)  # noqa: E731
    lines = ["| row | bits/weight | model MB | ppl mean | sd | min..max | seeds | vs llm-compressor | command (first seed) |",
             "|---|---:|---:|---:|---:|---|---|---:|---|"]
    for k in sorted(rows, key=order):
        ds = rows[k]
        ppl = [d["ppl"] for d in ds]
        seeds = ",".join(str(d["seed"]) for d in ds) if ds[0]["seed"] is not None else "data-free"
        sd = f"{statistics.stdev(ppl):.2f}" if len(ppl) > 1 else "-"
        spread = f"{min(ppl):.2f}..{max(ppl):.2f}" if len(ppl) > 1 else "-"
        peer = f"llmc-b{ds[0]['bits']}-g{ds[0]['group_size']}"
        vs = f"{mean[k] / mean[peer]:.3f}x" if peer in mean and peer != k and ds[0]["family"] != "llmc" else ""
        lines.append(f"| {k} | {statistics.mean(d['bits_per_weight'] for d in ds):.3f} | "
                     f"{ds[0]['model_bytes'] / 1e6:.2f} | {mean[k]:,.2f} | {sd} | {spread} | {seeds} | {vs} | "
                     f"`{ds[0]['command']}` |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.render:
        print(render())
        return
    if not args.row:
        ap.error("--row or --render")
    run(args.row, args.seed)


if __name__ == "__main__":
    main()
