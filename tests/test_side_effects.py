"""No side effects: importing or loading with rankwise leaves the environment as it was."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rankwise.models.offline import hub_offline

SRC = Path(__file__).resolve().parents[1] / "src"
KEYS = ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")


def _run(code: str, env_drop=KEYS, **env_set) -> str:
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    env.update(PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]), **env_set)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().splitlines()[-1]


def test_import_and_load_leave_os_environ_unchanged(tiny_dir):
    code = ("import os, json\nbefore = dict(os.environ)\nimport rankwise\n"
            f"model, tok, path = rankwise.load({str(tiny_dir)!r})\n"
            "print(json.dumps([k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)]))")
    assert json.loads(_run(code)) == []


def test_a_users_own_setting_survives_a_load(tiny_dir):
    code = ("import os\nimport rankwise\n"
            f"rankwise.load({str(tiny_dir)!r})\n"
            "print(os.environ['HF_HUB_OFFLINE'], os.environ['TOKENIZERS_PARALLELISM'])")
    assert _run(code, HF_HUB_OFFLINE="0", TOKENIZERS_PARALLELISM="true") == "0 true"


def test_loads_run_offline(tiny_dir, monkeypatch):
    """Inside rankwise's own loads the hub is offline; the tokenizer, config and model calls all see it (a
    plain directory loads as the class its config names: LlamaForCausalLM here)."""
    import transformers

    from rankwise.models.loading import load_model

    seen = []
    for cls in (transformers.AutoTokenizer, transformers.AutoConfig, transformers.LlamaForCausalLM):
        real = cls.from_pretrained

        def spy(*a, _real=real, _name=cls.__name__, **kw):
            seen.append((_name, os.environ.get("HF_HUB_OFFLINE"), kw.get("local_files_only")))
            return _real(*a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    load_model(tiny_dir)
    assert {n for n, _, _ in seen} == {"AutoTokenizer", "AutoConfig", "LlamaForCausalLM"}
    assert all(env == "1" and local for _, env, local in seen), seen
    assert "HF_HUB_OFFLINE" not in os.environ


def test_hub_offline_restores_on_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    with pytest.raises(RuntimeError):
        with hub_offline():
            assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TOKENIZERS_PARALLELISM"] == "false"
            raise RuntimeError("load failed")
    assert os.environ["HF_HUB_OFFLINE"] == "0" and "TOKENIZERS_PARALLELISM" not in os.environ


def test_the_cli_process_is_offline():
    code = ("import os, contextlib, io\nfrom rankwise.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    main(['--help'])\n"
            "print(os.environ.get('HF_HUB_OFFLINE'), os.environ.get('TOKENIZERS_PARALLELISM'))")
    assert _run(code) == "1 false"


PLOTS = """
import json, sys
import matplotlib.pyplot as plt          # the user's pyplot, on the backend MPLBACKEND chose
before = plt.get_backend()
from pathlib import Path
from types import SimpleNamespace
import torch
from rankwise.compression.rankplot import plot_ranks
from rankwise.adaptation.train import plot_losses
from rankwise.analysis.report import write_report
from rankwise.analysis.run import analyze
from rankwise.models.tiny import tiny_model

out = Path(sys.argv[1])
shapes = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.1.self_attn.q_proj": (8, 8)}
plot_ranks({"uniform": {n: 3 for n in shapes}}, shapes, out / "ranks.png")
plot_losses({"pissa": [3.0, 2.0, 1.5]}, out / "loss.png")
write_report(analyze(tiny_model("llama"), metrics="spectrum,powerlaw"), out / "report")
import matplotlib
print(json.dumps([before, plt.get_backend(), matplotlib.get_backend(), len(plt.get_fignums())]))
"""


def test_plots_leave_the_matplotlib_backend_alone(tmp_path):
    code = PLOTS.replace("sys.argv[1]", repr(str(tmp_path)))
    before, after, mpl_after, open_figures = json.loads(_run(code, MPLBACKEND="svg"))
    assert before == "svg" and after == "svg" and mpl_after == "svg"
    assert open_figures == 0  # nothing registered with pyplot
    pngs = [tmp_path / "ranks.png", tmp_path / "loss.png", *sorted((tmp_path / "report").glob("*.png"))]
    assert len(pngs) >= 5
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "ranks.png", "report"]  # no temp files
