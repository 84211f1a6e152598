"""Weights from single-domain ablations: one affinity score per domain → a mixture."""

from __future__ import annotations

import reprlib
from collections.abc import Mapping, Sequence

import numpy as np

from fastmix._checks import flag, plain_values, real_number

__all__ = ["weights_from_affinity"]


def weights_from_affinity(scores: Mapping[str, float] | Sequence[float] | np.ndarray, *,
                          method: str = "softmax", temperature: float = 1.0,
                          higher_is_better: bool = True) -> np.ndarray | dict[str, float]:
    """Turn per-domain affinity scores into weights that sum to 1.

    Args:
        scores: one score per domain (a mapping keeps the names in the result), e.g. a
            downstream metric of a model trained on that domain alone.
        method: ``"proportional"`` (``w ∝ s``; needs scores > 0 — for lower-is-better scores
            ``w ∝ 1/s``) or ``"softmax"`` (``w ∝ exp(±s / temperature)``).
        temperature: softmax temperature (> 0); large → uniform, small → the best domain.
        higher_is_better: ``False`` for losses (lower score → more weight).

    Returns:
        An array of weights, or ``{domain: weight}`` when ``scores`` is a mapping.
    """
    higher_is_better = flag(higher_is_better, "higher_is_better")  # "no" counted as true
    names = list(scores.keys()) if isinstance(scores, Mapping) else None
    values = list(scores.values()) if names is not None else scores
    raw = np.asarray(values)
    # Text ('ab'), booleans and complex numbers are no scores: numpy's own errors named nothing.
    if isinstance(scores, (str, bytes)) or raw.dtype.kind not in "iuf":
        raise TypeError(f"scores must be real numbers, got {reprlib.repr(scores)}")
    # ... nor a bool among numbers ([True, 2] became [1, 2]), nor a masked entry's hidden value
    # (once it has none, the array above holds what plain_values would give)
    plain_values(values, "scores")
    s = raw.astype(np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D list, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    if method == "proportional":
        if (s <= 0).any():
            i = int(np.flatnonzero(s <= 0)[0])
            raise ValueError(f"method='proportional' needs scores > 0; domain "
                             f"{names[i] if names else i!r} has {s[i]:g} (use 'softmax')")
        # Relative to the largest (smallest) score first: 1e308s summed to inf, 1/1e-320 was inf.
        w = s / s.max() if higher_is_better else s.min() / s
    elif method == "softmax":
        temperature = real_number(temperature, "temperature")
        if not (np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature}")
        signed = s if higher_is_better else -s
        # Shift before dividing: s / T alone overflows for small T (exp(inf - inf) = nan).
        with np.errstate(over="ignore"):  # a tiny temperature: -inf, whose exp is the 0 meant
            w = np.exp((signed - signed.max()) / temperature)
    else:
        raise ValueError(f"method must be 'proportional' or 'softmax', got {method!r}")
    w = w / w.sum()
    return dict(zip(names, w.tolist(), strict=True)) if names is not None else w
