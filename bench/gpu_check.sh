#!/usr/bin/env bash
# One command for any GPU machine: build fastmix._cuda in place, run the GPU tests, run the GPU
# benchmarks, and write bench/results/gpu-<card name>.md.  Needs only what such a machine comes
# with (python with CUDA torch and triton, nvcc, pybind11, pytest); installs nothing, uses no
# network.  One overall deadline (GPU_CHECK_BUDGET seconds, default 500: a machine lent for 10
# minutes keeps a minute and a half in hand for the kill grace of the last stage and the report)
# bounds every stage, so the machine is never overrun; the report is rewritten after every stage.
#
#   bash bench/gpu_check.sh                 # PYTHON=/path/to/python to choose the interpreter
#                                           # (default: python3, else python, that imports torch)
#   bash bench/gpu_check.sh DIR             # logs and the report go straight into DIR as each
#                                           # stage ends (a machine you cannot keep: even a kill
#                                           # of the whole command leaves what was done)
#
# Order: build; the tests only a GPU can run (CUDA graphs, torch.compile, no host sync, DoReMi);
# the benchmarks; then the long dtype/shape sweep of the statistics (~100 Triton compilations)
# with whatever time is left.
set -uo pipefail
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET:-500}))
copy_to="${1:-}"
# DIR is taken relative to where the script was called from, not to the repository root
if [[ -n "$copy_to" ]]; then
    mkdir -p "$copy_to" && copy_to="$(cd "$copy_to" && pwd)" || exit 2
