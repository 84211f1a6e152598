"""``fastmix demo``: DoReMi end to end on a multi-domain corpus built on the spot.

Builds five byte-level domains (stdlib code, Python's documentation prose, generated math
problems, generated JSON/CSV records, random characters), trains a tiny reference GPT on uniform
weights, a DoReMi proxy, then two main models (uniform vs DoReMi's weights) and reports their
held-out loss per domain.  Run it with ``fastmix demo`` (``--quick`` for a one-minute version).
"""

from __future__ import annotations

from typing import Any

__all__ = ["DemoOptions", "run_demo"]


def __getattr__(name: str) -> Any:
    # Lazy: ``fastmix demo --help`` should not pay for torch's import.
    if name in __all__:
        from fastmix.demo import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'fastmix.demo' has no attribute {name!r}")
