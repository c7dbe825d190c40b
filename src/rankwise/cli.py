"""The ``rankwise`` command line: a thin typer shell over the Python API.

Each job's commands live in ``rankwise/commands/<name>.py`` and define ``register(app)``.
"""
from __future__ import annotations

import importlib
import os
import sys
import traceback

import typer

from .errors import RankwiseError

app = typer.Typer(
    name="rankwise",
    help="Matrix structure of neural-network weights: compress, adapt, analyze.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Modules under rankwise.commands that add commands to the app.
COMMAND_MODULES = ["models", "eval", "demo", "compress", "analyze", "adapt"]

for _name in COMMAND_MODULES:
    importlib.import_module(f"rankwise.commands.{_name}").register(app)


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
    from typer import _click  # typer >= 0.16 vendors click: its exception classes live here

    try:
        typer.main.get_command(app).main(args=argv, prog_name="rankwise", standalone_mode=False)
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
