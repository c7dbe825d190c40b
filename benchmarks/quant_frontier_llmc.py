"""llm-compressor's GPTQ on CPU for the quantization frontier (a row of ``quant_frontier.json``).

llm-compressor pins an older transformers than rankwise's environment, so it runs from its own
virtual environment (never the project's): ``python -m venv /tmp/llmc``, a ``.pth`` file adding the
project venv's site-packages *after* its own, ``/tmp/llmc/bin/pip install llmcompressor``. Then

    PYTHONPATH=src /tmp/llmc/bin/python benchmarks/quant_frontier_llmc.py --bits 3 --group-size 128

Writes ``results/quant_frontier_llmc.json`` (``quant_frontier.py --render`` merges it). Same
calibration windows (default corpus, calib split, seed 3), same evaluation windows and the same
byte rule as ``quant_frontier.py``: codes at ``bits`` per weight, floating tensors (scales) at 2 bytes,
integer zero points as stored.
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "quant_frontier_llmc.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    from rankwise.compression.compress import calibration_windows
    from rankwise.evaluation.perplexity import perplexity
    from rankwise.calibration.corpus import load_corpus
    from rankwise.calibration.sampling import tokenize
    from rankwise.models.loading import load_model
    from rankwise.models.surgery import find_linears

    model, tok, path = load_model("smollm2-135m-instruct")
    names = list(find_linears(model))
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    windows, _ = calibration_windows(model, None, tok, args.calib_windows, 512, 3)
    ds = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    scheme = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": args.bits, "type": "int", "symmetric": False,
                                                              "strategy": "group", "group_size": args.group_size}}}
    recipe = GPTQModifier(config_groups=scheme, ignore=["lm_head"])
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=args.calib_windows,
            max_seq_length=512)
    fit_s = time.perf_counter() - t0
    tbytes = 0
    for n in names:
        mod = model.get_submodule(n)
        m, k = shapes[n]
        tbytes += -(-m * k * args.bits // 8)
        for key in ("weight_scale", "weight_zero_point"):
            t = getattr(mod, key, None)
            if t is not None:
                tbytes += t.numel() * (2 if t.is_floating_point() else t.element_size())
    test_ids = tokenize(tok, load_corpus("test"))
    ppl = perplexity(model, ids=test_ids, windows=args.eval_windows, batch_size=4).ppl
    targeted = sum(m * k for m, k in shapes.values())
    rest = sum(p.numel() for n, p in model.named_parameters()
               if not any(n.startswith(t + ".") for t in names) and not n.endswith(("weight_scale", "weight_zero_point",
                                                                                    "weight_g_idx")))
    row = {"row": f"llmc-gptq:b{args.bits}:g{args.group_size}", "id": f"llmc-gptq:b{args.bits}:g{args.group_size}",
           "kind": "llmc-gptq", "bits": args.bits, "group_size": args.group_size, "rotate": False, "alloc": False,
           "eval_windows": args.eval_windows, "calib_windows": args.calib_windows, "ppl": ppl, "targeted_bytes": tbytes,
           "bits_per_weight": 8.0 * tbytes / targeted, "model_bytes": tbytes + 2 * rest, "seconds": fit_s,
           "version": getattr(llmcompressor, "__version__", "?")}
    print(json.dumps(row), flush=True)
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    data["rows"] = [r for r in data["rows"] if r["row"] != row["row"]] + [row]
    out.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
