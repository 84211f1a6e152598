"""Random batches shared by the ops tests (test_ops, test_ops_triton, test_ops_gpu)."""

from __future__ import annotations

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
