"""bench/gpu_check.sh, the one-shot script for a borrowed GPU machine: what can be checked without a
GPU (its syntax, how it reads pytest's output) is checked here, so a mistake does not waste the
machine."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def script_text() -> str:
    return SCRIPT.read_text()


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _assigned(name: str) -> str:
    match = re.search(rf"^{name}='([^']*)'$", script_text(), re.M)
    assert match, f"{name}=... not found in {SCRIPT.name}"
    return match.group(1)


def _matches(pattern: str, line: str) -> bool:
    # bash's grep -E, as the script runs it
    return subprocess.run(["grep", "-qE", pattern], input=line, text=True).returncode == 0


def test_skips_that_are_expected_on_one_gpu_are_not_reported_as_missed():
    pattern = _assigned("MISSED_GPU_SKIPS")
    two = "needs two CUDA devices"
    assert f'reason="{two}"' in (ROOT / "tests" / "test_ops_gpu.py").read_text()
    # a single-GPU machine skips the two-device test: that is no missed GPU test
    assert not _matches(pattern, f"SKIPPED [2] tests/test_ops_gpu.py:182: {two}")
    assert not _matches(
        pattern,
        "SKIPPED [1] tests/test_ops_cuda.py:93: bogus pointers are safe only when no launch can "
        "happen",
    )
    for reason in (
        "needs a CUDA device",
        "backend='cuda' cannot run on cuda tensors here: fastmix._cuda is not built",
        "fastmix._cuda not built",
    ):
        assert _matches(pattern, f"SKIPPED [3] tests/test_ops_gpu.py:57: {reason}"), reason


def test_pytest_summary_names_failures(tmp_path):
    # The report greps '^(FAILED|ERROR)' from the pytest log: the script's -r option must keep
    # them (pytest's -r replaces its default "fE"; a bare -rs drops FAILED lines).
    calls = [line for line in script_text().splitlines() if "-m pytest" in line]
    assert calls
    for call in calls:
        report = re.search(r"\s(-r\w+)\s", call)
        assert report, call
        (tmp_path / "test_x.py").write_text(
            "import pytest\n"
            "def test_fails():\n    assert 0\n"
            "def test_skips():\n    pytest.skip('why')\n"
        )
        out = subprocess.run(
            [sys.executable, "-m", "pytest", report.group(1), "-p", "no:cacheprovider",
             "-o", "addopts=", str(tmp_path / "test_x.py")],
            capture_output=True, text=True, cwd=tmp_path,
        ).stdout  # fmt: skip
        lines = out.splitlines()
        assert any(line.startswith("FAILED") and "test_fails" in line for line in lines), out
        assert any(line.startswith("SKIPPED") for line in lines), out


STUB = """#!/bin/sh
# records its arguments, one per line, and creates the file after -o
printf '%s\\n' "$@" > "$STUB_LOG/$(basename "$0").$$"
while [ $# -gt 0 ]; do
    if [ "$1" = -o ]; then mkdir -p "$(dirname "$2")"; : > "$2"; fi
    shift
done
"""


def _recorded(log: Path, tool: str) -> list[list[str]]:
    return [p.read_text().splitlines() for p in sorted(log.glob(f"{tool}.*"))]


def _code_flags(args: list[str]) -> set[str]:
    """Flags that change the compiled code: no warnings, include paths, files or -c/-o."""
    skip_next = {"-o", "-c"}
    out, it = set(), iter(args)
    for a in it:
        if a in skip_next:
            next(it, None)
        elif a.startswith(("-W", "-I", "-L")) or a == "-g" or not a.startswith("-"):
            continue
        else:
            out.add(a)
    return out


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs sh")
def test_direct_build_makes_the_compiler_calls_setup_py_makes(tmp_path, monkeypatch):
    pytest.importorskip("setuptools")
    pytest.importorskip("pybind11")
    tree = tmp_path / "tree"
    for name in ("setup.py", "pyproject.toml", "README.md"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    (tree / "bench").mkdir()
    shutil.copy(ROOT / "bench" / "_build_direct.sh", tree / "bench")
    (tree / "fastmix").mkdir()
    (tree / "fastmix" / "__init__.py").write_text("")
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for tool in ("nvcc", "cc"):
        (stubs / tool).write_text(STUB)
        (stubs / tool).chmod(0o755)
    logs = {}
    for how in ("setup", "direct"):
        log = tmp_path / f"log-{how}"
        log.mkdir()
        cc = str(stubs / "cc")
        env = {"PATH": f"{stubs}:/usr/bin:/bin", "STUB_LOG": str(log), "NVCC": str(stubs / "nvcc"),
               "CC": cc, "CXX": cc, "LDSHARED": f"{cc} -shared", "FASTMIX_CUDA": "1",
               "HOME": str(tmp_path)}  # fmt: skip
        cmd = (
            [sys.executable, "setup.py", "build_ext", "--inplace"]
            if how == "setup"
            else ["bash", "bench/_build_direct.sh", sys.executable]
        )
        run = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr
        logs[how] = log
        for stale in (tree / "fastmix").glob("_*"):
            stale.unlink()

    # nvcc: the same arguments (the sources in either order; setup.py links into build/ first)
    def nvcc(how):
        (args,) = _recorded(logs[how], "nvcc")
        out = args.index("-o") + 1
        return sorted([*args[:out], Path(args[out]).name, *args[out + 1 :]])

    direct_nvcc = nvcc("direct")
    assert direct_nvcc == nvcc("setup")
    assert "arch=compute_90,code=sm_90" in direct_nvcc

    # _C: every source compiled with the flags that matter, and linked to the same name
    def compiles(how):
        return [c for c in _recorded(logs[how], "cc") if "-c" in c]

    def linked(how):
        (link,) = [c for c in _recorded(logs[how], "cc") if "-c" not in c]
        return Path(link[link.index("-o") + 1]).name

    sources = lambda how: sorted(c[c.index("-c") + 1] for c in compiles(how))  # noqa: E731
    assert sources("direct") == sources("setup") == sorted(
        f"csrc/sampler/{p.name}" for p in (ROOT / "csrc" / "sampler").glob("*.cpp")
    )
    setup_flags = set.union(*(_code_flags(c) for c in compiles("setup")))
    direct_flags = set.union(*(_code_flags(c) for c in compiles("direct")))
    assert setup_flags <= direct_flags, setup_flags - direct_flags
    assert linked("direct") == linked("setup")


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="with a GPU the script runs for minutes"
)
def test_without_a_gpu_it_stops_early_and_leaves_its_report_in_dir(tmp_path, monkeypatch):
    # DIR relative to the caller's directory, not the repository root the script changes to
    monkeypatch.chdir(tmp_path)
    before = set((ROOT / "bench" / "results").iterdir())
    run = subprocess.run(
        ["bash", str(SCRIPT), "out"], env={**__import__("os").environ, "PYTHON": sys.executable},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2, run.stdout + run.stderr
    assert "no usable CUDA device" in run.stderr
    report = (tmp_path / "out" / "gpu-check-report.md").read_text()
    assert report.startswith("# fastmix GPU check: no usable CUDA device")
    assert "torch " in report  # the versions line of the probe
    assert (tmp_path / "out" / "gpu-check-probe.log").is_file()
    assert set((ROOT / "bench" / "results").iterdir()) == before  # no gpu-*.md for no GPU


FAKE_PYTHON = """#!/usr/bin/env bash
# an interpreter that sees a GPU, then fails every stage fast (setup.py always; the rest passes
# with FAKE_OK set)
case "$*" in
  *get_device_name*) echo "Fake GPU 9000";;
  *"import torch"*) ;;
  *importlib*) echo "python 3 torch 0 (CUDA 0)";;
  *"-m pytest"*) [ -n "$FAKE_OK" ] && { echo "1 passed"; exit 0; }
                echo "FAILED tests/test_x.py::test_y - boom"; exit 1;;
  *bench_ops.py*) echo "| stats | 1 |";;
  *fastmix.backends*) [ -n "$FAKE_OK" ] || exit 3;;
  *) exit 1;;
