"""fastmix._cuda without a GPU: it was built where nvcc exists, imports, says why it cannot run,
and validates its arguments in C++ before touching memory."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

import pytest
import torch

import fastmix
from fastmix.ops import cuda as cuda_ops

PACKAGE = Path(fastmix.__file__).parent
BUILT = bool(glob.glob(str(PACKAGE / "_cuda*.so")) + glob.glob(str(PACKAGE / "_cuda*.pyd")))


def test_module_is_built_when_nvcc_is_present():
    if shutil.which("nvcc") is None or os.environ.get("FASTMIX_CUDA") == "0":
        pytest.skip("nvcc absent or FASTMIX_CUDA=0: the CUDA module is optional here")
    assert BUILT, "nvcc is on PATH but fastmix/_cuda*.so was not built"
    assert cuda_ops._cuda is not None, cuda_ops._IMPORT_ERROR


def test_backends_report_says_why():
    report = fastmix.backends()["cuda"]
    ok, why = cuda_ops.availability()
    assert report == {"available": ok, "reason": why}
    if not torch.cuda.is_available():
        assert not ok and why
        with pytest.raises(RuntimeError, match="backend='cuda' cannot run"):
            fastmix.domain_loss_stats(torch.ones(3), torch.zeros(3, dtype=torch.int64), 2,
                                      backend="cuda")  # fmt: skip
    assert not cuda_ops.can_run(torch.device("cpu"))[0]


needs_module = pytest.mark.skipif(cuda_ops._cuda is None, reason="fastmix._cuda not built")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="bogus pointers are safe only "
                            "when no launch can happen")  # fmt: skip


@needs_module
def test_status_and_device_count_do_not_crash():
    module = cuda_ops._cuda
    status = module.status()
    assert isinstance(status, str) and status
    count = module.device_count()
    assert isinstance(count, int) and count >= 0
    if not torch.cuda.is_available():
        assert count == 0 and status.startswith("unavailable: ")
    assert module.MAX_DOMAINS == cuda_ops.MAX_DOMAINS
    assert module.grid_blocks(0) == 1 and module.grid_blocks(1 << 30) == module.MAX_BLOCKS
    assert module.workspace_bytes(8) >= 16 + 12 * 8 * (module.MAX_BLOCKS + 1)


def _stats_args(**override):
    args = dict(
        loss=4096, loss_dtype=0, ref_loss=0, domain=8192, id_dtype=1, mask=0, n=64, seq_len=1,
        num_domains=4, out_stats=16384, out_oob=32768, workspace=65536,
        workspace_nbytes=1 << 20, deterministic=False, stream=0,
    )  # fmt: skip
    args.update(override)
    return args


@needs_module
@pytest.mark.parametrize(
    "override,match",
    [
        (dict(num_domains=0), "num_domains must be in \\[1, 1024\\], got 0"),
        (dict(num_domains=2000), "num_domains must be in"),
        (dict(loss_dtype=7), "loss_dtype must be"),
        (dict(id_dtype=3), "id_dtype must be"),
        (dict(n=-1), "n must be >= 0"),
        (dict(seq_len=0), "seq_len must be >= 1"),
        (dict(seq_len=5), "must be a multiple of seq_len"),
        (dict(loss=0), "loss is a null pointer"),
        (dict(loss=4098), "loss is not aligned to 4 bytes"),
        (dict(domain=8196), "domain is not aligned to 8 bytes"),
        (dict(out_stats=0), "out_stats is a null pointer"),
        (dict(workspace_nbytes=64), "workspace has 64 bytes, needs"),
    ],
)
def test_cxx_validates_domain_stats_arguments(override, match):
    with pytest.raises(ValueError, match=match):
        cuda_ops._cuda.domain_stats(**_stats_args(**override))


@needs_module
def test_cxx_validates_update_arguments():
    module = cuda_ops._cuda
    good = dict(stats=4096, num_domains=4, state=8192, counters=16384, objective=32768,
                aux=65536, step_size=1.0, smoothing=0.001, dro=True, stream=0)  # fmt: skip
    for override, match in [
        (dict(step_size=-1.0), "step_size must be finite and >= 0"),
        (dict(step_size=float("nan")), "step_size must be finite"),
        (dict(smoothing=1.5), "smoothing must be in \\[0, 1\\]"),
        (dict(counters=16388), "counters is not aligned to 8 bytes"),
        (dict(num_domains=0), "num_domains must be in"),
    ]:
        with pytest.raises(ValueError, match=match):
            module.update(**{**good, **override})


@needs_module
@no_gpu
def test_launch_without_a_gpu_raises_the_cuda_error():
    with pytest.raises(RuntimeError, match="domain_stats launch failed: cuda"):
        cuda_ops._cuda.domain_stats(**_stats_args())


@needs_module
def test_fused_workspace_traces_under_compile(monkeypatch):
    # DoReMi.step allocates its workspace on the first call, possibly while torch.compile traces
    # it: asking the compiled module for the size must not break a fullgraph compile.
    monkeypatch.setattr(cuda_ops, "_module", lambda: cuda_ops._cuda)  # no GPU needed for the size
    make = torch.compile(lambda: cuda_ops.fused_workspace(8, torch.device("cpu")), fullgraph=True,
                         backend="eager")  # fmt: skip
    workspace = make()
    assert workspace.dtype == torch.uint8 and workspace.numel() == cuda_ops._cuda.workspace_bytes(8)
    assert torch.all(workspace == 0)
