"""Atomic file writes: the one place fastmix writes a file a user (or a loader) may read.

A file is written under a temporary name in its destination folder, flushed to disk, given the
permissions a plain ``open()`` would give (an existing file's, else those the umask allows), and
renamed over the destination (through a symbolic link, onto its target); on any error the
temporary file is removed.  A crash therefore never leaves a truncated file under the real name.
``atomic_write_files`` writes several files that belong together, renaming them in a row at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any thread of ours
    # writes a file (setting it later could give another thread's new file the wrong mode).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
# A temporary name must stay a valid file name (255 bytes) beside a long destination name.
_NAME_MAX = 255
_TMP_SUFFIX_BYTES = len(".tmp-") + 8 + 2  # mkstemp's 8 random characters, the leading dot


def _temporary_prefix(name: str) -> str:
    keep = name.encode("utf-8", "surrogateescape")[: _NAME_MAX - _TMP_SUFFIX_BYTES - 1]
    return "." + keep.decode("utf-8", "ignore") + ".tmp-"


@contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """A binary file object for ``path``; the file appears under that name only on success.

    Like a plain ``open(path, "wb")``: a symbolic link is written through (its target is
    replaced), and an existing file keeps its permissions.
    """
    path, mode = _destination(path)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path.name), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _destination(path: str | os.PathLike[str]) -> tuple[Path, int]:
    """The file a write to ``path`` replaces (through a symbolic link) and the mode to give it."""
    path = Path(os.path.realpath(path))
    try:
        mode = path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~_UMASK
    except OSError:
        mode = 0o666 & ~_UMASK
    return path, mode


def atomic_write_files(files: Sequence[tuple[str | os.PathLike[str], bytes]]) -> None:
    """Write several files as one set: every file is written and flushed to disk under a
    temporary name first, then all are renamed into place in a row, in the order given (put the
    file readers look for last).  An error or a crash while writing leaves every old file as it
    was; only one between the renames (microseconds apart) leaves old and new side by side."""
    written: list[tuple[str, Path]] = []
    try:
        for path, data in files:
            target, mode = _destination(path)
            fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(target.name), dir=target.parent)
            written.append((tmp, target))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)  # mkstemp creates 0600
        while written:
            tmp, target = written[0]
            os.replace(tmp, target)
            written.pop(0)
    except BaseException:
        for tmp, _ in written:
            Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def json_text(obj: Any) -> str:
    """``obj`` as the indented JSON every fastmix output file holds (key order kept: it is
    meaningful), ending in a newline."""
    return json.dumps(obj, indent=2) + "\n"


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as :func:`json_text` to ``path`` atomically."""
    atomic_write_text(path, json_text(obj))


def path_arg(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a Path; TypeError/ValueError naming ``what`` for a non-path or an empty one."""
    if not isinstance(path, (str, os.PathLike)):  # Path(None) names no argument
        raise TypeError(f"{what} must be a path (str or os.PathLike), got {type(path).__name__}")
    if os.fspath(path) == "":  # Path("") is ".": `-o "$OUT"` with OUT unset wrote into the cwd
        raise ValueError(f"{what}: empty path (give a folder, '.' for the current one)")
    return Path(path)


def make_dir(path: str | os.PathLike[str], what: str) -> Path:
    """Create the folder ``path`` (and its parents) if needed, and return it.

    Raises ValueError naming ``what`` (the argument or flag) when ``path`` is a file or a part of
    it is, or the folder cannot be created.
    """
    path = path_arg(path, what)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what}: {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{what}: cannot create {path}: a part of the path is a file") from None
    except OSError as exc:
        raise ValueError(f"{what}: cannot create {path}: {exc.strerror or exc}") from None
    return path


def writable_dir(path: str | os.PathLike[str], what: str) -> Path:
    """:func:`make_dir`, then proof that this process can write there (a command's --out).

    Also raises ValueError naming ``what`` for a folder without write permission or on a
    read-only file system, before any work whose results could not be saved.
    """
    path = make_dir(path, what)
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: {path} is not writable")
    # os.access says yes to root on a read-only mount: try a real write too.
    probe = path / f".fastmix-write-test-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe.write_bytes(b"")
    except OSError as exc:
        raise ValueError(f"{what}: {path} is not writable ({exc.strerror or exc})") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return path
