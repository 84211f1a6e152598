"""bench/gpu_check.sh, the one-shot script for a borrowed GPU machine: what can be checked without a
GPU (its syntax, how it reads pytest's output) is checked here, so a mistake does not waste the
machine."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def script_text() -> str:
    return SCRIPT.read_text()


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _assigned(name: str) -> str:
    match = re.search(rf"^{name}='([^']*)'$", script_text(), re.M)
    assert match, f"{name}=... not found in {SCRIPT.name}"
    return match.group(1)


def _matches(pattern: str, line: str) -> bool:
    # bash's grep -E, as the script runs it
    return subprocess.run(["grep", "-qE", pattern], input=line, text=True).returncode == 0


def test_skips_that_are_expected_on_one_gpu_are_not_reported_as_missed():
    pattern = _assigned("MISSED_GPU_SKIPS")
    two = "needs two CUDA devices"
    assert f'reason="{two}"' in (ROOT / "tests" / "test_ops_gpu.py").read_text()
    # a single-GPU machine skips the two-device test: that is no missed GPU test
    assert not _matches(pattern, f"SKIPPED [2] tests/test_ops_gpu.py:182: {two}")
    assert not _matches(
        pattern,
        "SKIPPED [1] tests/test_ops_cuda.py:93: bogus pointers are safe only when no launch can "
        "happen",
    )
    for reason in (
        "needs a CUDA device",
        "backend='cuda' cannot run on cuda tensors here: fastmix._cuda is not built",
        "fastmix._cuda not built",
    ):
        assert _matches(pattern, f"SKIPPED [3] tests/test_ops_gpu.py:57: {reason}"), reason


def test_pytest_summary_names_failures(tmp_path):
    # The report greps '^(FAILED|ERROR)' from the pytest log: the script's -r option must keep
    # them (pytest's -r replaces its default "fE"; a bare -rs drops FAILED lines).
    calls = [line for line in script_text().splitlines() if "-m pytest" in line]
    assert calls
    for call in calls:
        report = re.search(r"\s(-r\w+)\s", call)
        assert report, call
        (tmp_path / "test_x.py").write_text(
            "import pytest\n"
            "def test_fails():\n    assert 0\n"
            "def test_skips():\n    pytest.skip('why')\n"
        )
        out = subprocess.run(
            [sys.executable, "-m", "pytest", report.group(1), "-p", "no:cacheprovider",
             "-o", "addopts=", str(tmp_path / "test_x.py")],
            capture_output=True, text=True, cwd=tmp_path,
        ).stdout  # fmt: skip
        lines = out.splitlines()
        assert any(line.startswith("FAILED") and "test_fails" in line for line in lines), out
        assert any(line.startswith("SKIPPED") for line in lines), out
