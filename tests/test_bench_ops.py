"""bench/bench_ops.py's bookkeeping on the CPU: what it writes when a backend fails (on the GPU
machine, where gpu_check.sh runs it once under a time limit)."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench_ops(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    return importlib.import_module("bench_ops")


def test_a_failing_backend_is_tried_once_per_op_and_reported_on_one_line(monkeypatch, tmp_path):
    bench_ops = _bench_ops(monkeypatch)
    calls = []

    def broken_compile(fn, **kwargs):
        def compiled(*args, **kw):
            calls.append(fn.__name__)
            raise RuntimeError(
                "backend='inductor' raised:\nCompilationError: boom\n\n"
                "Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace"
            )

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    out = tmp_path / "ops.md"
    args = argparse.Namespace(device="cpu", sequences=[1, 2], domains=[2, 3], dtype="float32",
                              repeats=1, warmup=0, out=out, threads=None)  # fmt: skip
    text = bench_ops.bench(args)
    # four rows per op, but each broken (backend, op) is called once, not once per row
    assert sorted(calls) == ["stats_ref", "step_ref"]
    rows = [line for line in text.splitlines() if line.startswith(("| stats", "| step"))]
    assert len(rows) == 8 and all("| error |" in row for row in rows)
    errors = text.split("Errors")[1].strip().splitlines()[2:]
    assert len(errors) == 2, errors
    for line in errors:
        assert line.startswith("- ") and "compile: RuntimeError: backend='inductor' raised" in line
        assert "not retried" in line
    assert out.read_text() == text
