"""bench/bench_sampler.py's pytest-benchmark mode, run cheaply (tiny N, timing disabled)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_benchmarks_run_as_smoke_tests_with_timing_disabled():
    # --benchmark-disable runs each benchmark once without timing it (benchmark.stats is None):
    # the usual way to check benchmarks in a test run; it must not crash the benchmark.
    pytest.importorskip("pytest_benchmark")
    env = {**os.environ, "FASTMIX_BENCH_N": "64",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
         "-o", "addopts=", "-k", "blend_indices and 22", str(ROOT / "bench" / "bench_sampler.py")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert " passed" in run.stdout
