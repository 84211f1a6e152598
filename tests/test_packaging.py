"""The source distribution: what a build from it and its test suite need must be inside."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    not ((ROOT / "setup.py").is_file() and (ROOT / "fastmix").is_dir()),
    reason="needs the source tree",
)
def test_sdist_holds_the_headers_the_tests_and_ci(tmp_path: Path) -> None:
    # Build from a copy: setup.py sdist writes fastmix.egg-info beside itself.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info", "build", ".venv")
    for name in ("csrc", "fastmix", "tests", "bench", ".ci"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
        cwd=src, capture_output=True, text=True, env={"FASTMIX_CUDA": "0", "PATH": ""},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (archive,) = (tmp_path / "dist").glob("fastmix-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {
        p.relative_to(src).as_posix()
        for pattern in ("csrc/**/*", "tests/*.py", "fastmix/**/*.py")
        for p in src.glob(pattern)
        if p.is_file()
    }
    needed |= {".ci/run", "setup.py", "pyproject.toml", "README.md", "fastmix/py.typed"}
    assert any(name.endswith(".h") for name in needed)
    assert needed <= names, sorted(needed - names)


@pytest.mark.skipif(not (ROOT / "pyproject.toml").is_file(), reason="needs the source tree")
def test_version_matches_pyproject() -> None:
    import fastmix

    match = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert match is not None and match.group(1) == fastmix.__version__
