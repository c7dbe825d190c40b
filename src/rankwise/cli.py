"""The ``rankwise`` command line: a thin typer shell over the Python API.

Each job's commands live in ``rankwise/commands/<name>.py`` and define ``register(app)``. A command's
module is imported only when that command runs (or its ``--help`` is shown), so ``rankwise --help``
imports neither torch nor transformers.

Exit codes: 0 success; 2 any error, printed as one line on stderr; 130 interrupted.
"""
from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import TYPE_CHECKING

import typer
from typer.core import TyperCommand, TyperGroup

from .errors import RankwiseError

if TYPE_CHECKING:
    from typer import _click

HELP = "Matrix structure of neural-network weights: compress, adapt, analyze."

#: Command name -> the first paragraph of its docstring, shown by ``rankwise --help`` without importing
#: the command's module (tests/test_cli_startup.py keeps the two equal).
COMMANDS: dict[str, str] = {
    "models": "List the built-in models, whether their package is installed, and their cache state.",
    "eval": "Perplexity = exp(mean token NLL) over non-overlapping windows of the test split.",
    "demo": "Compress the default model to 4-bit GPTQ, compare it with dense (perplexity, speed, text), export it.",
    "compress": "Replace the linear layers by structures fitted on calibration activations.",
    "analyze": "Singular values, stable/effective rank, energy ranks, power-law alpha (WeightWatcher-compatible), "
               "FARMS alpha, whitened spectrum (--calib) and intruder dimensions (--compare), per layer.",
    "adapt": "Attach low-rank adapters initialized from the spectrum / activations / gradients, train, save.",
    "merge": "Merge fine-tunes of one base (average, task arithmetic, TIES, OPCM), streamed tensor by tensor.",
    "match": "Permute MODEL_B's hidden units (residual stream, heads, FFN channels) into MODEL_A's basis by weight or "
             "activation matching; the function of MODEL_B is unchanged.",
    "lock": "Fold random invertible query-key and value-output transforms into every attention layer: the same "
            "function, but task-vector merging with it collapses.",
    "export": "Write a compressed (or plain) model in the format a runtime reads: compressed-tensors (vLLM, "
              "transformers), gptq, gguf (llama.cpp, ollama), dense, ... Reads the input tensor by tensor.",
    "train": "Train with projected-gradient optimizers, structured layers and initializations; checkpoints resume.",
    "generate": "Continue a prompt with a dense, compressed or exported model, streaming the tokens; print tokens/s.",
}
#: Modules under rankwise.commands that add commands to the app.
COMMAND_MODULES = list(COMMANDS)


class LazyGroup(TyperGroup):
    """The ``rankwise`` group: lists every command from :data:`COMMANDS` and builds a command (imports
    ``rankwise.commands.<name>`` and runs its ``register``) only when it is invoked."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name, text in COMMANDS.items():  # placeholders: enough for the listing and for typo suggestions
            self.commands[name] = TyperCommand(name, help=text, short_help=text)
        self._built: set[str] = set()

    def load(self, name: str) -> "_click.Command | None":
        """The real command ``name`` (built on first use), or None for an unknown name."""
        if name in COMMANDS and name not in self._built:
            sub = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
            importlib.import_module(f"rankwise.commands.{name}").register(sub)
            self.commands[name] = typer.main.get_command(sub)
            self._built.add(name)
        return self.commands.get(name)

    def resolve_command(self, ctx, args):
        if args:
            self.load(args[0])
        return super().resolve_command(ctx, args)


def command_group() -> LazyGroup:
    """A fresh ``rankwise`` click group (commands are built lazily)."""
    return LazyGroup(name="rankwise", help=HELP, no_args_is_help=True)


def _one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) folded into one space."""
    return " ".join(str(text).split())


def _error(message: str) -> int:
    """Print ``error: message`` as one line on stderr (red prefix on a terminal); return exit code 2."""
    color = sys.stderr.isatty() and "NO_COLOR" not in os.environ
    prefix = "\x1b[1;31merror:\x1b[0m" if color else "error:"
    sys.stderr.write(f"{prefix} {_one_line(message)}\n")
    sys.stderr.flush()
    return 2


def _usage_hint(e: "_click.ClickException") -> str:
    ctx = getattr(e, "ctx", None)
    path = ctx.command_path if ctx is not None else "rankwise"
    return f"(try '{path} --help')"


def main(argv: list[str] | None = None) -> int:
    """Console entry point. Exit codes: 0 success, 2 any error (one line on stderr), 130 interrupted.

    A usage error (unknown option, bad value, missing option) prints one line with a ``--help`` hint;
    a :class:`RankwiseError` prints its message; any other exception is a bug in rankwise and prints
    one ``internal error`` line (``RANKWISE_DEBUG=1`` prints its traceback first).
    """
    from typer import _click  # typer vendors click: its exception classes live here

    # The CLI is rankwise's own process: never reach the hub, no tokenizers fork warning.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        command_group().main(args=argv, prog_name="rankwise", standalone_mode=False)
    except _click.exceptions.NoArgsIsHelpError as e:  # plain `rankwise`: the help, not an error
        sys.stdout.write(e.format_message() + "\n")
        return 0
    except _click.ClickException as e:  # usage errors: bad/unknown/missing options, bad values
        return _error(f"{e.format_message()} {_usage_hint(e)}")
    except RankwiseError as e:
        return _error(str(e))
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("aborted\n")
        return 130
    except typer.Exit as e:
        return e.exit_code
    except OSError as e:  # a path that cannot be read or written: the user's to fix
        return _error(f"{e} (check the path, its permissions and the free disk space)")
    except Exception as e:  # a bug in rankwise: one line, the traceback on request
        if os.environ.get("RANKWISE_DEBUG"):
            traceback.print_exc()
        return _error(f"internal error: {type(e).__name__}: {e} (set RANKWISE_DEBUG=1 for the traceback)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
