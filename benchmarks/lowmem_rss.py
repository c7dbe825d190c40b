"""Peak RSS of ``rankwise compress --low-memory`` as users run it (svd-llm, uniform, 40 % removed,
the default 64 x 512 calibration), against the memory model (BENCHMARKS.md, "memory model").

Each run is a fresh ``python -m rankwise compress ... --out TMP -q`` subprocess whose peak RSS is read
with ``os.wait4``. A ``base`` child measures the fixed part: the same imports, the model's skeleton
(config, classes, no weights), the tokenizer and the tokenized calibration text, and nothing else.

    python benchmarks/lowmem_rss.py --threads 1 [--model gemma3-270m] [--modes base,low-memory,in-memory]
        [--without hqq] [--engine plain] [--targets 'layers[.][01][.]'] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parent))

BASE = r"""
import sys, torch
torch.set_num_threads(int(sys.argv[2]))
import rankwise.cli, rankwise.compression.compress
from transformers import AutoConfig
from rankwise.calibration.corpus import load_corpus
from rankwise.compression.compress import calibration_windows
from rankwise.models.loading import load_tokenizer
from rankwise.models.registry import resolve_model
from rankwise.models.skeleton import empty_model
path = resolve_model(sys.argv[1])
tok = load_tokenizer(path)
model = empty_model(AutoConfig.from_pretrained(str(path), local_files_only=True))
windows, _ = calibration_windows(model, None, tok)
"""


def run(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """``(peak RSS MB, seconds, stderr tail)`` of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"{cmd[:6]} failed ({p.returncode}):\n{err[-3000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0, err[-500:]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", default="base,low-memory")
    ap.add_argument("--without", action="append", default=[], help="make `import MOD` fail in the children "
                    "(e.g. hqq, a benchmark extra that transformers imports when installed: a user install lacks it)")
    ap.add_argument("--targets", default=None, help="--targets of the compress runs (e.g. the first blocks' "
                    "layers: the block phase is the same for every block, later blocks are copied)")
    ap.add_argument("--engine", choices=("default", "plain"), default="default",
                    help="plain: --granularity block --no-refit (the engine before issue 11's default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            block = "".join(f"sys.modules[{m!r}] = None; " for m in args.without)
            if mode == "base":
                cmd = [sys.executable, "-c", "import sys; " + block + BASE, args.model, str(args.threads)]
            else:
                cmd = [sys.executable, "-c", "import sys; " + block + "import torch; "
                       "torch.set_num_threads(int(sys.argv.pop(1))); "
                       "from rankwise.cli import main; raise SystemExit(main(sys.argv[1:]))", str(args.threads),
                       "compress", args.model, "--out", str(Path(tmp) / mode), "-q"]
                if mode == "low-memory":
                    cmd.append("--low-memory")
                if args.targets:
                    cmd += ["--targets", args.targets]
                if args.engine == "plain":
                    cmd += ["--granularity", "block", "--no-refit"]
            rss, sec, _ = run(cmd, env)
            rows[mode] = {"peak_rss_mb": rss, "seconds": sec}
            if mode != "base":
                rows[mode]["weights_mb"] = (Path(tmp) / mode / "model.safetensors").stat().st_size / 2 ** 20
            print(mode, json.dumps(rows[mode]), flush=True)
    res = {"benchmark": "lowmem_rss", "model": args.model, "method": "svd-llm", "ratio": 0.4, "calib": "64 x 512",
           "threads": args.threads, "engine": args.engine, "without": args.without, "targets": args.targets,
           "rows": rows}
    if "base" in rows:
        res["base_mb"] = rows["base"]["peak_rss_mb"]
        from compress_scale import memory_model
        from transformers import AutoConfig

        from rankwise.models.registry import resolve_model

        cfg = AutoConfig.from_pretrained(str(resolve_model(args.model)), local_files_only=True)
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                     num_key_value_heads=cfg.num_key_value_heads, head_dim=hd, vocab_size=cfg.vocab_size)
        res["memory_model"] = memory_model(shape, 64 * 512, 4 * 512, res["base_mb"], refit=args.engine == "default",
                                           cache_on_disk=True)
        if "low-memory" in rows:
            res["predicted_over_measured"] = res["memory_model"]["peak"] / rows["low-memory"]["peak_rss_mb"]
    out = Path(args.out or RESULTS / f"lowmem_rss_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res.get("memory_model"), indent=1))
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
