"""The package's layout holds: every module imports alone (no import cycle), dependencies point down
only, no private name crosses a package boundary, and ``import rankwise`` has no side effects."""
from __future__ import annotations

import ast
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import rankwise

SRC = Path(rankwise.__file__).parent

#: Each top-level part and the parts it may import (besides itself). Lower layers never import upper ones.
ALLOWED = {
    "errors": set(),
    "registry": {"errors"},
    "options": {"errors"},
    "files": {"errors"},
    "figures": {"files"},
    "linalg": {"errors", "registry"},
    "structures": {"errors", "registry", "linalg"},
    "calibration": {"errors", "files", "models", "linalg"},
    "models": {"errors", "files", "registry", "structures", "linalg"},
    "evaluation": {"errors", "files", "models", "calibration", "structures"},
    "compression": {"errors", "files", "figures", "registry", "options", "linalg", "structures", "calibration", "models",
                    "evaluation"},
    "adaptation": {"errors", "files", "figures", "registry", "options", "linalg", "structures", "calibration", "models",
                   "evaluation", "export"},  # export.peft: the one PEFT adapter writer
    "analysis": {"errors", "files", "figures", "registry", "options", "linalg", "structures", "calibration", "models",
                 "evaluation"},
    "merging": {"errors", "files", "figures", "registry", "options", "linalg", "structures", "calibration", "models",
                "evaluation"},
    "training": {"errors", "files", "figures", "registry", "options", "linalg", "structures", "calibration", "models",
                 "evaluation"},
    "healing": {"errors", "structures", "adaptation"},
    "export": {"errors", "files", "registry", "options", "linalg", "structures", "models"},
    "optim": {"training"},
    "api": None,  # the top: may import anything
    "cli": None,
    "commands": None,
    "__init__": {"errors"},
    "__main__": None,
}


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(SRC)], prefix="rankwise."))


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports(path: Path, module: str) -> list[tuple[str, list[str]]]:
    """``(imported rankwise module, imported names)`` of one source file, relative imports resolved."""
    tree = ast.parse(path.read_text())
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("rankwise"):
                out.append((target, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("rankwise")]
    return out


def _path(module: str) -> Path:
    rel = Path(*module.split(".")[1:])
    return SRC / rel / "__init__.py" if (SRC / rel).is_dir() else SRC / rel.with_suffix(".py")


def test_every_module_imports_alone():
    code = (
        "import importlib, sys\n"
        "import torch, transformers\n"
        f"mods = {_modules()!r}\n"
        "bad = []\n"
        "for m in mods:\n"
        "    for k in [k for k in sys.modules if k == 'rankwise' or k.startswith('rankwise.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{m}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


def test_dependencies_point_down_and_private_names_stay_home():
    wrong, private = [], []
    for module in _modules():
        part = _part(module)
        allowed = ALLOWED.get(part, "missing")
        assert allowed != "missing", f"{module}: add its part {part!r} to ALLOWED with its allowed imports"
        for target, names in _imports(_path(module), module):
            tpart = _part(target)
            if allowed is not None and tpart not in (part, "__init__") and tpart not in allowed:
                wrong.append(f"{module} imports {target}")
            if tpart != part:
                private += [f"{module} imports {target}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    assert not wrong, "\n".join(wrong)
    assert not private, "\n".join(private)


def test_import_rankwise_has_no_side_effects():
    code = ("import os, sys; before = dict(os.environ); import rankwise; "
            "assert dict(os.environ) == before, 'environment changed'; "
            "assert 'matplotlib' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)[:5]; "
            "print('ok')")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