esac
"""


def test_with_a_gpu_every_stage_reports_and_dir_gets_the_same_report(tmp_path):
    # The whole flow with a fake GPU interpreter, in a copy of the tree (the report goes to the
    # tree's bench/results/): each stage's status, the exit status, the report copied into DIR.
    tree = tmp_path / "tree"
    (tree / "bench").mkdir(parents=True)
    for name in ("gpu_check.sh", "_build_direct.sh"):
        shutil.copy(ROOT / "bench" / name, tree / "bench")
    python = tmp_path / "fakepython"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    run = subprocess.run(
        ["bash", str(tree / "bench" / "gpu_check.sh"), str(tmp_path / "out")],
        env={**__import__("os").environ, "PYTHON": str(python), "GPU_CHECK_BUDGET": "120"},
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    report = tree / "bench" / "results" / "gpu-Fake-GPU-9000.md"
    text = report.read_text()
    assert text.startswith("# fastmix GPU check: Fake GPU 9000")
    assert "## Build: FAILED" in text and "## Benchmarks: ok" in text
    assert "FAILED tests/test_x.py::test_y" in text
    assert (tmp_path / "out" / report.name).read_text() == text
    leftovers = [p.name for d in (tmp_path / "out", report.parent) for p in d.iterdir()
                 if p.name.endswith(".tmp")]  # fmt: skip
    assert not leftovers


def _tree_with_a_fake_gpu(tmp_path, interpreter: str):
    """A copy of gpu_check.sh in tmp_path/tree (whose bench/_build_direct.sh always builds) and
    the fake interpreter script ``interpreter`` to run it with."""
    tree = tmp_path / "tree"
    (tree / "bench").mkdir(parents=True)
    shutil.copy(ROOT / "bench" / "gpu_check.sh", tree / "bench")
    (tree / "bench" / "_build_direct.sh").write_text("echo built directly\n")
    python = tmp_path / "fakepython"
    python.write_text(interpreter)
    python.chmod(0o755)
    return tree, python


def test_a_build_by_the_direct_fallback_counts_as_built(tmp_path):
    # setup.py fails (old setuptools, say), bench/_build_direct.sh builds, everything else
    # passes: the check passes (exit 0), as when the -allow-unsupported-compiler retry builds.
    tree, python = _tree_with_a_fake_gpu(tmp_path, FAKE_PYTHON)
    env = {**__import__("os").environ, "PYTHON": str(python), "GPU_CHECK_BUDGET": "120"}
    run = subprocess.run(["bash", str(tree / "bench" / "gpu_check.sh")], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, env={**env, "FAKE_OK": "1"})
    assert "build:            ok, by bench/_build_direct.sh" in run.stdout, run.stdout
    assert run.returncode == 0, run.stdout + run.stderr
    # a backend that cannot run after that build still fails the check
    run = subprocess.run(["bash", str(tree / "bench" / "gpu_check.sh")], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, env=env)
    assert "a GPU backend is unavailable" in run.stdout
    assert run.returncode == 1, run.stdout + run.stderr


def test_a_build_that_ignores_sigterm_is_killed_at_its_limit(tmp_path):
    # nvcc, or a compiler it runs, that ignores SIGTERM must not hold the check past its budget:
    # the build stage is killed after a grace and reported as timed out, not as failed.
    # an ignored signal stays ignored across exec: sleep ignores SIGTERM too
    tree, python = _tree_with_a_fake_gpu(tmp_path, FAKE_PYTHON.replace(
        '  *) exit 1;;', "  *setup.py*) trap '' TERM; sleep 600;;\n  *) exit 1;;"))  # fmt: skip
    # a budget of 30 s leaves the build 5 s (the least any stage gets)
    env = {**__import__("os").environ, "PYTHON": str(python), "GPU_CHECK_BUDGET": "30"}
    proc = subprocess.Popen(["bash", str(tree / "bench" / "gpu_check.sh")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**env, "FAKE_OK": "1"}, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        # a check that hangs leaves no process behind (the fake build ignores SIGTERM, and
        # timeout runs it in a process group of its own, inside the script's session)
        subprocess.run(["pkill", "-KILL", "-s", str(proc.pid)], check=False)
        proc.wait()
    assert "build:            TIMED OUT" in out, out + err
    assert proc.returncode == 1, out + err
