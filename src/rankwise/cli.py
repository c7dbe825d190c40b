"""The ``rankwise`` command line: a thin typer shell over the Python API.

Each job's commands live in ``rankwise/commands/<name>.py`` and define ``register(app)``.
"""
from __future__ import annotations

import importlib
import sys

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


def main(argv: list[str] | None = None) -> int:
    """Console entry point: RankwiseError becomes a one-line message and exit code 2."""
    from .commands._common import err_console

    try:
        app(args=argv, standalone_mode=False)
    except RankwiseError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        return 130
    except typer.Exit as e:
        return e.exit_code
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            return e.exit_code
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
