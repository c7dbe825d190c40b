"""The command line never shows a traceback: every bad invocation is one line on stderr and exit code 2.

A table of bad invocations across every command (run in-process through ``rankwise.cli.main``), a
hypothesis fuzz of argv built from the commands' real option names, and a few runs of the real entry
point (``python -m rankwise``) in a subprocess.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rankwise.cli import main
from rankwise.errors import ConfigError, RankwiseError
from rankwise.models.tiny import TINY_TEXT

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_dir):
    """Placeholders of the table: a tiny model, a text file, a non-model directory, an existing output."""
    root = tmp_path_factory.mktemp("bad-input")
    text = root / "text.txt"
    text.write_text(TINY_TEXT * 20)
    (root / "not-a-model").mkdir()
    (root / "exists").mkdir()
    return dict(tiny=str(tiny_dir), text=str(text), tmp=str(root), nomodel=str(root / "not-a-model"),
                exists=str(root / "exists"), missing=str(root / "missing"))


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line_error(rc: int, err: str) -> str:
    """Exit code 2, exactly one non-empty line on stderr, no traceback; returns that line."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


# (argv with {placeholders}, a fragment the one line must contain). Model-loading cases use the
# tiny model and --quiet (no progress bars); none of them reaches calibration or training.
CASES = [
    # -- top level
    ("nosuch", "No such command 'nosuch'"),
    ("--bogus", "No such option: --bogus"),
    # -- models
    ("models --bogus", "No such option: --bogus"),
    ("models extra-arg", "unexpected extra argument"),
    # -- eval: wrong types, out-of-range numbers, bad paths
    ("eval {tiny} --seqlen abc", "Invalid value for '--seqlen'"),
    ("eval {tiny} --seqlen", "requires an argument"),
    ("eval {tiny} --batch-size 0", "Invalid value for '--batch-size'"),
    ("eval {tiny} --windows -1", "Invalid value for '--windows'"),
    ("eval {tiny} --seqlen 1", "Invalid value for '--seqlen'"),
    ("eval no-such-model -q", "unknown model 'no-such-model'"),
    ("eval {nomodel} -q", "not a model directory"),
    ("eval {text} -q", "not a model directory"),
    ("eval {tiny} --text-file {missing} -q", "does not exist"),
    ("eval {tiny} --json {tmp} -q", "is a directory"),
    # -- demo (only errors found before the real model is loaded)
    ("demo --max-new-tokens abc", "Invalid value for '--max-new-tokens'"),
    ("demo --windows 1.5", "Invalid value for '--windows'"),
    ("demo --bogus", "No such option: --bogus"),
    # -- compress: types, unknown options, names, budgets, regexes, paths
    ("compress --ratio abc", "Invalid value for '--ratio'"),
    ("compress --bogus", "No such option: --bogus"),
    ("compress {tiny} -r", "requires an argument"),
    ("compress {tiny} --ratio 1.5 -q", "must be in (0, 1)"),
    ("compress {tiny} --ratio 0 -q", "must be in (0, 1)"),
    ("compress {tiny} --ratio nan -q", "must be in (0, 1)"),
    ("compress {tiny} --method nope -q", "unknown low-rank objective 'nope'"),
    ("compress {tiny} --structure nope -q", "unknown structure 'nope'"),
    ("compress {tiny} --structure gptq --ratio 0.4 -q", "not --ratio"),
    ("compress {tiny} --structure gptq -q", "needs --bits-per-weight"),
    ("compress {tiny} --structure rtn --bits-per-weight 40 -q", "must be in [1, 32)"),
    ("compress {tiny} --structure rtn --bits-per-weight 3 --group-size 0 -q", "group"),
    ("compress {tiny} --set rank -q", "KEY=VALUE"),
    ("compress {tiny} --set nope=1 -q", "unknown option"),
    ("compress {tiny} --mode both -q", "unknown mode"),
    ("compress {tiny} --granularity layer -q", "unknown granularity"),
    ("compress {tiny} --mode one-shot --refit -q", "sequential"),
    ("compress {tiny} --text-file {text} --calib-file {text} -q", "either --text-file"),
    ("compress {tiny} --structure monarch --whitening eigh -q", "unknown option"),
    ("compress {tiny} --allocate nope -q", "unknown allocator 'nope'"),
    ("compress {tiny} --out {exists} -q", "already exists"),
    ("compress {tiny} --low-memory -q", "needs --out"),
    ("compress {tiny} --low-memory --allocate sensitivity-band --out {tmp}/a -q", "cannot use --allocate sensitivity-band"),
    ("compress {tiny} --targets ( --text-file {text} --calib-seqlen 16 -q", "invalid layer pattern '('"),
    ("compress {tiny} --ratio 0.99 --min-rank 64 --allocate spectrum --method svd --text-file {text} --calib-seqlen 16 "
     "--calib-windows 2 -q", "cannot be met"),
    # -- analyze
    ("analyze {tiny} --layers [ -q", "invalid layer pattern '['"),
    ("analyze {tiny} --metrics nope -q", "unknown metric"),
    ("analyze {tiny} --intruder-eps abc", "Invalid value for '--intruder-eps'"),
    ("analyze {tiny} --calib-windows 0", "Invalid value for '--calib-windows'"),
    ("analyze {tiny} --farms-sampling nope -q", "unknown --farms-sampling 'nope'"),
    ("analyze {tiny} --device nodev -q", "unknown --device 'nodev'"),
    ("analyze {tiny} --csv {tmp} -q", "is a directory"),
    ("analyze {tiny} --compare no-such-base -q", "unknown model 'no-such-base'"),
    # -- adapt
    ("adapt --init pissa", "Missing option '--out'"),
    ("adapt {tiny} --init nope --out {tmp}/a -q", "unknown init 'nope'"),
    ("adapt {tiny} --rank 0 --out {tmp}/a", "Invalid value for '--rank'"),
    ("adapt {tiny} --steps -1 --out {tmp}/a", "Invalid value for '--steps'"),
    ("adapt {tiny} --lr fast --out {tmp}/a", "Invalid value for '--lr'"),
    ("adapt {tiny} --format nope --out {tmp}/a -q", "unknown --format 'nope'"),
    ("adapt {tiny} --alpha 0 --out {tmp}/a -q", "--alpha must be positive"),
    ("adapt {tiny} --out {exists} -q", "already exists"),
    ("adapt {tiny} --targets ( --text-file {text} --seqlen 16 --steps 1 --out {tmp}/a -q",
     "invalid layer pattern '('"),
]


