"""Online mixture rules that update weights inside the training step.

``DoReMi`` (Xie et al. 2023) reweights the proxy's loss by excess loss over a reference model;
``ODM`` (Albalak et al. 2023) treats domains as bandit arms and resamples.  Both consume the
per-domain statistics of :func:`fastmix.domain_loss_stats` and never synchronise with the host.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers see; at run time each name is imported on first use
    from fastmix.mixers.doremi import DoReMi as DoReMi
    from fastmix.mixers.odm import ODM as ODM

_LAZY = {"DoReMi": "fastmix.mixers.doremi", "ODM": "fastmix.mixers.odm"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastmix.mixers' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
