"""Peak memory of ``rankwise export`` from a saved directory: the export streams (one tensor / one layer
resident), so its peak RSS stays near the process's baseline whatever the model's size.

Each row runs ``rankwise export IN --format F --out TMP`` under ``/usr/bin/time -v`` and records the
peak RSS, next to the *baseline*: a process that imports the same libraries and opens the same source
(config, tokenizer, tensor index, empty skeleton) without exporting. ``peak - baseline`` is what the
export itself holds; compare it with the model's bytes on disk.

    python benchmarks/export_memory.py --dense smollm2-135m-instruct --quant /tmp/gguf-bench/ours-s3
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "export_memory.json"
BASELINE = ("import rankwise.export.formats.{mod}\nfrom rankwise.export.source import open_source\n"
            "s = open_source({src!r}); s.tokenizer; s.skeleton()\n")


def peak_rss_mb(cmd: list[str]) -> float:
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024


def model_bytes(src: str) -> int:
    from rankwise.models.registry import resolve_model

    path = resolve_model(src)
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default="smollm2-135m-instruct")
    ap.add_argument("--quant", default=None, help="a saved rankwise directory with symmetric 4-bit g32 layers")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    rows = []
    plan = [(args.dense, "dense", "dense", []), (args.dense, "gguf", "gguf", ["--set", "dense_type=f32", "--set",
                                                                             "embedding_type=f32"])]
    if args.quant:
        plan += [(args.quant, "compressed-tensors", "compressed_tensors", []), (args.quant, "gptq", "gptq", []),
                 (args.quant, "gguf", "gguf", [])]
    rk = [sys.executable, "-m", "rankwise"]
    for src, fmt, mod, opts in plan:
        with tempfile.TemporaryDirectory() as td:
            peak = peak_rss_mb([*rk, "export", src, "--format", fmt, "--out", f"{td}/o", "-q", *opts])
        base = peak_rss_mb([sys.executable, "-c", BASELINE.format(mod=mod, src=src)])
        row = {"source": src, "format": fmt, "options": opts, "peak_rss_mb": round(peak, 1),
               "baseline_rss_mb": round(base, 1), "export_held_mb": round(peak - base, 1),
               "model_mb_on_disk": round(model_bytes(src) / 2 ** 20, 1)}
        rows.append(row)
        print(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "command": " ".join(sys.argv)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
