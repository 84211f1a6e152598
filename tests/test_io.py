"""fastmix._io: the atomic writes every command relies on."""

import os
import stat

import pytest

from fastmix._io import atomic_open, atomic_write_json, atomic_write_text


def test_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "weights.json"
    atomic_write_json(path, {"weights": {"a": 1.0}})
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_open(path) as f:
            f.write(b'{"weights": {"a"')  # half a file
            raise RuntimeError("crash midway")
    assert path.read_text() == '{\n  "weights": {\n    "a": 1.0\n  }\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.json"]


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.md", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.md").stat().st_mode) == 0o644
