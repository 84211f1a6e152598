#!/usr/bin/env bash
# One command for any GPU machine: build fastmix._cuda in place, run the GPU tests, run the GPU
# benchmarks, and write bench/results/gpu-<card name>.md.  Needs only what such a machine comes
# with (python with CUDA torch and triton, nvcc, pybind11); installs nothing, uses no network, and
# stays under 10 minutes (150 + 220 + 180 s stage limits, plus ~30 s of probes, < 600 s in all).
#
#   bash bench/gpu_check.sh                 # PYTHON=/path/to/python to choose the interpreter
#   bash bench/gpu_check.sh DIR             # also copy the report and the full build, test and
#                                           # benchmark logs into DIR (a machine you cannot keep)
set -uo pipefail
copy_to="${1:-}"
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
LOG="$(mktemp -d)"
trap 'rm -rf "$LOG"' EXIT

card="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>"$LOG/probe")" || {
    echo "gpu_check: no usable CUDA device for $PY:" >&2
    cat "$LOG/probe" >&2
    exit 2
}
safe="$(printf '%s' "$card" | tr -cs 'A-Za-z0-9._-' '-' | sed 's/^-*//; s/-*$//')"
out="bench/results/gpu-${safe}.md"
echo "gpu_check: $card -> $out"

# 1. build both modules in place (nvcc compiles csrc/cuda/*.cu; FASTMIX_CUDA=1 makes it required)
build_status="ok"
if ! FASTMIX_CUDA=1 timeout 150 "$PY" setup.py build_ext --inplace -q >"$LOG/build" 2>&1; then
    build_status="FAILED (see below)"
fi
echo "gpu_check: build $build_status"

mkdir -p bench/results

# 2. GPU tests (and the CPU-side tests of the same modules) under a time limit
# SIGINT (not SIGTERM) at the limit: pytest then still prints which tests failed so far
test_status="ok"
timeout -s INT -k 15 220 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops_cuda.py \
    tests/test_ops_gpu.py >"$LOG/tests" 2>&1
rc=$?
if [[ $rc -eq 124 ]]; then test_status="TIMED OUT after 220 s (summary so far below)"
elif [[ $rc -ne 0 ]]; then test_status="FAILED (pytest exit $rc)"; fi
echo "gpu_check: tests $test_status"

# 3. benchmarks: eager reference, torch.compile of it, triton, cuda; roofline
bench_status="ok"
if ! timeout 180 "$PY" bench/bench_ops.py --device cuda --repeats 30 --out "$LOG/bench.md" \
        >"$LOG/bench" 2>&1; then
    bench_status="FAILED or timed out"
fi
echo "gpu_check: benchmarks $bench_status"

{
    echo "# fastmix GPU check: $card"
    echo
    echo "Written by \`bench/gpu_check.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC')."
    echo "$("$PY" -c 'import torch, sys; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")' 2>&1)"
    echo "$(nvcc --version 2>/dev/null | tail -1)"
    echo "$("$PY" -c 'import fastmix; print("backends:", fastmix.backends())' 2>&1)"
    echo
    echo "## Build: $build_status"
    if [[ "$build_status" != ok ]]; then echo '```'; tail -40 "$LOG/build"; echo '```'; fi
    echo
    echo "## Tests: $test_status"
    echo '```'
    tail -25 "$LOG/tests"
    echo '```'
    echo
    echo "## Benchmarks: $bench_status"
    echo
    echo "The fused cuda \`step\` is one kernel launch (statistics, DoReMi update, objective);"
    echo "roofline = max(one pass over loss, ref_loss, ids and mask at the measured copy"
    echo "bandwidth, one empty kernel launch)."
    echo
    if [[ -s "$LOG/bench.md" ]]; then cat "$LOG/bench.md"; else echo '```'; tail -40 "$LOG/bench"; echo '```'; fi
} >"$out.tmp"
mv "$out.tmp" "$out"
echo "gpu_check: wrote $out"
if [[ -n "$copy_to" ]]; then
    mkdir -p "$copy_to" && cp "$out" "$copy_to/" && for f in build tests bench; do
        [[ -f "$LOG/$f" ]] && cp "$LOG/$f" "$copy_to/gpu-check-$f.log"
    done
    echo "gpu_check: copied the report and logs to $copy_to"
fi
[[ "$build_status" == ok && "$test_status" == ok && "$bench_status" == ok ]]
