"""``rankwise demo``: the path a user takes, in a few minutes on a laptop CPU.

1. load the bundled model (SmolLM2-135M-Instruct) and measure it: perplexity on the first ``--windows``
   512-token windows of the test split, a continuation of ``--prompt`` with its decode speed;
2. compress it with the demo configuration: GPTQ, 4-bit codes, symmetric, groups of 32, fitted one-shot
   on ``--calib-windows`` calibration windows -- the structure every runtime reads bit-exactly
   (compressed-tensors for vLLM / transformers, Q4_0 GGUF for llama.cpp / ollama) and the one torch's
   packed int4 kernel runs;
3. measure the compressed model the same way (perplexity, the same prompt's continuation and speed);
4. save it (``model/``, ``rankwise generate demo-out/model``) and export it for the runtimes
   (``compressed-tensors/``, ``gguf/``);
5. write ``report.md`` and ``results.json`` (every number, the time of every step).

The protocol is reduced to fit a first look (16 + 16 windows instead of 64 + 64); ``--windows 64
--calib-windows 64`` runs the full one.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import typer

from ._common import QuietOpt, console, setup, table

#: The demo's compression: 4-bit symmetric GPTQ, groups of 32 (exact in compressed-tensors and as GGUF Q4_0).
DEMO_OPTIONS = {"bits": 4, "group_size": 32, "symmetric": True}
DEMO_PROMPT = "What is the capital of France, and what is it famous for?"
EXPORTS = ("compressed-tensors", "gguf")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and p.suffix in (".safetensors", ".gguf"))


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _report_md(r: dict) -> str:
    d, c = r["dense"], r["compressed"]
    rows = "\n".join(
        f"| {name} | {_mb(m['bytes'])} | {m['ppl']:.2f} | {m['generation']['tokens_per_second']:.1f} | "
        f"{m['generation']['first_token_seconds']:.2f} |" for name, m in (("dense (float32)", d), ("compressed", c)))
    exports = "\n".join(f"- `{e['path']}` ({e['format']}, {_mb(e['bytes'])}): {e['serve']}" for e in r["exports"]) \
        or "- (none)"
    notes = "".join(f"- {n}\n" for e in r["exports"] for n in e["notes"])
    t = r["timings"]
    return (
        "# rankwise demo\n\n"
        f"Model: `{r['model']}`. Compression: `{r['structure']}` with {r['options']}"
        + (f" (one-shot GPTQ on {r['calibration']['windows']} x {r['calibration']['seqlen']} calibration tokens, seed "
           f"{r['calibration']['seed']})." if r["structure"] == "gptq" else " (round to nearest, no data).")
        + f" Perplexity on the first {d['windows']} x {d['seqlen']}-token windows of the "
        "wiki test split (the full protocol is 64 x 512). Speed: batch-1 greedy decode of the prompt "
        "below with the KV cache, one run each, same threads, same process.\n\n"
        "| model | weights | perplexity | decode tokens/s | first token s |\n|---|---|---|---|---|\n"
        f"{rows}\n\n"
        + (f"Compressed layers run as: {', '.join(f'{n} {p}' for p, n in sorted(c['layers'].items()))} "
           "(rankwise.models.runtime.prepare_inference).\n\n" if c.get("layers") else
           "The quantized layers run through rankwise's reference forward (no fast kernel in this build).\n\n")
        + f"Prompt: *{r['prompt']}*\n\n"
        f"**Dense:** {d['generation']['text'].strip()}\n\n"
        f"**Compressed:** {c['generation']['text'].strip()}\n\n"
        f"Exports:\n\n{exports}\n\n{notes}\n"
        f"Try it: `rankwise generate {r['out']}/model --prompt \"...\"`.\n\n"
        f"Time: {r['seconds']:.0f} s in all (load {t['load']:.0f}, dense eval {t['dense_eval']:.0f}, compress "
        f"{t['compress']:.0f}, compressed eval {t['compressed_eval']:.0f}, save + export {t['save_export']:.0f}).\n"
    )


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        out: Path = typer.Option(Path("demo-out"), help="Where to write report.md, results.json, the model and the "
                                                        "exports (replaced if it exists)."),
        windows: int = typer.Option(16, min=1, help="Evaluation windows of 512 tokens (protocol: 64)."),
        calib_windows: int = typer.Option(16, min=1, help="Calibration windows of 512 tokens (protocol: 64)."),
        seqlen: int = typer.Option(512, min=2, help="Tokens per evaluation and calibration window."),
        prompt: str = typer.Option(DEMO_PROMPT, "--prompt", help="The prompt both models continue."),
        max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=2, help="Tokens each model generates."),
        quantizer: str = typer.Option("gptq", "--quantizer", help="gptq (fitted on the calibration windows) or "
                                                                  "rtn (round to nearest, no data: faster, worse)."),
        quiet: bool = QuietOpt,
    ) -> None:
        """Compress the default model to 4-bit GPTQ, compare it with dense (perplexity, speed, text), export it."""
        from ..calibration.corpus import load_corpus
        from ..calibration.sampling import tokenize
        from ..compression.compress import build_config, compress
        from ..compression.saving import save_compressed
        from ..evaluation.generation import generate_text, prepare_inference
        from ..evaluation.perplexity import perplexity
        from ..export import FORMATS, export
        from ..files import atomic_dir, write_json, write_text
        from ..models.loading import load_model

        from ..errors import ConfigError

        if quantizer not in ("gptq", "rtn"):
            raise ConfigError(f"--quantizer must be gptq or rtn, got {quantizer!r}")
        setup(quiet)
        g = DEMO_OPTIONS["group_size"]
        bpw = DEMO_OPTIONS["bits"] + 16 / g + 0.01  # the codes plus one float16 scale per group
        build_config(quantizer, None, bpw, options=DEMO_OPTIONS, calib_options={"windows": calib_windows, "seqlen": seqlen})  # fail early
        t0 = time.perf_counter()
        timings: dict[str, float] = {}

        def step(name: str, since: float) -> float:
            now = time.perf_counter()
            timings[name] = now - since
            return now

        def measure(model, tok, ids, label: str) -> dict:
            kernels = prepare_inference(model)  # fast forms of the quantized layers, where this rankwise has them
            res = perplexity(model, ids=ids, seqlen=seqlen, windows=windows, progress=not quiet)
            console.print(f"[bold]{label}[/bold] perplexity {res.ppl:.2f}; continuing the prompt:", highlight=False)
            gen = generate_text(model, tok, prompt, max_new_tokens,
                                write=None if quiet else (lambda s: (sys.stdout.write(s), sys.stdout.flush())))
            if not quiet:
                sys.stdout.write("\n")
            console.print(f"  {gen.new_tokens} tokens, {gen.tokens_per_second:.1f} tokens/s decode, "
                          f"{gen.first_token_seconds:.2f} s to the first token", highlight=False)
            nbytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in model.state_dict().values()}.values())
            return {**res.to_dict(), "generation": gen.to_dict(), "bytes": nbytes, "layers": kernels}

        model, tok, path = load_model(None)
        ids = tokenize(tok, load_corpus("test"))
        now = step("load", t0)
        dense = measure(model, tok, ids, "dense")
        now = step("dense_eval", now)
        console.print(f"compressing: {quantizer.upper()} {DEMO_OPTIONS['bits']}-bit, groups of {g}"
                      + (f", {calib_windows} calibration windows (one-shot)" if quantizer == "gptq" else ""),
                      highlight=False)
        model, rep = compress(model, quantizer, bits_per_weight=bpw, options=DEMO_OPTIONS, tokenizer=tok,
                              calib_options={"windows": calib_windows, "seqlen": seqlen}, mode="one-shot",
                              progress=not quiet)
        now = step("compress", now)
        comp = measure(model, tok, ids, "compressed")
        now = step("compressed_eval", now)
        exports = []
        with atomic_dir(out, overwrite=True) as tmp:
            save_compressed(model, tok, tmp / "model", rep, extra={"source_model": str(path)})
            del model
            for fmt in EXPORTS:
                res = export(tmp / "model", fmt, tmp / fmt, progress=False)
                exports.append({"format": fmt, "path": str(out / fmt), "bytes": _dir_bytes(tmp / fmt),
                                "serve": FORMATS.get(fmt).runtimes, "notes": res.notes})
        step("save_export", now)
        total = time.perf_counter() - t0
        results = {"model": str(path), "out": str(out), "structure": quantizer, "options": DEMO_OPTIONS,
                   "calibration": rep.calibration, "prompt": prompt, "dense": dense, "compressed": comp,
                   "exports": exports, "timings": timings, "seconds": total, "report": rep.to_dict()}
        write_json(out / "results.json", results)
        write_text(out / "report.md", _report_md(results))
        table("rankwise demo", ["model", "weights", "perplexity", "decode tokens/s"], [
            ["dense (float32)", _mb(dense["bytes"]), dense["ppl"], dense["generation"]["tokens_per_second"]],
            [f"{quantizer.upper()} 4-bit g{g}", _mb(comp["bytes"]), comp["ppl"], comp["generation"]["tokens_per_second"]],
        ])
        for e in exports:
            console.print(f"export {e['format']}: {e['path']} ({_mb(e['bytes'])}) -> {e['serve']}", highlight=False)
        console.print(f"wrote {out / 'report.md'} in {total:.0f} s", highlight=False)
