"""One byte budget across structures (issue 23, section 3): the default byte allocation against uniform GPTQ at
the same budget, healed and unhealed, on the reference text, as users run it.

Each row x calibration seed is the command a user types, run in a fresh subprocess (the load average
before and after recorded), one per invocation so that each takes the shared lock on its own::

    flock /work/team/heavy.lock nice -n 5 .venv/bin/python benchmarks/quant_budget.py --row mixed-bpw3.0 --seed 3

Rows (``--row``):

* ``mixed-bpwB`` = ``rankwise compress --bits-per-weight B --heal-steps 100`` (the default structure of a
  byte budget, ``mixed``: widths, group sizes, LoRC ranks or dense chosen per layer, kept only if it beats
  uniform GPTQ on the held-out calibration windows). The run writes two result files: ``mixed-bpwB``, the
  perplexity before healing (the same command without ``--heal-steps`` builds exactly that model: the
  compression is deterministic for a seed), and ``mixed-bpwB-heal100``, after healing.
* ``mixed-noheal-bpwB``: the command without ``--heal-steps`` (checks the above on one seed).
* ``gptq-uniform-bpwB`` = ``rankwise compress --structure gptq --bits-per-weight B --allocate uniform``: one
  width and group size for every layer, the largest within the budget (2-bit g32 at 3.0, 2-bit g64 at 2.5).
* ``gptq-mixed-bpwB`` = ``rankwise compress --structure gptq --bits-per-weight B`` (GPTQ widths and group
  sizes, and dense, no low rank).

Protocol (../shared/reference/reference.md): 64 x 512 calibration windows at seeded starts of
wiki_calib.txt, perplexity on the first 64 non-overlapping 512-token windows of wiki_test.txt. Results
in ``results/quant_quality/<row>-seed<k>.json`` in the schema of ``quant_quality.py`` (its ``--render``
shows them with the other quantization rows); row-specific details (the validation's held-out losses,
the layers per setting, the healing) under ``extra``. ``--render`` here prints this section's table.
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
RESULTS = Path(os.environ.get("RANKWISE_BENCH_RESULTS", HERE / "results" / "quant_quality"))
REFTEXT = Path(os.environ.get("RANKWISE_REFTEXT", "/work/team/reftext"))
MODEL = os.environ.get("RANKWISE_BENCH_MODEL", "smollm2-135m-instruct")
HEAL_STEPS = int(os.environ.get("RANKWISE_BENCH_HEAL_STEPS", 100))
SCHEMA = 1
WINDOWS, SEQLEN = (int(x) for x in os.environ.get("RANKWISE_BENCH_PROTOCOL", "64x512").split("x"))  # smoke tests only


def parse_row(row: str) -> tuple[str, float]:
    m = re.fullmatch(r"(mixed|mixed-noheal|gptq-uniform|gptq-mixed)-bpw(\d+(?:\.\d+)?)", row)
    if not m:
        raise SystemExit(f"unknown row {row!r}: mixed-bpwB | mixed-noheal-bpwB | gptq-uniform-bpwB | gptq-mixed-bpwB")
    return m.group(1), float(m.group(2))


def row_args(kind: str, bpw: float) -> list[str]:
    return {"mixed": ["--bits-per-weight", str(bpw), "--heal-steps", str(HEAL_STEPS)],
            "mixed-noheal": ["--bits-per-weight", str(bpw)],
            "gptq-uniform": ["--structure", "gptq", "--bits-per-weight", str(bpw), "--allocate", "uniform"],
            "gptq-mixed": ["--structure", "gptq", "--bits-per-weight", str(bpw)]}[kind]


def layer_mix(layers: list[dict]) -> dict[str, int]:
    """``{"3-bit g128": 140, "2-bit g128 + r8": 3, "dense": 1, ...}``: layers per setting."""
    out: dict[str, int] = {}
    for lr in layers:
        s = lr.get("spec")
        key = "dense" if not s else (f"{s['bits']}-bit g{s['group_size']}"
                                     + (f" + r{s['rank']}" if s.get("rank") else ""))
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def loadavg() -> str:
    return str(Path("/proc/loadavg").read_text().split(" ")[:3])


def run(row: str, seed: int) -> list[Path]:
    kind, bpw = parse_row(row)
    exe = "rankwise"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    before, t0 = loadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quant-budget-", dir="/tmp") as d:
        out = Path(d) / "model"
        cmd = [exe, "compress", MODEL, *row_args(kind, bpw), "--calib-file", str(REFTEXT / "wiki_calib.txt"),
               "--calib-windows", str(WINDOWS), "--calib-seqlen", str(SEQLEN), "--seed", str(seed), "--eval",
               "--eval-file", str(REFTEXT / "wiki_test.txt"), "--eval-windows", str(WINDOWS), "--eval-seqlen",
               str(SEQLEN), "--out", str(out), "-q"]
        subprocess.run([sys.executable, "-m", "rankwise", *cmd[1:]], check=True, env=env)  # this interpreter's rankwise
        meta = json.loads((out / "rankwise.json").read_text())
        from safetensors import safe_open

        rep = meta["report"]
        layer_keys = tuple(lr["name"] + "." for lr in rep["layers"] if lr["kind"] is not None)
        rest = 0
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            for k in f.keys():
                if not k.startswith(layer_keys):
                    rest += math.prod(f.get_slice(k).get_shape())
    seconds = time.perf_counter() - t0
    shown = " ".join(["rankwise"] + cmd[1:]).replace(f" --out {out}", " --out OUT").replace(" -q", "")
    alloc = rep.get("allocation") or {}
    mix = layer_mix(rep["layers"])
    settings = {k for k in mix if k != "dense"}
    single = next(iter(settings)) if len(settings) == 1 else None
    bits = int(single.split("-")[0]) if single and "+" not in single else None
    group = int(single.split("g")[1]) if single and "+" not in single else None
    tb = int(rep["targeted_bytes_after"])
    extra = {"budget_bits_per_weight": bpw, "allocate": rep["allocate"], "structure": rep["structure"],
             "layers": mix, "validation": alloc.get("validation"), "budget_use": alloc.get("budget"),
             "uniform": alloc.get("uniform"),
             "bits_greedy": {k: v for k, v in (alloc.get("bits_greedy") or {}).items() if k != "costs"},
             "report_seconds": rep.get("seconds")}
    base = {"schema": SCHEMA, "family": "mixed" if kind.startswith("mixed") else "gptq", "bits": bits,
            "group_size": group, "rotate": False, "seed": seed, "calib_windows": WINDOWS,
            "eval_windows": WINDOWS, "seqlen": SEQLEN, "text": str(REFTEXT),
            "targeted_values": int(rep["targeted_params_before"]), "targeted_bytes": tb,
            "bits_per_weight": 8.0 * tb / int(rep["targeted_params_before"]), "model_bytes": tb + 2 * rest,
            "seconds": seconds, "loadavg_before": before, "loadavg_after": loadavg()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    written = []
    ppl = meta["perplexity"]
    if kind == "mixed":  # two rows from one run: before and after healing
        plain = shown.replace(f" --heal-steps {HEAL_STEPS}", "")
        rows = [(f"mixed-bpw{bpw}", plain, ppl["before_healing"],
                 {**extra, "measured_in": shown, "note": "perplexity of the compressed model before healing, measured "
                  "in the healed run; the command shown builds exactly that model"}),
                (f"mixed-bpw{bpw}-heal{HEAL_STEPS}", shown, ppl["compressed"], {**extra, "healing": meta.get("healing")})]
    else:
        rows = [(row, shown, ppl["compressed"], extra)]
    for name, command, value, ex in rows:
        res = {**base, "row": name, "command": command, "ppl": float(value), "extra": ex}
        path = RESULTS / f"{name}-seed{seed}.json"
        path.write_text(json.dumps(res, indent=2) + "\n")
        written.append(path)
        print(json.dumps({k: res[k] for k in ("row", "seed", "ppl", "bits_per_weight")}), flush=True)
    return written


def render() -> str:
    """This section's rows (mixed / gptq-uniform / gptq-mixed): mean, sample SD and min..max over the seeds."""
    rows: dict[str, list[dict]] = {}
    for f in sorted(RESULTS.glob("*.json")):
        d = json.loads(f.read_text())
        if re.match(r"(mixed|gptq-uniform|gptq-mixed)", d["row"]):
            rows.setdefault(d["row"], []).append(d)
    lines = ["| row | bits/weight | ppl mean | sd | min..max | seeds | kept (validation) | layers (first seed) |",
             "|---|---:|---:|---:|---|---|---|---|"]
    for k in sorted(rows, key=lambda k: (-rows[k][0]["extra"]["budget_bits_per_weight"], k)):
        ds = rows[k]
        ppl = [d["ppl"] for d in ds]
        sd = f"{statistics.stdev(ppl):,.2f}" if len(ppl) > 1 else "-"
        kept = ", ".join(sorted({(d["extra"].get("validation") or {}).get("chosen", d["extra"]["allocate"])
                                 for d in ds}))
        mix = ", ".join(f"{n} {s}" for s, n in list(ds[0]["extra"]["layers"].items())[:4])
        lines.append(f"| {k} | {statistics.mean(d['bits_per_weight'] for d in ds):.3f} | {statistics.mean(ppl):,.2f} | "
                     f"{sd} | {min(ppl):,.2f}..{max(ppl):,.2f} | {','.join(str(d['seed']) for d in ds)} | {kept} | "
                     f"{mix} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--row")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--render", action="store_true")
    a = ap.parse_args()
    if a.render:
        print(render())
        return
    if not a.row:
        sys.exit("--row or --render")
    run(a.row, a.seed)


if __name__ == "__main__":
    main()