def test_the_table_covers_every_command():
    commands = {c.split()[0] for c, _ in CASES}
    assert {"models", "eval", "demo", "compress", "analyze", "adapt"} <= commands
    assert len(CASES) >= 30


@pytest.mark.parametrize("argv, needle", CASES, ids=[c for c, _ in CASES])
def test_bad_invocation_is_one_line_exit_2(argv, needle, paths, capsys):
    args = [a.format(**paths) for a in argv.split()]
    rc, out, err = run(args, capsys)
    line = assert_one_line_error(rc, err)
    assert needle in line
    assert "internal error" not in line
    assert not Path(paths["tmp"], "a").exists()  # no output left behind


def test_usage_errors_carry_a_help_hint(capsys):
    rc, _, err = run(["compress", "--ratio", "abc"], capsys)
    assert assert_one_line_error(rc, err).endswith("(try 'rankwise compress --help')")
    rc, _, err = run(["--bogus"], capsys)
    assert assert_one_line_error(rc, err).endswith("(try 'rankwise --help')")


def test_no_arguments_prints_help(capsys):
    rc, out, err = run([], capsys)
    assert rc == 0 and "compress" in out and "adapt" in out and err == ""


def test_help_is_exit_0(capsys):
    rc, out, _ = run(["compress", "--help"], capsys)
    assert rc == 0 and "--ratio" in out


