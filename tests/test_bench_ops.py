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


# One row per op on "cuda" (see _on_a_fake_gpu)
_ONE_ROW = argparse.Namespace(device="cuda", sequences=[1], domains=[2], dtype="float32",
                              repeats=1, warmup=0, out=None, threads=None)  # fmt: skip


def _on_a_fake_gpu(monkeypatch, cuda: bool):
    """bench_ops as on a GPU machine, with every call timed as 1 µs on CPU tensors; the cuda
    backend available or not, no triton, torch.compile a no-op."""
    bench_ops = _bench_ops(monkeypatch)
    make_batch = bench_ops.make_batch
    monkeypatch.setattr(bench_ops, "roofline", lambda device, measure: (1e3, 1.0, 1.0))
    monkeypatch.setattr(bench_ops, "make_batch", lambda n, k, device, dtype: make_batch(
        n, k, "cpu", dtype))  # fmt: skip
    monkeypatch.setattr(bench_ops, "timer", lambda device, repeats, warmup: lambda fn: 1.0)
    monkeypatch.setattr(bench_ops, "backends", lambda: {
        "triton": {"available": False}, "cuda": {"available": cuda}})  # fmt: skip
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    return bench_ops


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


def test_without_the_cuda_backend_the_graph_column_reads_na_not_error(monkeypatch):
    # On a GPU whose fastmix._cuda did not build (gpu_check.sh still runs the benchmarks), the
    # "cuda in a CUDA graph" cells are not errors: no cuda column was measured at all.
    bench_ops = _on_a_fake_gpu(monkeypatch, cuda=False)
    monkeypatch.setattr(bench_ops, "fresh_state", lambda k, device: (None, None))
    text = bench_ops.bench(_ONE_ROW)
    rows = [line for line in text.splitlines() if line.startswith(("| stats", "| step"))]
    assert len(rows) == 2, text
    for row in rows:
        assert "error" not in row, row
        assert row.split("|")[-4].strip() == "n/a", row
    assert "Errors" not in text


def test_a_failed_cuda_graph_capture_is_listed_under_the_table(monkeypatch):
    # The cuda backend runs but its capture in a CUDA graph fails: that cell reads error and the
    # reason is listed with the other errors (it went to stderr only, under a table whose
    # "error" cells had no explanation in the report).
    bench_ops = _on_a_fake_gpu(monkeypatch, cuda=True)
    monkeypatch.setattr(bench_ops, "runner", lambda *args: lambda: None)

    def capture_fails(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(torch.cuda, "Stream", capture_fails)  # the capture's first step
    text = bench_ops.bench(_ONE_ROW)
    rows = [line for line in text.splitlines() if line.startswith(("| stats", "| step"))]
    assert len(rows) == 2, text
    for row in rows:
        cells = [c.strip() for c in row.split("|")]
        assert cells[6] == "1.0", row  # the cuda column itself was measured
        assert cells[-4] == "error", row
    errors = text.split("Errors")[1].strip().splitlines()[2:]
    assert errors == [
        f"- {op}, N = {bench_ops.SEQ:,}, K = 2, cuda in a CUDA graph: RuntimeError: operation "
        "not permitted when stream is capturing" for op in ("stats", "step")
    ], errors
