"""Start-up: ``rankwise --help`` imports neither torch nor transformers; the listing matches the commands."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rankwise.cli import COMMANDS, command_group, main

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("torch", "transformers", "numpy", "matplotlib", "safetensors")


def _modules_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (rankwise from this checkout); which heavy modules got imported."""
    probe = code + f"\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_importing_the_cli_imports_no_heavy_module():
    loaded = _modules_after("import rankwise.cli")
    assert not any(loaded.values()), loaded


def test_help_imports_no_heavy_module():
    loaded = _modules_after(
        "import contextlib, io\nfrom rankwise.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['--help']) == 0\n"
        "    for c in ('models', 'eval', 'analyze', 'adapt', 'demo'):\n"
        "        assert main([c, '--help']) == 0, c\n"
        "    assert main(['eval', '--bogus']) == 2\n"
        "    assert main(['models']) == 0\n"
    )
    assert not loaded["torch"] and not loaded["transformers"], loaded


def test_the_control_probe_sees_torch():
    """The probe above can fail: importing the model loader does import torch."""
    assert _modules_after("import rankwise.models.loading")["torch"]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_listed_help_is_the_commands_own(name):
    real = command_group().load(name)
    first_paragraph = " ".join(real.help.split("\n\n")[0].split())
    assert COMMANDS[name] == first_paragraph, f"update rankwise.cli.COMMANDS[{name!r}] to the docstring"


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out
