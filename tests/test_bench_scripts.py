"""The bench/ scripts, run as the README says (`python bench/<script>.py`), measure the checkout
they live in, not some other fastmix the interpreter would import (an installed one, or the
editable install of another checkout)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script", ["bench_data.py", "validate_regmix.py", "bench_sampler.py", "bench_ops.py"]
)
def test_script_imports_the_fastmix_of_its_own_checkout(script, tmp_path):
    decoy = tmp_path / "elsewhere" / "fastmix"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('another fastmix than the checkout')\n")
    env = {**os.environ, "PYTHONPATH": str(decoy.parent)}
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--help"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "usage:" in run.stdout


@pytest.mark.parametrize(
    "script,args,flag",
    [
        ("bench_sampler.py", ["--repeats", "0"], "--repeats"),
        ("bench_sampler.py", ["--n", "-1"], "--n"),
        ("bench_data.py", ["--batches", "0"], "--batches"),
        ("bench_ops.py", ["--warmup", "-1"], "--warmup"),
        ("bench_ops.py", ["--domains", "8", "0"], "--domains"),
        ("bench_ops.py", ["--threads", "0"], "--threads"),
    ],
)
def test_script_refuses_counts_it_cannot_use_naming_the_flag(script, args, flag, tmp_path):
    # --repeats 0 ended in statistics.median's bare "no median for empty data" after the setup,
    # --n 0 in a division by zero, --threads 0 in torch's error: argparse errors now, up front.
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"argument {flag}: must be >=" in run.stderr
