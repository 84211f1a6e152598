"""Sampler throughput, fastmix vs numpy / torch, side by side in one process, one thread.

    pytest bench/bench_sampler.py --benchmark-only     # pytest-benchmark tables
    python bench/bench_sampler.py [--n N] [--repeats R] [--out PATH]
        # prints ns/draw medians, ratios and the CPU model; with --out, also writes the table
        # there (e.g. bench/results/sampler-cpu-<cpu>.md; never a committed file by default)

N = 10M draws, K = 22 and 256 (Dirichlet(1) weights), one thread (torch.set_num_threads(1)).
Set FASTMIX_BENCH_N to shrink N for a quick pytest run.  A second table times batch-sized calls
(``MixtureSampler.sample(B)`` for B = 32 and 1024, as a data loader draws each step's domains):
microseconds per call, where the fixed cost of a call matters more than the cost per draw.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

if __package__ in (None, ""):  # run as a script: import the checkout this file lives in
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import cpu_model, positive_int  # noqa: E402  (bench/_machine.py)

from fastmix import _C, MixtureSampler, blend_indices, sample_domains  # noqa: E402
from fastmix._io import atomic_write_text  # noqa: E402

N = int(os.environ.get("FASTMIX_BENCH_N", 10_000_000))
KS = (22, 256)
SEED = 1234


def _weights(k: int) -> np.ndarray:
    return np.random.default_rng(k).dirichlet(np.ones(k))


def _torch():
    try:
        import torch
    except ImportError:  # torch is optional for the sampler
        return None
    torch.set_num_threads(1)
    return torch


def make_cases(k: int, n: int) -> dict[str, Callable[[], object]]:
    """name -> zero-argument callable doing n draws for K = k."""
    w = _weights(k)
    normalised = w / np.sum(w)
    rounded = np.round(w, 3) + 0.001
    out = np.empty(n, dtype=np.int32)
    cases: dict[str, Callable[[], object]] = {
        "alias: sample_domains": lambda: sample_domains(w, n, seed=SEED),
        "alias: sample_domains(out=reused buffer)": lambda: sample_domains(
            w, n, seed=SEED, out=out
        ),
        "alias: MixtureSampler.sample (+counts)": lambda: MixtureSampler(w, seed=SEED).sample(n),
        # The loop CPUs with AVX2 but no AVX-512 run (the same draws), into a fresh array as
        # sample_domains writes.
        "alias: sample_domains, AVX2 loop (CPUs without AVX-512)": lambda: _C.AliasTable(
            normalised
        ).fill(SEED, 0, np.empty(n, dtype=np.int32), isa="avx2"),
        "stratified: MixtureSampler.sample": lambda: MixtureSampler(
            w, seed=SEED, method="stratified"
        ).sample(n),
        "greedy: MixtureSampler.sample": lambda: MixtureSampler(w, method="greedy").sample(n),
        "blend_indices": lambda: blend_indices(w, n),
        # Weights as published tables give them (3 decimals): exact ties at many steps, which
        # the fixed-point screening (K <= 32) cannot settle, so the double kernels run them.
        "blend_indices, weights rounded to 0.001": lambda: blend_indices(rounded, n),
        "blend_indices, AVX2 path (CPUs without AVX-512)": lambda: _C._blend_indices_avx2(
            normalised, n
        ),
        "blend_indices, portable path (no AVX2)": lambda: _C._blend_indices_portable(
            normalised, n
        ),
        "naive greedy loop (C++, baseline)": lambda: _C._blend_indices_naive(normalised, n),
        "numpy default_rng().choice": lambda: np.random.default_rng(SEED).choice(k, n, p=w),
    }
    torch = _torch()
    if torch is not None:
        wt = torch.tensor(w)
        cases["torch.multinomial"] = lambda: torch.multinomial(wt, n, replacement=True)
    return cases


BATCHES = (32, 1024)
METHODS = ("alias", "stratified", "greedy")
BATCH_CALLS = 2000  # calls per timed run in script mode


def make_batch_call(k: int, method: str, batch: int) -> Callable[[], object]:
    """One call drawing the next `batch` ids from one sampler, which advances call after call."""
    sampler = MixtureSampler(_weights(k), seed=SEED, method=method)
    return lambda: sampler.sample(batch)


# ----------------------------------------------------------------------------- pytest-benchmark
CASE_NAMES = list(make_cases(2, 1))


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("case", CASE_NAMES)
def test_sampler_throughput(benchmark, case: str, k: int) -> None:
    fn = make_cases(k, N)[case]
    benchmark.group = f"K={k}, N={N}"
    benchmark.extra_info["ns_per_draw"] = None
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable (one untimed call)
        benchmark.extra_info["ns_per_draw"] = benchmark.stats.stats.median / N * 1e9


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("method", METHODS)
def test_sampler_batch_call(benchmark, method: str, batch: int, k: int) -> None:
    benchmark.group = f"MixtureSampler.sample(B) per call, K={k}"
    benchmark(make_batch_call(k, method, batch))


# ----------------------------------------------------------------------------- script mode
def median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median CPU seconds of this thread, median wall seconds) over `repeats` calls.

    Every case runs on the calling thread (numpy, torch with one thread, fastmix with the GIL
    released but no threads of its own), so the thread's CPU time is the work done, unaffected by
    other processes taking turns on a shared machine; the wall time is reported next to it.
    """
    fn()  # warm-up: page faults, lazy imports
    cpu, wall = [], []
    for _ in range(repeats):
        start_cpu, start_wall = time.thread_time(), time.perf_counter()
        fn()
        cpu.append(time.thread_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
    return statistics.median(cpu), statistics.median(wall)


def run_table(n: int, repeats: int) -> str:
    rows = []
    for k in KS:
        cases = make_cases(k, n)
        medians = {name: median_seconds(fn, repeats) for name, fn in cases.items()}
        numpy_s = medians["numpy default_rng().choice"][0]
        torch_s = medians["torch.multinomial"][0] if "torch.multinomial" in medians else None
        naive_s = medians["naive greedy loop (C++, baseline)"][0]
        for name, (seconds, wall) in medians.items():
            vs_torch = f"{torch_s / seconds:.1f}x" if torch_s else "n/a"
            rows.append(
                f"| {name} | {k} | {seconds / n * 1e9:.2f} | {wall / n * 1e9:.2f} "
                f"| {numpy_s / seconds:.1f}x | {vs_torch} | {naive_s / seconds:.1f}x |"
            )
            print(rows[-1], flush=True)
    header = (
        "| method | K | ns/draw (CPU) | ns/draw (wall) | vs numpy | vs torch | vs naive loop |\n"
        "|---|---:|---:|---:|---:|---:|---:|"
    )
    return header + "\n" + "\n".join(rows)


def run_batch_table(repeats: int) -> str:
    """Microseconds per MixtureSampler.sample(B) call (median of `repeats` runs of BATCH_CALLS)."""
    rows = []
    for k in KS:
        for method in METHODS:
            cells = []
            for batch in BATCHES:
                call = make_batch_call(k, method, batch)

                def calls(call: Callable[[], object] = call) -> None:
                    for _ in range(BATCH_CALLS):
                        call()

                seconds, _ = median_seconds(calls, repeats)
                cells.append(f"{seconds / BATCH_CALLS * 1e6:.1f}")
            rows.append(f"| {method} | {k} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    header = (
        "| method | K | " + " | ".join(f"µs per sample({b}) (CPU)" for b in BATCHES) + " |\n"
        "|---|---:|" + "---:|" * len(BATCHES)
    )
    return header + "\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=positive_int, default=N, help="draws per call (default 10M)")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timed runs per case (median)")
    parser.add_argument(
        "--out", type=Path, default=None, help="markdown file for the table (default: print only)"
    )
    args = parser.parse_args(argv)
    torch = _torch()
    machine = f"{cpu_model()}, {os.cpu_count()} logical CPUs, one thread"
    print(f"# {machine}; N={args.n}; median of {args.repeats}", flush=True)
    table = run_table(args.n, args.repeats)
    batch_table = run_batch_table(args.repeats)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = f"numpy {np.__version__}" + (f", torch {torch.__version__}" if torch else "")
    text = (
        "# Sampler throughput (CPU)\n\n"
        f"Machine: {machine}. Python {platform.python_version()}, {versions}. {stamp}.\n"
        f"N = {args.n:,} draws per call, median of {args.repeats} runs after one warm-up; "
        "Dirichlet(1) weights; `python bench/bench_sampler.py`.\n"
        "Ratios are speed-ups (baseline CPU time / method CPU time), measured in the same "
        "process; CPU time is the calling thread's (`time.thread_time`), wall time is beside "
        "it.\n\n"
        f"{table}\n\n"
        f"Batch-sized calls: one `MixtureSampler` per row drawing its next B ids "
        f"{BATCH_CALLS} times per run (its position advancing), median of {args.repeats} "
        "runs, microseconds of CPU time per call.\n\n"
        f"{batch_table}\n"
    )
    if os.environ.get("FASTMIX_BENCH_NOTE"):
        text += f"\n{os.environ['FASTMIX_BENCH_NOTE']}\n"
    if args.out is None:
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
