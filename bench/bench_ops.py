"""Per-domain statistics and the DoReMi step, side by side: eager torch reference, torch.compile of
the reference, triton, cuda.  Medians over repeats (CUDA events on a GPU), ratios, the machine.

On a GPU it also measures the roofline the fused step is judged against: one pass over the inputs
at the card's measured copy bandwidth, and one empty kernel launch.

    python bench/bench_ops.py                      # GPU: N = 64x2048, 512x2048, 4096x2048
    python bench/bench_ops.py --out results.md     # also write the Markdown tables
    python bench/bench_ops.py --device cpu         # CPU: reference and compile, small N
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import cpu_model, non_negative_int, positive_int  # noqa: E402  (bench/_machine.py)

from fastmix._io import atomic_write_text  # noqa: E402
from fastmix.ops import backends, reference  # noqa: E402

SEQ = 2048


def machine() -> str:
    cpu = cpu_model()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{gpu}; CPU {cpu} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}); "
        f"torch {torch.__version__}"
    )


def timer(device: str, repeats: int, warmup: int) -> Callable[[Callable[[], object]], float]:
    """Median microseconds of fn() over ``repeats`` (CUDA events on a GPU)."""

    def run(fn: Callable[[], object]) -> float:
        for _ in range(warmup):
            fn()
        samples = []
        if device == "cuda":
            torch.cuda.synchronize()
            for _ in range(repeats):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) * 1e3)
        else:
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(samples)

    return run


def make_batch(n_seq: int, k: int, device: str, dtype: torch.dtype):
    g = torch.Generator(device=device).manual_seed(0)
    loss = (torch.rand(n_seq, SEQ, generator=g, device=device) * 6).to(dtype)
    ref = (torch.rand(n_seq, SEQ, generator=g, device=device) * 6).to(dtype)
    domain = torch.randint(0, k, (n_seq,), generator=g, device=device)  # one id per sequence
    mask = torch.rand(n_seq, SEQ, generator=g, device=device) > 0.05
    return loss, ref, domain, mask


def fresh_state(k: int, device: str):
    alpha = torch.full((k,), 1.0 / k, device=device)
    state = torch.stack([alpha, torch.zeros_like(alpha), alpha])
    return state, torch.zeros(3, dtype=torch.int64, device=device)


def stats_ref(loss, domain, mask, ref, k):
    return reference.domain_stats(loss, domain, mask, ref, k)[0]


def step_ref(loss, domain, mask, ref, state, counters, step_size, smoothing):
    return reference.doremi_step_(loss, domain, mask, ref, state, counters, step_size, smoothing,
                                  "dro")  # fmt: skip


def runner(name: str, op: str, batch, k: int, device: str, impls) -> Callable[[], object]:
    """A no-argument call of backend ``name`` doing ``op`` ("stats" or "step") on ``batch``."""
    loss, domain, mask, ref = batch
    stats_fn, step_fn = impls[name]
    if op == "stats":
        return lambda: stats_fn(loss, domain, mask, ref, k)
    state, counters = fresh_state(k, device)
    if name in ("eager", "compile"):
        return lambda: step_fn(loss, domain, mask, ref, state, counters, 1.0, 1e-3)
    workspace = step_fn.fused_workspace(k, loss.device)
    return lambda: step_fn.doremi_step_(loss, domain, mask, ref, state, counters, workspace, 1.0,
                                        1e-3, "dro")  # fmt: skip


def input_bytes(loss, ref, domain, mask) -> int:
    return sum(t.numel() * t.element_size() for t in (loss, ref, domain, mask))


def roofline(device: str, measure) -> tuple[float, float, float]:
    """(copy bandwidth in bytes/µs, µs per empty kernel launched from Python, µs per empty
    kernel replayed from a CUDA graph)."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_us = measure(lambda: dst.copy_(src))
    bandwidth = 2 * src.numel() / copy_us  # read + write
    tiny = torch.empty(1, device=device)
    launches = 200

    def many():
        for _ in range(launches):
            tiny.zero_()

    launch_us = measure(many) / launches
    # the same empty kernels replayed from a CUDA graph: GPU time per kernel, no Python overhead
    try:
        graph_launch_us = graph_replay_us(many, measure, replays=1) / launches
    except Exception:  # noqa: BLE001 - the roofline then uses the Python launch time
        traceback.print_exc()
        graph_launch_us = launch_us
    return bandwidth, launch_us, graph_launch_us


