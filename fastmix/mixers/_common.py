"""What the online mixers share."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def initial_weights(init_weights: Sequence[float] | Tensor | None, num_domains: int) -> Tensor:
    """Validated, normalised float32 starting weights (uniform when ``init_weights`` is None).

    Every weight must be > 0: both rules update multiplicatively (DoReMi in log space, ODM through
    its rewards), so a zero would stay zero for the whole run.
    """
    if init_weights is None:
        return torch.full((num_domains,), 1.0 / num_domains, dtype=torch.float32)
    w = torch.as_tensor(init_weights).detach().to("cpu", torch.float64).reshape(-1)
    if w.numel() != num_domains:
        raise ValueError(f"init_weights must have {num_domains} values, got {w.numel()}")
    if not bool(torch.isfinite(w).all()) or bool((w <= 0).any()):
        raise ValueError("init_weights must be finite and > 0")
    return (w / w.sum()).to(torch.float32)
