"""fastmix._io: the atomic writes every command relies on."""

import os
import stat

import pytest

from fastmix._io import atomic_open, atomic_write_files, atomic_write_json, atomic_write_text


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


def test_permissions_follow_the_umask(tmp_path, monkeypatch):
    import fastmix._io as io_module

    # Read once at import (reading it means setting it, which is not thread-safe later).
    monkeypatch.setattr(io_module, "_UMASK", 0o027)
    atomic_write_text(tmp_path / "a.md", "x")
    assert stat.S_IMODE((tmp_path / "a.md").stat().st_mode) == 0o640


def test_like_a_plain_open_for_modes_links_and_long_names(tmp_path):
    # An existing file keeps its mode, as open(path, "w") would leave it.
    private = tmp_path / "private.json"
    private.write_text("{}")
    os.chmod(private, 0o600)
    atomic_write_text(private, "new")
    assert private.read_text() == "new" and stat.S_IMODE(private.stat().st_mode) == 0o600
    # A symbolic link is written through: its target gets the content, the link stays a link.
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "target.md"
    target.write_text("old")
    link = tmp_path / "link.md"
    link.symlink_to(target)
    atomic_write_text(link, "through")
    assert link.is_symlink() and target.read_text() == "through"
    # A destination name near the 255-byte limit still gets a valid temporary name.
    long_name = tmp_path / ("x" * 250 + ".md")
    atomic_write_text(long_name, "long")
    assert long_name.read_text() == "long"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_set_of_files_is_renamed_in_a_row_after_all_are_written(
    tmp_path, monkeypatch, full_disk_at
):
    import fastmix._io as io_module

    names = ["summary.md", "plot.png", "weights.json"]
    for name in names:
        (tmp_path / name).write_text("old")
    # A failure while writing the last file: every old file stays, no temporary is left.
    full_disk_at("weights.json")
    with pytest.raises(OSError, match="No space"):
        atomic_write_files([(tmp_path / n, b"new " + n.encode()) for n in names])
    assert [(tmp_path / n).read_text() for n in names] == ["old"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    monkeypatch.undo()
    # On success every file is new, renamed in the order given (each after all the writes).
    replaced = []
    real_replace = os.replace

    def recording_replace(src, dst):
        assert len(list(tmp_path.glob(".*.tmp-*"))) == len(names) - len(replaced)
        replaced.append(os.path.basename(dst))
        real_replace(src, dst)

    monkeypatch.setattr(io_module.os, "replace", recording_replace)
    atomic_write_files([(tmp_path / n, b"new " + n.encode()) for n in names])
    assert replaced == names
    assert [(tmp_path / n).read_text() for n in names] == [f"new {n}" for n in names]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)

