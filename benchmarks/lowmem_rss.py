"""Peak RSS of in-memory vs --low-memory compression (svd-llm, uniform, 40% removed), each mode in a
fresh subprocess that reports its own ``ru_maxrss``; both write the compressed model to a temp dir.

    python benchmarks/lowmem_rss.py --calib-windows 8 --threads 1 [--model gemma3-270m]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

CHILD = r"""
import json, os, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[5]))
mode, model_name, out, nwin = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t0 = time.perf_counter()
if mode == "in-memory":
    from rankwise.compression.compress import compress
    from rankwise.compression.saving import save_compressed
    from rankwise.models.loading import load_model
    model, tok, path = load_model(model_name)
    model, rep = compress(model, ratio=0.4, tokenizer=tok, calib_options={"windows": nwin}, progress=False)
    save_compressed(model, tok, out, rep)
else:
    from rankwise.compression.compress import compress_low_memory
    rep = compress_low_memory(model_name, out, ratio=0.4, calib_options={"windows": nwin}, progress=False)
print(json.dumps({"mode": mode, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - t0, "removed": rep.achieved_ratio}))
"""


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", default="in-memory,low-memory")
    ap.add_argument("--reuse", default=None, help="results JSON whose rows fill in modes not run now")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            out = Path(tmp) / mode
            p = subprocess.run([sys.executable, "-c", CHILD, mode, args.model, str(out), str(args.calib_windows),
                                str(args.threads)], capture_output=True, text=True, env=env)
            if p.returncode != 0:
                sys.exit(p.stderr[-3000:])
            row = json.loads(p.stdout.strip().splitlines()[-1])
            row["weights_mb"] = (out / "model.safetensors").stat().st_size / 2**20
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.reuse:
        old = {r["mode"]: dict(r, reused_from=args.reuse) for r in json.loads(Path(args.reuse).read_text())["rows"]}
        have = {r["mode"] for r in rows}
        rows = [r for m in ("in-memory", "low-memory") for r in ([x for x in rows if x["mode"] == m]
                                                                  or ([old[m]] if m in old and m not in have else []))]
    res = {"benchmark": "lowmem_rss", "model": args.model, "method": "svd-llm", "ratio": 0.4,
           "calib": f"{args.calib_windows} x 512", "threads": args.threads, "rows": rows,
           "low_over_in_memory": rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]}
    out = Path(args.out or RESULTS / f"lowmem_rss_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
