"""Pruned models in llama.cpp (issue 20): each saved pruned SmolLM2 directory of ``prune.py`` exported with
``rankwise export DIR --format gguf`` and run by ``llama-perplexity``, beside the dense model.

What it checks: that llama.cpp runs every pruned shape (fewer blocks; fewer heads with ``head_dim`` kept,
so ``key_length`` != ``embedding_length / head_count``; 1248 FFN channels; a 459-wide residual stream with
an untied head) and computes what transformers computes. For the ``f32`` files the same perplexity is
computed in plain transformers on llama.cpp's own protocol (the test file tokenized whole, ``--chunks``
windows of 512 tokens, the BOS token put first when the vocabulary adds one, the second half of each
window scored: 255 predictions per window), so the two numbers should agree to the float32 rounding of
two different kernels. ``q8_0`` / ``q4_0`` rows: the block linears written as llama.cpp's block formats
by gguf-py's round-to-nearest (the token embedding and an untied head ``q8_0``; inputs that are not a
multiple of 32, the slice model's 459, written F16): what a user who exports a pruned model to Q4_0
gets, beside the dense model exported the same way.

llama.cpp is a benchmark-only build (``--llama`` points at its ``build/bin``). Usage (after
``prune.py run ... --ratio 0.2 --seed 3`` for depth, width and slice)::

    python benchmarks/prune_gguf.py --ratio 0.2 --seed 3 --chunks 16 --threads 1
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from gguf_llamacpp import ppl, sh  # a sibling script: llama.cpp's output parsed one way for both benchmarks

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).parent
OUT = HERE / "results" / "prune_gguf.json"
MODELS = Path(os.environ.get("RANKWISE_PRUNE_MODELS", "/tmp/rankwise-prune-bench"))
TYPES = {"f32": ("f32", "f32"), "q8_0": ("q8_0", "q8_0"), "q4_0": ("q4_0", "q8_0")}  # dense_type, embedding_type


def llama_ppl(llama: Path, gguf: Path, text: Path, chunks: int, threads: int, log: Path) -> float:
    return ppl(sh([llama / "llama-perplexity", "-m", gguf, "-f", text, "-c", "512", "-b", "512", "--chunks", chunks,
                   "-t", threads], None, log))[0]


def transformers_ppl(path: str | None, text: Path, chunks: int, threads: int) -> float:
    """llama.cpp's perplexity protocol (module docstring) in plain transformers, float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    if path is None:  # the dense model: the bundled GGUF's weights, as rankwise loads them
        import rankwise

        model, tok, _ = rankwise.load()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path)
    model.eval()
    ids = tok(text.read_text(), add_special_tokens=True)["input_ids"]
    add_bos = tok.bos_token_id is not None and tok("x", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id]
    nll, count, n = 0.0, 0, 512
    with torch.no_grad():
        for i in range(chunks):
            window = list(ids[i * n:(i + 1) * n])
            if add_bos:
                window[0] = tok.bos_token_id
            logp = model(torch.tensor([window])).logits[0].float().log_softmax(-1)
            first = n // 2
            target = torch.tensor(window[first + 1:])
            nll -= float(logp[first:n - 1].gather(1, target[:, None]).sum())
            count += n - 1 - first
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--structures", default="depth,width,slice")
    ap.add_argument("--types", default="f32,q4_0")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--llama", type=Path, default=Path("/work/envs/llama.cpp/build/bin"))
    ap.add_argument("--text", type=Path, default=Path(os.environ.get("RANKWISE_REFTEXT", "/work/team/reftext")))
    ap.add_argument("--work", type=Path, default=Path("/tmp/rankwise-prune-gguf"))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    test = args.text / "wiki_test.txt"
    rk = [sys.executable, "-m", "rankwise"]
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "log.txt"
    sources = {"dense": "smollm2-135m-instruct"}
    for s in args.structures.split(","):
        sources[s] = str(MODELS / f"{s}-r{args.ratio}-s{args.seed}")
    data = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    for name, src in sources.items():
        cfg = None if name == "dense" else json.loads((Path(src) / "config.json").read_text())
        for t in args.types.split(","):
            dense_type, emb_type = TYPES[t]
            gdir = args.work / f"{name}-r{args.ratio}-s{args.seed}-{t}"
            if not (gdir / "model.gguf").is_file():
                sh([*rk, "export", src, "--format", "gguf", "--out", gdir, "--set", f"dense_type={dense_type}",
                    "--set", f"embedding_type={emb_type}", "--overwrite", "-q"], None, log)
            t0 = time.perf_counter()
            row = {"model": name, "ratio": None if name == "dense" else args.ratio, "seed": args.seed, "type": t,
                   "chunks": args.chunks, "threads": args.threads,
                   "gguf_bytes": (gdir / "model.gguf").stat().st_size,
                   "llama_cpp_ppl": llama_ppl(args.llama, gdir / "model.gguf", test, args.chunks, args.threads, log),
                   "shape": None if cfg is None else {k: cfg[k] for k in (
                       "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                       "intermediate_size", "tie_word_embeddings")}}
            if t == "f32":
                row["transformers_ppl"] = transformers_ppl(None if name == "dense" else src, test, args.chunks,
                                                           args.threads)
                row["llama_cpp_vs_transformers"] = row["llama_cpp_ppl"] / row["transformers_ppl"]
            row["seconds"] = time.perf_counter() - t0
            row["command"] = " ".join(["python", "benchmarks/prune_gguf.py", *sys.argv[1:]])
            data["rows"] = [r for r in data["rows"] if (r["model"], r["ratio"], r["seed"], r["type"], r["chunks"])
                            != (row["model"], row["ratio"], row["seed"], t, args.chunks)] + [row]
            args.out.write_text(json.dumps(data, indent=1) + "\n")
            print(name, t, {k: row[k] for k in row if k.endswith("ppl") or k.endswith("transformers")}, flush=True)


if __name__ == "__main__":
    main()
