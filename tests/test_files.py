"""rankwise.files: every write is atomic; a failed write leaves no temp file and the old file intact."""
from __future__ import annotations

import csv
import json

import pytest

from rankwise.files import atomic_dir, atomic_file, atomic_path, write_json, write_text


class Unserializable:
    def __str__(self):  # write_json falls back to str(); make that fail half-way through the dump
        raise RuntimeError("cannot serialize")


def _listing(d):
    return sorted(p.name for p in d.iterdir())


def test_write_json_error_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "result.json"
    write_json(path, {"ok": 1})
    with pytest.raises(RuntimeError, match="cannot serialize"):
        write_json(path, {"a": list(range(1000)), "b": Unserializable()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert _listing(tmp_path) == ["result.json"]


def test_write_json_error_on_a_new_file_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        write_json(tmp_path / "new.json", [Unserializable()])
    assert _listing(tmp_path) == []


def test_atomic_file_error_keeps_the_old_bytes(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(path, "wb") as f:
            f.write(b"new, half written")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"old" and _listing(tmp_path) == ["data.bin"]


def test_atomic_path_error_removes_the_temp(tmp_path):
    path = tmp_path / "plot.png"
    with pytest.raises(OSError):
        with atomic_path(path) as tmp:
            assert tmp.suffix == ".png" and tmp.parent == tmp_path
            tmp.write_bytes(b"partial")
            raise OSError("disk full")
    assert _listing(tmp_path) == []


def test_successful_writes_replace_and_are_readable(tmp_path):
    p = write_text(tmp_path / "a.md", "# title\nü\n")
    assert p.read_text(encoding="utf-8") == "# title\nü\n"
    write_json(tmp_path / "a.json", {"x": [1, 2]})
    write_json(tmp_path / "a.json", {"x": [3]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [3]}
    assert oct((tmp_path / "a.json").stat().st_mode & 0o777) == oct(0o644)
    with atomic_file(tmp_path / "t.csv", newline="") as f:
        csv.writer(f).writerows([["a", "b"], ["1", "x,y"]])
    assert (tmp_path / "t.csv").read_bytes() == b'a,b\r\n1,"x,y"\r\n'
    with open(tmp_path / "t.csv", newline="") as f:
        assert list(csv.reader(f)) == [["a", "b"], ["1", "x,y"]]
    assert _listing(tmp_path) == ["a.json", "a.md", "t.csv"]


def test_atomic_dir_error_keeps_the_old_directory(tmp_path):
    dest = tmp_path / "out"
    with atomic_dir(dest) as d:
        (d / "f.txt").write_text("v1")
    with pytest.raises(ValueError):
        with atomic_dir(dest, overwrite=True) as d:
            (d / "f.txt").write_text("v2")
            raise ValueError("failed")
    assert (dest / "f.txt").read_text() == "v1" and _listing(tmp_path) == ["out"]
