"""Random batches shared by the ops tests (test_ops, test_ops_triton, test_ops_gpu), and a
subprocess with a capped address space for the allocation-probe tests (test_ops, test_mixers)."""

from __future__ import annotations

import subprocess
import sys

import torch


def make_batch(seed, shape, k, dtype=torch.float32, per_sequence=False, id_dtype=torch.int64,
               with_mask=True, with_ref=True, used=None, device="cpu"):  # fmt: skip
    """(loss, domain, ref_loss, mask): losses in [0, 6), ids in [0, used or k), ~70% unmasked.

    Drawn on the CPU from ``seed`` and then moved, so every device sees the same batch.
    """
    g = torch.Generator().manual_seed(seed)
    loss = (torch.rand(shape, generator=g) * 6).to(dtype)
    ref = (torch.rand(shape, generator=g) * 6).to(dtype) if with_ref else None
    id_shape = shape[:1] if per_sequence else shape
    domain = torch.randint(0, k if used is None else used, id_shape, generator=g).to(id_dtype)
    mask = torch.rand(shape, generator=g) > 0.3 if with_mask else None
    move = (lambda t: None if t is None else t.to(device))  # noqa: E731
    return move(loss), move(domain), move(ref), move(mask)


def run_with_capped_memory(imports: str, body: str) -> subprocess.CompletedProcess:
    """Run Python ``imports``, then ``body`` in a new process whose address space is capped 1 GiB
    above what it holds after the imports (Linux: reads /proc/self/statm), so any machine refuses
    a large allocation in ``body``; the output is captured as text."""
    code = (
        imports + "\nimport resource\n"
        "held = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "hard = resource.getrlimit(resource.RLIMIT_AS)[1]\n"
        "resource.setrlimit(resource.RLIMIT_AS, (held + 2**30, hard))\n"
    ) + body
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
