"""fastmix: fast, exact and reproducible data-mixture weights for LLM pretraining.

The sampler (``MixtureSampler``, ``sample_domains``, ``blend_indices``) needs only numpy and the
compiled ``fastmix._C``; everything that needs torch is imported on first use, so
``import fastmix`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily)
_LAZY = {
    "MixtureSampler": "fastmix.sampler",
    "sample_domains": "fastmix.sampler",
    "blend_indices": "fastmix.sampler",
    "domain_loss_stats": "fastmix.ops",
    "backends": "fastmix.ops",
    "DoReMi": "fastmix.mixers",
    "ODM": "fastmix.mixers",
    "TokenCorpus": "fastmix.data",
    "MixtureDataset": "fastmix.data",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastmix' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
