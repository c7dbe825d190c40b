"""``rankwise generate``: continue a prompt with a dense, compressed or exported model, streamed, with its speed."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ._common import ModelArg, QuietOpt, check_output_file, console, err_console, setup


def register(app: typer.Typer) -> None:
    from ..evaluation.generation import DEFAULT_PROMPT

    @app.command("generate")
    def generate_cmd(
        model: Optional[str] = typer.Argument(
            None, help="Built-in model name, a directory written by rankwise compress / rankwise.save, a Hugging "
                       "Face directory, or an export (dense, compressed-tensors, remote-code, a GGUF file or its "
                       "directory)."),
        prompt: str = typer.Option(DEFAULT_PROMPT, "--prompt", "-p", help="Text to continue (a user turn when the "
                                                                          "tokenizer has a chat template)."),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, help="Tokens to generate at most."),
        temperature: float = typer.Option(0.0, "--temperature", min=0.0,
                                          help="0 = greedy decoding; above 0, sampling at this temperature."),
        seed: int = typer.Option(0, "--seed", help="Seed of the sampling (with --temperature > 0)."),
        chat: Optional[bool] = typer.Option(None, "--chat/--no-chat",
                                            help="Use the tokenizer's chat template (default: when it has one)."),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                               help="Allow a directory that ships its own modeling code (the "
                                                    "remote-code export); runs that code."),
        device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N"),
        dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the text and the speed as JSON."),
        quiet: bool = QuietOpt,
    ) -> None:
        """Continue a prompt with a dense, compressed or exported model, streaming the tokens; print tokens/s."""
        check_output_file(json_out, "--json", ".json")
        from ..compression.engine.device import parse_dtype, resolve_device

        want = parse_dtype(dtype)
        if want is None:
            from ..errors import ConfigError

            raise ConfigError("--dtype auto is not supported here; use float32, bfloat16 or float16")
        dev = resolve_device(device)
        setup(quiet)
        from ..api import generate
        from ..evaluation.generation import prepare_inference
        from ..models.loading import load_model

        lm, tok, path = load_model(model, dtype=want, device=dev, trust_remote_code=trust_remote_code)
        kernels = prepare_inference(lm)  # the quantized layers' fast forms, built before the clock starts

        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        res = generate(lm, tok, prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                       chat=chat, stream=write)
        sys.stdout.write("\n")
        sys.stdout.flush()
        rate = "n/a" if res.tokens_per_second != res.tokens_per_second else f"{res.tokens_per_second:.1f}"
        err_console.print(f"{res.new_tokens} new tokens in {res.seconds:.2f} s: {rate} tokens/s decode, "
                          f"{res.first_token_seconds:.2f} s to the first token ({res.prompt_tokens} prompt tokens"
                          f"{', chat template' if res.chat_template else ''}; {path})", highlight=False, soft_wrap=True)
        if kernels:
            err_console.print("layers: " + ", ".join(f"{n} {p}" for p, n in sorted(kernels.items())), highlight=False,
                              soft_wrap=True)
        if json_out:
            from ..files import write_json

            write_json(json_out, {"model": str(path), "prompt": prompt, **res.to_dict(), "layers": kernels})
            console.print(f"wrote {json_out}")