fi
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
else  # the first of python3, python that has torch (images differ in which one has it)
    PY=python3
    for candidate in python3 python; do
        if timeout 90 "$candidate" -c 'import torch' >/dev/null 2>&1; then PY=$candidate; break; fi
    done
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compile on the GPU (triton 3.6's interpreter fails with numpy >= 2.4)
if [[ -n "$copy_to" ]]; then
    LOG="$copy_to"
else
    LOG="$(mktemp -d)"
    trap 'rm -rf "$LOG"' EXIT
fi

# Seconds for a stage: its cap, or what is left before the deadline less a reserve for the report.
left() {
    local cap=$1 rest=$((DEADLINE - SECONDS - 25))
    ((rest < cap)) && cap=$rest
    ((cap < 5)) && cap=5
    echo "$cap"
}

probe="$LOG/gpu-check-probe.log"
card="$(timeout 90 "$PY" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>"$probe")"
[[ $? -ne 0 || -z "$card" ]] && card="no usable CUDA device"
safe="$(printf '%s' "$card" | tr -cs 'A-Za-z0-9._-' '-' | sed 's/^-*//; s/-*$//')"
if [[ "$card" == "no usable CUDA device" ]]; then
    out="$LOG/gpu-check-report.md"  # nothing measured: no gpu-*.md in the repository
else
    mkdir -p bench/results
    out="bench/results/gpu-${safe}.md"
fi
{
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    # each version on its own, so a missing package (setuptools, say) hides no other
    timeout 60 "$PY" -c 'import importlib, sys
found = ["python " + sys.version.split()[0]]
for name in ("torch", "triton", "numpy", "setuptools", "pybind11", "pytest"):
    try:
        found.append(f"{name} {importlib.import_module(name).__version__}")
    except Exception as exc:
        found.append(f"{name} MISSING ({type(exc).__name__})")
    if name == "torch" and "MISSING" not in found[-1]:
        found.append(f"(CUDA {sys.modules[name].version.cuda})")
print(" ".join(found))'
    command -v nvcc && timeout 20 nvcc --version | tail -2
} >>"$probe" 2>&1
build_status="not run" a_status="not run" b_status="not run" bench_status="not run"
build_ok=0  # built (by setup.py or by the direct fallback) and every backend can run

report() {
    {
        echo "# fastmix GPU check: $card"
        echo
        echo "Written by \`bench/gpu_check.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), ${SECONDS} s in."
        echo
        echo '```'
        tail -8 "$probe"
        [[ -f "$LOG/gpu-check-backends.txt" ]] && cat "$LOG/gpu-check-backends.txt"
        echo '```'
        echo
        echo "## Build: $build_status"
        if [[ "$build_status" != ok && -s "$LOG/gpu-check-build.log" ]]; then
            echo '```'; tail -40 "$LOG/gpu-check-build.log"; echo '```'
        fi
        local part name status
        for part in a b; do
            name="GPU-only tests"; [[ $part == b ]] && name="statistics sweep"
            status="${part}_status"
            echo
            echo "## Tests, $name: ${!status}"
            if [[ -f "$LOG/gpu-check-tests-$part.log" ]]; then
                echo '```'; grep -E '^(FAILED|ERROR)' "$LOG/gpu-check-tests-$part.log" | head -20
                tail -15 "$LOG/gpu-check-tests-$part.log"; echo '```'
            fi
        done
        echo
        echo "## Benchmarks: $bench_status"
        echo
        echo "The fused cuda \`step\` is one kernel launch (statistics, DoReMi update, objective);"
        echo "roofline = max(one pass over loss, ref_loss, ids and mask at the measured copy"
        echo "bandwidth, one empty kernel launch)."
        echo
        [[ -s "$LOG/gpu-check-bench.md" ]] && cat "$LOG/gpu-check-bench.md"
        # a failed or cut-short run: the log's end says where (per-cell times, the traceback)
        if [[ "$bench_status" != ok && -s "$LOG/gpu-check-bench.log" ]]; then
            echo; echo '```'; tail -40 "$LOG/gpu-check-bench.log"; echo '```'
        fi
    } >"$out.tmp" && mv "$out.tmp" "$out"
    # into DIR atomically too: a kill during a plain cp would leave a truncated report there
    if [[ -n "$copy_to" && "$(dirname "$out")" != "$LOG" ]]; then
        cp "$out" "$LOG/.report.tmp" && mv -f "$LOG/.report.tmp" "$LOG/$(basename "$out")"
    fi
    return 0
}

if [[ "$card" == "no usable CUDA device" ]]; then
    echo "gpu_check: no usable CUDA device for $PY:" >&2
    cat "$probe" >&2
    report
    exit 2
fi
echo "gpu_check: $card -> $out"
report

# 1. build both modules in place, in parallel (nvcc compiles csrc/cuda/*.cu for its targets with
#    its own threads; FASTMIX_CUDA=1 makes the CUDA module required).  Two fallbacks, so that one
#    machine quirk does not cost every cuda test: a gcc newer than this nvcc accepts is retried
#    with -allow-unsupported-compiler, and when setup.py cannot build at all (setuptools missing,
#    or < 77, which rejects pyproject.toml's license string) bench/_build_direct.sh makes the same
#    compiler calls without setuptools.
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} --threads 0"
build_log="$LOG/gpu-check-build.log"
: >"$build_log"
build_setup() {
    local lim start=$SECONDS rc
    lim=$(left 150)
    echo "== $PY setup.py build_ext --inplace -j 4 (limit $lim s; NVCC_APPEND_FLAGS=$NVCC_APPEND_FLAGS)" >>"$build_log"
    # -k: nvcc or a compiler that ignores SIGTERM would hold the whole check past its budget
    FASTMIX_CUDA=1 timeout -k 10 "$lim" "$PY" setup.py build_ext --inplace -j 4 >>"$build_log" 2>&1
    rc=$?
    # 137 after the limit: killed after the grace, a time-out all the same (before it: the
    # kernel's OOM killer, a failure)
    if ((rc == 137 && SECONDS - start >= lim)); then rc=124; fi
    return $rc
}
build_setup
rc=$?
if [[ $rc -ne 0 && $rc -ne 124 ]] && grep -q 'unsupported GNU version' "$build_log"; then
    NVCC_APPEND_FLAGS="$NVCC_APPEND_FLAGS -allow-unsupported-compiler"
    build_setup
    rc=$?
fi
if [[ $rc -eq 0 ]]; then
    build_status="ok" build_ok=1
elif [[ $rc -eq 124 ]]; then
    build_status="TIMED OUT (setup.py; see below)"
else
    lim=$(left 150)
    echo "== setup.py failed (exit $rc): bash bench/_build_direct.sh (limit $lim s)" >>"$build_log"
    if FASTMIX_CUDA=1 timeout -k 10 "$lim" bash bench/_build_direct.sh "$PY" >>"$build_log" 2>&1; then
        build_status="ok, by bench/_build_direct.sh (setup.py failed with exit $rc: see the build log)"
        build_ok=1
    else
        build_status="FAILED (setup.py exit $rc, then bench/_build_direct.sh; see below)"
    fi