def test_a_bug_is_one_internal_error_line(monkeypatch, capsys):
    import rankwise.models.registry as registry

    def boom(**kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(registry, "builtin_status", boom)
    monkeypatch.delenv("RANKWISE_DEBUG", raising=False)
    rc, _, err = run(["models"], capsys)
    line = assert_one_line_error(rc, err)
    assert line == "error: internal error: KeyError: 'a bug' (set RANKWISE_DEBUG=1 for the traceback)"
    monkeypatch.setenv("RANKWISE_DEBUG", "1")
    rc, _, err = run(["models"], capsys)
    assert rc == 2 and "Traceback" in err and "KeyError: 'a bug'" in err


def test_multi_line_messages_are_folded(monkeypatch, capsys):
    import rankwise.models.registry as registry

    def fail(**kwargs):
        raise ConfigError("first line\nsecond line")

    monkeypatch.setattr(registry, "builtin_status", fail)
    rc, _, err = run(["models"], capsys)
    assert assert_one_line_error(rc, err) == "error: first line second line"


# ---- the Python API raises RankwiseError at the origin --------------------------------------

def test_invalid_regex_is_a_config_error(tiny_llama):
    from rankwise.models.surgery import find_linears

    with pytest.raises(ConfigError, match=r"invalid layer pattern '\(\?P<'"):
        find_linears(tiny_llama, "q_proj,(?P<")
    assert len(find_linears(tiny_llama, r"q_proj,layers\.1\.mlp")) == 2 + 3  # valid regexes still work


def test_perplexity_argument_errors_are_config_errors(tiny_llama, random_ids):
    from rankwise.evaluation import perplexity

    with pytest.raises(ConfigError, match="needs token ids or a tokenizer"):
        perplexity(tiny_llama)
    with pytest.raises(ConfigError, match="windows must be a positive"):
        perplexity(tiny_llama, ids=random_ids, seqlen=16, windows=0)
    with pytest.raises(ConfigError, match="batch_size must be a positive"):
        perplexity(tiny_llama, ids=random_ids, seqlen=16, windows=2, batch_size=0)


# ---- fuzz -----------------------------------------------------------------------------------

def _option_names() -> dict[str, list[str]]:
    """Every command's real option names, read from the click commands the CLI builds."""
    from rankwise.cli import COMMANDS, command_group

    group = command_group()
    return {name: sorted({o for p in group.load(name).params for o in (*p.opts, *p.secondary_opts)
                          if o.startswith("-")})
            for name in COMMANDS}


OPTIONS = _option_names()
#: Hash or rebuild the 540 MB bundled checkpoint: correct but too slow for a fuzz example.
SLOW_FLAGS = {"--verify", "--rebuild"}


@pytest.fixture(scope="module")
def no_builtin_models():
    """Fuzzed runs may reach a command body; a built-in model name (the default) then fails at once
    instead of loading the real model. Local paths still go through the real resolver."""
    import rankwise.models.loading as loading
    import rankwise.models.registry as registry

    real = registry.resolve_model

    def resolve(name_or_path):
        if name_or_path is None or registry.canonical_name(str(name_or_path)) is not None:
            raise RankwiseError("fuzz: built-in models are not loaded in this test")
        return real(name_or_path)

    mp = pytest.MonkeyPatch()
    mp.setattr(registry, "resolve_model", resolve)
    mp.setattr(loading, "resolve_model", resolve)
    yield
    mp.undo()


@st.composite
def argvs(draw, tmp: str):
    values = st.one_of(
        st.integers(-3, 5000).map(str),
        st.sampled_from(["0", "-1", "1e9", "nan", "inf", "-inf", "0.5", "1.5", "", " ", "abc", "[", "(?P<",
                         "q_proj", "svd", "pissa", "spectrum", "grid", "cpu", "nodev", "--", "-", "ünïcödé"]),
        st.sampled_from([f"{tmp}/missing", f"{tmp}/file.txt", tmp, f"{tmp}/out"]),
        st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8),
    )
    command = draw(st.sampled_from([*OPTIONS, "nosuch"]))
    opts = [o for o in OPTIONS.get(command, []) if o not in SLOW_FLAGS] + ["--bogus"]
    argv = [command]
    for _ in range(draw(st.integers(0, 4))):
        argv.append(draw(st.sampled_from(opts)))
        if draw(st.booleans()):
            argv.append(draw(values))
    if command not in ("models", "demo", "nosuch") and draw(st.booleans()):
        argv.insert(draw(st.integers(1, len(argv))), draw(st.sampled_from([f"{tmp}/missing", f"{tmp}/file.txt"])))
    return argv


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    (d / "file.txt").write_text(TINY_TEXT)
    return str(d)


def test_fuzzed_argv_exits_0_or_2_without_traceback(fuzz_dir, no_builtin_models, capsys):
    @settings(max_examples=120, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(argvs(fuzz_dir))
    def check(argv):
        rc = main(argv)
        cap = capsys.readouterr()
        assert rc in (0, 2), (argv, rc, cap.err)
        assert "Traceback" not in cap.err + cap.out, argv
        if rc == 2:
            assert len([ln for ln in cap.err.splitlines() if ln.strip()]) == 1, (argv, cap.err)
        assert not Path(fuzz_dir, "out").exists(), argv  # no run got far enough to write

    check()


# ---- the real entry point -------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["compress", "--ratio", "abc"], "Invalid value for '--ratio'"),
    (["adapt", "--init", "pissa"], "Missing option '--out'"),
    (["eval", "--bogus"], "No such option: --bogus"),
])
def test_python_dash_m_rankwise(argv, needle):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "rankwise", *argv], capture_output=True, text=True, env=env,
                       timeout=120)
    line = assert_one_line_error(p.returncode, p.stderr)
    assert needle in line and p.stdout == ""
