"""Argument checks shared by modules that do not otherwise depend on each other."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np


def real_number(value: Any, what: str) -> float:
    """``value`` as a float; TypeError naming ``what`` for anything that merely converts.

    ``float()`` would also take ``"0.5"``, ``True`` and a NumPy complex: none is a real number.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.number)):
        raise TypeError(f"{what} must be a number, got {value!r}")
    if isinstance(value, np.number) and not np.isrealobj(value):
        raise TypeError(f"{what} must be a real number, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int beyond float64, e.g. 10**400
        raise ValueError(f"{what} must be finite, got an int too large for float64") from None
