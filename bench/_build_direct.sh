#!/usr/bin/env bash
# Build fastmix._C and fastmix._cuda in place with the compiler calls setup.py makes, without
# setuptools.  bench/gpu_check.sh falls back to it when `setup.py build_ext` fails before compiling
# anything: setuptools missing, or older than 77, which rejects pyproject.toml's SPDX
# `license = "Apache-2.0"` ("invalid pyproject.toml config: `project.license`").  torch 2.11
# only asks for setuptools<82, so a GPU machine can have such a setuptools.
#
#   bash bench/_build_direct.sh [PYTHON]        # from anywhere; builds into fastmix/
#
# Keep the flags in step with setup.py (tests/test_gpu_check.py compares them): CXX_FLAGS plus
# what Pybind11Extension adds for _C; the nvcc command of BuildExt for _cuda.  NVCC, CUDA_HOME,
# FASTMIX_CUDA_ARCHS and CXX are read as setup.py and setuptools read them; nvcc itself reads
# NVCC_APPEND_FLAGS.  The two modules compile in parallel.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:-${PYTHON:-python3}}"

# One value per line: CFLAGS and CCSHARED hold spaces.
mapfile -t conf < <("$PY" -c 'import sysconfig, pybind11
v = sysconfig.get_config_var
print(v("EXT_SUFFIX"), pybind11.get_include(), sysconfig.get_paths()["include"], v("CFLAGS") or "",
      v("CCSHARED") or "", sep="\n")')
if [[ ${#conf[@]} -lt 3 || -z "${conf[0]}" ]]; then
    echo "_build_direct: $PY cannot import pybind11 (or sysconfig failed)" >&2
    exit 1
fi
suffix="${conf[0]}" pybind_inc="${conf[1]}" py_inc="${conf[2]}"
read -ra py_cflags <<<"${conf[3]:-}"
read -ra py_ccshared <<<"${conf[4]:-}"

nvcc="${NVCC:-}"
if [[ -z "$nvcc" || ! -x "$nvcc" ]]; then
    nvcc="$(command -v nvcc || true)"
    [[ -z "$nvcc" ]] && nvcc="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
fi
cuda_pid=""
if [[ "${FASTMIX_CUDA:-}" != 0 && -x "$nvcc" ]]; then
    gencode=() last=""
    IFS=';' read -ra archs <<<"${FASTMIX_CUDA_ARCHS:-80;90}"
    for arch in "${archs[@]}"; do
        [[ -z "$arch" ]] && continue
        gencode+=(-gencode "arch=compute_$arch,code=sm_$arch")
        last=$arch
    done
    gencode+=(-gencode "arch=compute_$last,code=compute_$last")
    cmd=("$nvcc" -O3 -std=c++17 -shared -Xcompiler -fPIC,-fvisibility=hidden --cudart static
         -lineinfo "-I$pybind_inc" "-I$py_inc" "-I$(pwd)/csrc" "${gencode[@]}" csrc/cuda/*.cu
         -o "fastmix/_cuda$suffix")
    echo "${cmd[*]}"
    "${cmd[@]}" &
    cuda_pid=$!
elif [[ "${FASTMIX_CUDA:-}" == 1 ]]; then
    echo "_build_direct: FASTMIX_CUDA=1 but nvcc was not found (set NVCC or CUDA_HOME)" >&2
    exit 1
else
    echo "_build_direct: no nvcc (or FASTMIX_CUDA=0): fastmix._cuda not built" >&2
fi

# Python's own CFLAGS and CCSHARED first, as setuptools puts them (-DNDEBUG -fwrapv -O3 -fPIC on
# 3.11; 3.12 adds -fno-strict-overflow); -g0 -std=c++17 -fvisibility=hidden from Pybind11Extension;
# then setup.py's CXX_FLAGS.  One compiler process per source, then link.
objs="$(mktemp -d)"
trap 'rm -rf "$objs"' EXIT
cxx_flags=("${py_cflags[@]}" "${py_ccshared[@]}" -fPIC -g0 -std=c++17 -fvisibility=hidden -O3
           -ffp-contract=off -Icsrc "-I$pybind_inc" "-I$py_inc")
pids=()
for src in csrc/sampler/*.cpp; do
    obj="$objs/$(basename "$src" .cpp).o"
    echo "${CXX:-c++} ${cxx_flags[*]} -c $src -o $obj"
    "${CXX:-c++}" "${cxx_flags[@]}" -c "$src" -o "$obj" &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do
    wait "$pid" || rc=1
done
if [[ $rc -eq 0 ]]; then
    cmd=("${CXX:-c++}" -shared "$objs"/*.o -o "fastmix/_C$suffix")
    echo "${cmd[*]}"
    "${cmd[@]}" || rc=1
fi
if [[ -n "$cuda_pid" ]]; then
    wait "$cuda_pid" || rc=1
fi
exit "$rc"
