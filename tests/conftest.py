"""Test-session setup shared by every test module.

Without a CUDA device, Triton kernels can still be checked on CPU tensors through Triton's
interpreter, which must be switched on before triton is first imported.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def full_disk_at(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """``full_disk_at("summary.csv")``: from then on, flushing the temporary file of an atomic
    write to that name fails as a full disk would (ENOSPC); other writes go through."""
    import fastmix._io as io_module

    real_fsync = os.fsync

    def install(name: str) -> None:
        def fsync(fd: int) -> None:
            if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}.tmp-"):
                raise OSError(errno.ENOSPC, "No space left on device")
            real_fsync(fd)

        monkeypatch.setattr(io_module.os, "fsync", fsync)

    return install
