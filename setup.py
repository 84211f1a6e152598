"""Build fastmix's compiled modules.

fastmix._C     the CPU sampler (C++17, pybind11); always built.
fastmix._cuda  the CUDA kernels (nvcc, pybind11, static CUDA runtime); it takes raw device pointers
               and a stream, so it never links libtorch.  FASTMIX_CUDA=0 skips it, FASTMIX_CUDA=1
               requires it, unset builds it when nvcc is found.
"""

import os
import shutil
import subprocess
import sysconfig
from glob import glob
from pathlib import Path

import pybind11
from pybind11.setup_helpers import Pybind11Extension
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.sdist import sdist

ROOT = Path(__file__).parent.resolve()
# -ffp-contract=off: no fused multiply-add, so float results are the same bits on every x86/ARM box.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fvisibility=hidden"]
# sm_80 (A100), sm_90 (H100/H200) as real code, plus PTX for newer cards to JIT.
CUDA_ARCHS = os.environ.get("FASTMIX_CUDA_ARCHS", "80;90")


def find_nvcc() -> str | None:
    for candidate in (
        os.environ.get("NVCC"),
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
    ):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def want_cuda() -> bool:
    flag = os.environ.get("FASTMIX_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"FASTMIX_CUDA must be 0, 1 or unset, got {flag!r}")
    if flag == "0":
        return False
    if find_nvcc() is None:
        if flag == "1":
            raise SystemExit("FASTMIX_CUDA=1 but nvcc was not found (set NVCC or CUDA_HOME)")
        print("fastmix: nvcc not found, building without the CUDA module")
        return False
    return True


class BuildExt(build_ext):
    """build_ext that hands the CUDA module to nvcc in a single compile-and-link call."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name != "fastmix._cuda":
            return super().build_extension(ext)
        nvcc = find_nvcc()
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        archs = [a for a in CUDA_ARCHS.split(";") if a]
        gencode = []
        for arch in archs:
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
        cmd = [
            nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden",
            "--cudart", "static", "-lineinfo",
            f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
            f"-I{ROOT / 'csrc'}",
            *gencode, *ext.sources, "-o", str(out),
        ]  # fmt: skip
        print(" ".join(cmd))
        subprocess.check_call(cmd)


class SDist(sdist):
    """sdist with the whole test suite (conftest and helpers too), the CUDA emulation, bench/ and
    the CI script: setuptools' defaults take only the sources, the ``depends`` headers and the
    test_*.py files."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        extra = [
            f
            for pattern in ("csrc/**/*", "tests/*.py", "bench/**/*", ".ci/run")
            for f in sorted(glob(pattern, recursive=True))
            if os.path.isfile(f) and "__pycache__" not in f and f not in files
        ]
        super().make_release_tree(base_dir, [*files, *extra])


ext_modules: list[Extension] = [
    Pybind11Extension(
        "fastmix._C",
        sorted(glob("csrc/sampler/*.cpp")),
        include_dirs=["csrc"],
        depends=sorted(glob("csrc/sampler/*.h")),  # an edited header rebuilds the module
        cxx_std=17,
        extra_compile_args=CXX_FLAGS,
    )
]
if want_cuda():
    ext_modules.append(Extension("fastmix._cuda", sorted(glob("csrc/cuda/*.cu"))))

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt, "sdist": SDist})