def graph_replay_us(fn: Callable[[], object], measure, replays: int = 20) -> float:
    """Microseconds per call of ``fn`` replayed from a CUDA graph: the GPU time without the
    Python launch overhead (what the roofline is compared with)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()

    def replay():
        for _ in range(replays):
            graph.replay()

    return measure(replay) / replays


def bench(args: argparse.Namespace) -> str:
    device = args.device
    measure = timer(device, args.repeats, args.warmup)
    available = backends()
    names = ["eager", "compile"]
    for name in ("triton", "cuda"):
        if device == "cuda" and available[name]["available"]:
            names.append(name)
    modules = {}
    if "triton" in names:
        from fastmix.ops import triton as triton_ops

        modules["triton"] = triton_ops
    if "cuda" in names:
        from fastmix.ops import cuda as cuda_ops

        modules["cuda"] = cuda_ops

    impls = {
        "eager": (stats_ref, step_ref),
        "compile": (torch.compile(stats_ref, dynamic=True), torch.compile(step_ref, dynamic=True)),
    }
    for name, module in modules.items():
        impls[name] = (module.domain_stats, module)

    lines = [f"Machine: {machine()}", ""]
    if device == "cuda":
        bandwidth, launch_us, graph_launch_us = roofline(device, measure)
        lines += [
            f"Measured copy bandwidth {bandwidth / 1e3:.0f} GB/s; one empty kernel: "
            f"{launch_us:.2f} µs launched from Python, {graph_launch_us:.2f} µs in a CUDA graph. "
            "Roofline = max(one pass over loss, ref_loss, ids and mask at that bandwidth, one "
            "empty kernel in a CUDA graph); the cuda step is compared with it by its CUDA-graph "
            "replay time (GPU time without Python overhead).",
            "",
        ]
    dtype = getattr(torch, args.dtype)
    header = "| op | N | K | " + " | ".join(f"{n} (µs)" for n in names) + " | eager / best |"
    if "cuda" in names:
        header += " eager / cuda |"
    if device == "cuda":
        header += " cuda in a CUDA graph (µs) | roofline (µs) | cuda graph / roofline |"
    lines += [
        f"Medians of {args.repeats} runs; loss and ref_loss {args.dtype}, one int64 domain id per "
        f"{SEQ}-token sequence, bool mask.",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    errors: list[str] = []
    # (backend, op) pairs that failed once: not retried in later rows.  A failing torch.compile
    # recompiles (and fails again) at every call, tens of seconds each on a GPU, which would eat
    # the time limit gpu_check.sh gives the whole table before the kernels' rows are measured.
    failed: set[tuple[str, str]] = set()
    for n_seq in args.sequences:
        for k in args.domains:
            loss, ref, domain, mask = make_batch(n_seq, k, device, dtype)
            n = loss.numel()
            floor = None
            if device == "cuda":
                floor = max(input_bytes(loss, ref, domain, mask) / bandwidth, graph_launch_us)
            for op in ("stats", "step"):
                times: dict[str, float | None] = {}
                graph_time = None
                for name in names:
                    times[name] = None
                    if (name, op) in failed:
                        continue
                    # One backend failing (a compile error, say) costs its cells, not the run.
                    try:
                        fn = runner(name, op, (loss, domain, mask, ref), k, device, impls)
                        times[name] = measure(fn)
                    except Exception as exc:  # noqa: BLE001 - reported under the table
                        failed.add((name, op))
                        traceback.print_exc()  # the whole story goes to the log
                        errors.append(f"{op}, N = {n:,}, K = {k}, {name}: {_one_line(exc)} "
                                      f"(not retried for {op} in later rows)")  # fmt: skip
                    unit = "" if times[name] is None else " µs"
                    print(f"  {op} N={n} K={k} {name}: {_cell(times[name])}{unit}",
                          file=sys.stderr, flush=True)  # fmt: skip
                    if name == "cuda" and times[name] is not None and device == "cuda":
                        # a failed capture costs its cell, listed like any other failure
                        try:
                            graph_time = graph_replay_us(fn, measure)
                        except Exception as exc:  # noqa: BLE001 - reported under the table
                            traceback.print_exc()
                            errors.append(f"{op}, N = {n:,}, K = {k}, cuda in a CUDA graph: "
                                          f"{_one_line(exc)}")  # fmt: skip
                row = f"| {op} | {n_seq}×{SEQ} = {n:,} | {k} | "
                row += " | ".join(_cell(times[name]) for name in names)
                row += f" | {_ratio(times['eager'], _best(times, names))} |"
                if "cuda" in names:
                    row += f" {_ratio(times['eager'], times['cuda'])} |"
                if floor is not None:
                    # no cuda column (the module is not built here): nothing failed, nothing ran
                    graph_cell = _cell(graph_time) if "cuda" in names else "n/a"
                    row += f" {graph_cell} | {floor:.1f} | "
                    row += f"{_ratio(graph_time, floor, 2)} |"
                lines.append(row)
                print(row, flush=True)
                if args.out is not None:  # keep what is measured even if a time limit cuts in
                    write_text(args.out, _with_errors(lines, errors))
    return _with_errors(lines, errors)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, at most ``limit`` characters: one Markdown list item
    (torch.compile's errors run to dozens of lines; the traceback goes to stderr)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cell(us: float | None) -> str:
    return "error" if us is None else f"{us:.1f}"


def _best(times: dict[str, float | None], names: list[str]) -> float | None:
    measured = [times[name] for name in names if name != "eager" and times[name] is not None]
    return min(measured) if measured else None


def _ratio(a: float | None, b: float | None, digits: int = 1) -> str:
    return "n/a" if a is None or b is None else f"{a / b:.{digits}f}×"


def _with_errors(lines: list[str], errors: list[str]) -> str:
    text = "\n".join(lines) + "\n"
    if errors:
        text += "\nErrors (those cells read \"error\"):\n\n" + "".join(
            f"- {e}\n" for e in errors
        )
    return text


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])  # fmt: skip
    parser.add_argument("--sequences", type=positive_int, nargs="+", default=None,
                        help="sequences of 2048 tokens (default GPU: 64 512 4096; CPU: 8 64)")
    parser.add_argument("--domains", type=positive_int, nargs="+", default=[8, 22, 256])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=positive_int, default=None)
    parser.add_argument("--warmup", type=non_negative_int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads (default 1 on CPU: spinning OpenMP threads on a shared "
                        "2-core box made the compiled reference 100x slower)")  # fmt: skip
    args = parser.parse_args()
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.sequences is None:
        args.sequences = [64, 512, 4096] if args.device == "cuda" else [8, 64]
    if args.repeats is None:
        args.repeats = 50 if args.device == "cuda" else 7
    text = bench(args)
    if args.out is not None:
        write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