fi
# Every backend must be able to run here, or its GPU tests would only be skipped.
timeout "$(left 60)" "$PY" -c 'import sys, fastmix
b = fastmix.backends(); print("backends:", b)
sys.exit(0 if b["cuda"]["available"] and b["triton"]["available"] else 3)' \
    >"$LOG/gpu-check-backends.txt" 2>&1 || {
    build_status="$build_status; a GPU backend is unavailable"
    build_ok=0
}
echo "gpu_check: build $build_status"
report

# Skip reasons that mean a GPU test did not run although it should have: no CUDA for this torch,
# a backend that cannot run (resolve_backend's "cannot run"), the CUDA module missing.  Expected
# skips on one GPU ("needs two CUDA devices", test_ops_cuda's no-GPU-only test) must not match.
MISSED_GPU_SKIPS='needs a CUDA device|cannot run|fastmix._cuda not built'

# 2. pytest under the deadline: SIGINT first (pytest still prints what failed so far), verbose so
#    a hang shows its test's name, and faulthandler to print where it hangs.  -rfEs: the summary
#    names failures, errors and skips (a bare -rs replaces pytest's default "fE" and the report's
#    FAILED/ERROR lines would be missing).
run_tests() {  # part cap pytest-arguments...
    local part=$1 cap=$2 lim rc status missed
    shift 2
    lim=$(left "$cap")
    timeout -s INT -k 10 "$lim" "$PY" -m pytest -v -rfEs -p no:cacheprovider \
        -o faulthandler_timeout=90 "$@" >"$LOG/gpu-check-tests-$part.log" 2>&1
    rc=$?
    missed="$(grep -E '^SKIPPED' "$LOG/gpu-check-tests-$part.log" | grep -E "$MISSED_GPU_SKIPS")"
    status="ok"
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then status="TIMED OUT after $lim s (the log ends at that test)"
    elif [[ $rc -ne 0 ]]; then status="FAILED (pytest exit $rc)"
    elif [[ -n "$missed" ]]; then
        status="INCOMPLETE: GPU tests were skipped: $(head -3 <<<"$missed" | tr '\n' ' ')"
    fi
    printf -v "${part}_status" '%s' "$status"
    echo "gpu_check: tests ($part) $status"
    report
}

# 2a. what only a GPU can show: CUDA graphs, torch.compile, no host sync, the fused step
run_tests a 180 --continue-on-collection-errors -k 'not test_stats_match_torch' \
    tests/test_ops_cuda.py tests/test_ops_gpu.py tests/test_data_mixture.py::test_cuda_tensor_weights

# 3. benchmarks: eager reference, torch.compile of it, triton, cuda; roofline (finished rows are
#    kept if the limit cuts in)
lim=$(left 120)
timeout -k 10 "$lim" "$PY" bench/bench_ops.py --device cuda --repeats 30 \
    --out "$LOG/gpu-check-bench.md" >"$LOG/gpu-check-bench.log" 2>&1
rc=$?
if [[ $rc -eq 0 ]]; then
    bench_status="ok"
elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
    bench_status="TIMED OUT after $lim s (the rows measured so far, then the log's end)"
else
    bench_status="FAILED (exit $rc; the rows measured so far, then the log's end)"
fi
echo "gpu_check: benchmarks $bench_status"
report

# 2b. the dtype/shape sweep of the statistics against torch, with whatever time is left
run_tests b 200 tests/test_ops_gpu.py -k test_stats_match_torch

echo "gpu_check: wrote $out${copy_to:+ (and the logs to $copy_to)}"
echo "gpu_check: summary for $card after ${SECONDS} s:"
echo "  build:            $build_status"
echo "  GPU-only tests:   $a_status"
echo "  benchmarks:       $bench_status"
echo "  statistics sweep: $b_status"
# the direct build is a build: a machine whose setup.py cannot build (the case the fallback exists
# for) passes when everything else does
[[ $build_ok -eq 1 && "$a_status" == ok && "$b_status" == ok && "$bench_status" == ok ]]
