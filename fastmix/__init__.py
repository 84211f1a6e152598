"""fastmix: fast, exact and reproducible data-mixture weights for LLM pretraining.

The sampler (``MixtureSampler``, ``sample_domains``, ``blend_indices``) needs only numpy and the
compiled ``fastmix._C``; everything that needs torch is imported on first use, so
``import fastmix`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers see; at run time each name is imported on first use
    from fastmix.data import MixtureDataset as MixtureDataset
    from fastmix.data import TokenCorpus as TokenCorpus
    from fastmix.mixers import ODM as ODM
    from fastmix.mixers import DoReMi as DoReMi
    from fastmix.ops import backends as backends
    from fastmix.ops import domain_loss_stats as domain_loss_stats
    from fastmix.sampler import MixtureSampler as MixtureSampler
    from fastmix.sampler import blend_indices as blend_indices
    from fastmix.sampler import sample_domains as sample_domains

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
