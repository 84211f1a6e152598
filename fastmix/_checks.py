"""Argument checks shared by modules that do not otherwise depend on each other."""

from __future__ import annotations

import argparse
import numbers
import re
import reprlib
import sys
from collections.abc import Iterable
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


def flag(value: Any, what: str) -> bool:
    """``value`` as a bool; TypeError naming ``what`` for anything else.

    ``bool()`` takes any value: the string "no", or "False", is true.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be True or False, got {reprlib.repr(value)}")
    return bool(value)


def not_a_set(value: Any, what: str) -> None:
    """TypeError ``"<what>, got a set ..."`` when ``value`` is a set, where an order matters: a
    set of str iterates in an order that changes with PYTHONHASHSEED, from one process to the
    next, so the same seed gave other results."""
    if isinstance(value, (set, frozenset)):
        raise TypeError(f"{what}, got a set (its order differs between runs; pass sorted(...) or "
                        "a list)")


def duplicates(items: Iterable[str]) -> list[str]:
    """The items that occur more than once, each once, in the order their first repeat comes
    (one pass: list.count per item was quadratic, 3.7-4.0 s for 16,000 names)."""
    seen: set[str] = set()
    dup: dict[str, None] = {}
    for x in items:
        if x in seen:
            dup[x] = None
        seen.add(x)
    return list(dup)


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for ``json.load`` of a file a person may have edited: a key given
    twice in one object is a ValueError (json keeps the last silently: a weights file listing
    a domain twice took its second weight without a word)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice in one JSON object")
        out[key] = value
    return out


def plain_values(values: Any, what: str) -> Any:
    """``values`` as ``np.asarray`` should see them, for weights: a masked array's entries (one
    with masked entries refused: asarray would use the hidden values), and no bool in a list
    (``[True, 1]`` converts to ints without a word)."""
    if isinstance(values, np.ma.MaskedArray):
        if np.ma.getmaskarray(values).any():
            raise TypeError(f"{what} has masked entries: fill them ({what}.filled(0))")
        return values.filled()
    if isinstance(values, (list, tuple)) and any(_is_bool(v) for v in values):
        raise TypeError(f"{what} must hold real numbers, got a bool among them")
    return values


def tensor_values(values: Any, what: str) -> Any:
    """A torch tensor of weights as a float64 NumPy array (anything else as it is): any real
    dtype (bfloat16 too, which NumPy has not), sparse or strided, on any device; a bool or
    complex tensor is a TypeError and a meta tensor a ValueError, naming ``what``."""
    torch = sys.modules.get("torch")  # (no tensor without torch imported: never import it here)
    if torch is None or not isinstance(values, torch.Tensor):
        return values
    if values.dtype == torch.bool or values.is_complex():
        raise TypeError(f"{what} must be real numbers, got a {values.dtype} tensor")
    if values.is_meta:
        raise ValueError(f"{what} is a meta tensor: it holds no values")
    if values.layout != torch.strided:  # sparse: numpy() refuses it, naming no argument
        values = values.to_dense()
    return values.detach().to("cpu", torch.float64).numpy()


def _is_bool(value: Any) -> bool:
    # A 0-d bool array or tensor too: beside numbers np.asarray reads it as 1 or 0 (plain floats
    # and ints, the common case, skip the attribute lookup).
    if type(value) is float or type(value) is int:
        return False
    if isinstance(value, (bool, np.generic)):
        return isinstance(value, (bool, np.bool_))
    return str(getattr(value, "dtype", "")) in ("bool", "torch.bool")


# Domain ids are int32 in the sampler's output and the CUDA and Triton kernels take K as a C int,
# so no id of a K beyond this could be drawn or counted.
MAX_DOMAINS = 2**31 - 1


def _shown(value: int) -> str:
    # str() of an int beyond 4300 digits raises, and a 400-digit number helps no one
    if value.bit_length() <= 128:
        return str(value)
    return f"{'a negative' if value < 0 else 'an'} int of {value.bit_length()} bits"


def integer(value: Any, what: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in [low, high]; TypeError/ValueError naming ``what``.

    Any ``numbers.Integral`` is taken (a NumPy int too), but not a bool, nor a float that happens
    to be whole (2.0 might be a mistake; 2.5 surely is).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        out = value  # the common case first: no ABC check while torch.compile traces
    elif isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        out = int(value)
    else:
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if low is not None and out < low:
        raise ValueError(f"{what} must be >= {low}, got {_shown(out)}")
    if high is not None and out > high:
        raise ValueError(f"{what} must be <= {high}, got {_shown(out)}")
    return out


def allocatable(shape: int | tuple[int, ...], dtype: Any = np.uint8) -> bool:
    """Whether an array of ``shape`` and ``dtype`` can be allocated here now, so that a size no
    machine could hold is an error naming its argument, not numpy's MemoryError (or its "array is
    too big") from a later step.  The pages are never touched: an mmap and an munmap."""
    try:
        np.empty(shape, dtype)
    except (MemoryError, ValueError, OverflowError):
        return False
    return True


def state_version(value: Any, expected: int, what: str = "state['version']") -> None:
    """Checks a state's format version: the int ``expected`` (TypeError/ValueError naming ``what``).

    Compared with ``!=``, a tensor or an array gave an array, whose truth torch and NumPy refuse
    ("ambiguous") without naming the key; the string "1" was "state version 1 is not 1".
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if value != expected:
        raise ValueError(f"{what} must be {expected}, got {_shown(int(value))}")


def num_domains(value: Any, what: str = "num_domains") -> int:
    """``value`` as a domain count K in [1, :data:`MAX_DOMAINS`] (errors name ``what``)."""
    k = integer(value, what, 1)
    if k > MAX_DOMAINS:
        raise ValueError(
            f"{what} must be <= 2**31 - 1 (domain ids are int32 in the sampler and the kernels), "
            f"got {_shown(k)}"
        )
    return k


# A number as written in CSV files and flags.  float() also takes Python's digit-grouping
# underscores ('0_1' is 1.0) and non-ASCII digits: typos here, not numbers.
_NUMBER = re.compile(r"\s*[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
                     r"|inf(?:inity)?|nan)\s*", re.IGNORECASE)


def parse_float(v: Any) -> float:
    """``float(v)``, but text must be a plain decimal number (no ``_``, ASCII digits only).

    Raises ValueError (TypeError for what float() rejects by type) like float() does, and
    TypeError for a bool (float(True) is 1.0).
    """
    if isinstance(v, (bool, np.bool_)):  # float(True) is 1.0: a flag column read as weights
        raise TypeError(f"a bool ({v}) is not a number")
    if isinstance(v, (bytes, bytearray)):
        v = v.decode("utf-8", "replace")
    if isinstance(v, str) and not _NUMBER.fullmatch(v):
        raise ValueError(f"could not convert string to float: {v!r}")
    return float(v)


_INT_TEXT = re.compile(r"\s*[+-]?[0-9]+\s*")


def int_flag(text: str) -> int:
    """argparse type of the integer flags: a plain decimal integer (``int()`` also reads
    ``1_000`` and digits of other scripts)."""
    if not _INT_TEXT.fullmatch(text):
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}")
    return int(text)


def float_flag(text: str) -> float:
    """argparse type of the float flags: strict, so ``1_0`` is not 10 (see parse_float)."""
    try:
        return parse_float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
