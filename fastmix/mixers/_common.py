"""What the online mixers share: hyperparameter, device and checkpoint validation."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from fastmix import distributed
from fastmix._checks import allocatable, plain_values

_T = TypeVar("_T")

# Float32 weights renormalised by a float32 softmax / division can each be off by about one ulp,
# so their sum drifts from 1 by up to ~K·eps (measured: 7e-7 for K = 1024 after 20k updates).
_EPS32 = torch.finfo(torch.float32).eps


def check_float(name: str, value: Any, low: float, high: float | None = None) -> float:
    """``value`` as a finite float in [low, high] (TypeError/ValueError naming ``name``).

    Any real number is taken (a NumPy float32 too), but not a bool or a complex number.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    bound = f"[{low}, {high}]" if high is not None else f">= {low}"
    try:
        value = float(value)
    except OverflowError:  # a Python int beyond float range, e.g. 10**400
        raise ValueError(
            f"{name} must be finite and {bound}, got an int too large for a float"
        ) from None
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return value


def state_device(device: Any) -> torch.device:
    """The device a mixer's state lives on (CPU when ``device`` is None), checked up front.

    Without the check a CUDA device on a machine without CUDA fails later, deep inside torch, with
    a bare AssertionError that does not say which argument was wrong.
    """
    if device is None:
        return torch.device("cpu")
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device {device!r} is not a valid torch device: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} needs CUDA, which is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    return dev


def normal_tensors() -> torch.inference_mode:
    """A context in which the tensors made are normal tensors, also inside
    ``torch.inference_mode()``.

    A mixer's state is updated in place at every step, which an inference tensor refuses outside
    inference mode ("Inplace update to inference tensor outside InferenceMode is not allowed"):
    a mixer built, moved or restored in an evaluation block failed at its first training step.
    (torch.compile traces the context.)
    """
    return torch.inference_mode(False)


def allocate_state(
    make: Callable[[], _T], owner: str, num_domains: int, rows: int, device: torch.device
) -> _T:
    """``make()``, which allocates (or moves) a mixer's state on ``device``, under
    :func:`normal_tensors`; a ``num_domains`` whose state cannot be allocated there is a
    ValueError naming it.

    ``rows`` is the number of float32 values per domain the state holds.  Up to K = 2**31 - 1
    that is tens of GiB, and the allocation ended in torch's out-of-memory error, or the process
    was killed for memory while the first rows were filled.  On the host the size is probed
    before anything is allocated (an mmap that touches no page, :func:`_checks.allocatable`); on
    another device torch's OutOfMemoryError becomes the ValueError.
    """
    if torch.compiler.is_compiling():  # a traced to(): the state follows a batch's device
        with normal_tensors():
            return make()
    nbytes = 4 * rows * num_domains
    message = (
        f"num_domains={num_domains}: the {owner} state ({rows} x {num_domains:,} float32 "
        f"values, {nbytes / 2**30:,.1f} GiB) is more than can be allocated on {device}"
    )
    if device.type == "cpu" and not allocatable((rows, num_domains), np.float32):
        raise ValueError(message)
    try:
        with normal_tensors():
            return make()
    except torch.cuda.OutOfMemoryError as exc:  # torch.OutOfMemoryError from torch 2.5
        raise ValueError(message) from exc


def normal_state(attributes: dict[str, Any]) -> dict[str, Any]:
    """``attributes`` with every inference tensor among the values replaced by a normal copy
    (same values): unpickling (``torch.load``) inside ``torch.inference_mode()`` rebuilds a
    mixer's state as inference tensors before ``__setstate__`` sees it."""
    out = dict(attributes)
    with normal_tensors():
        for key, value in out.items():
            if isinstance(value, Tensor) and value.is_inference():
                out[key] = value.clone()
    return out


def _native(value: Any) -> Any:
    """``value``, or a copy in this machine's byte order when it is a byte-swapped NumPy array
    (a '>f8' array saved on another machine): torch refuses those, and its message became
    "must hold real numbers"."""
    if isinstance(value, np.ndarray) and not value.dtype.isnative:
        return value.astype(value.dtype.newbyteorder("="))
    return value


def _weights_float64(init_weights: Any) -> Tensor:
    """``init_weights`` as a flat float64 CPU tensor, parsed without a float32 detour.

    ``torch.as_tensor`` of a Python list would go through float32, turning 1e-46 into 0 and 1e39
    into inf before any check could see the real values.
    """
    if isinstance(init_weights, Tensor):
        w = init_weights.detach()
    elif hasattr(init_weights, "__array__") and not isinstance(init_weights, Sequence):
        # A masked array converts with the values hidden under its mask, as load_weights and the
        # sampler refuse to.
        init_weights = plain_values(init_weights, "init_weights")
        try:  # a NumPy array: its dtype maps to a torch dtype exactly
            w = torch.as_tensor(_native(init_weights))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"init_weights must hold real numbers: {exc}") from None
    else:
        # (a bytearray(b"\x01\x02") read as the weights [1, 2], as the sampler refuses it)
        if isinstance(init_weights, (str, bytes, bytearray)) or not isinstance(
            init_weights, Sequence
        ):
            raise TypeError(
                "init_weights must be a sequence of real numbers or a tensor, got "
                f"{type(init_weights).__name__}"
            )
        for x in init_weights:
            # bools and complex numbers would be converted silently (True -> 1.0, 1+1j -> 1.0)
            if isinstance(x, bool) or not isinstance(x, (numbers.Real, Tensor)):
                raise TypeError(f"init_weights must hold real numbers, got {type(x).__name__}")
            # ... also inside a tensor: [tensor(True), tensor(3.0)] became [1.0, 3.0]
            if isinstance(x, Tensor) and (x.dtype == torch.bool or x.is_complex()):
                raise TypeError(f"init_weights must hold real numbers, got a {x.dtype} tensor")
        try:
            w = torch.as_tensor(init_weights, dtype=torch.float64)
        except OverflowError:
            raise ValueError("init_weights must be finite and > 0, got an int too large for "
                             "a float") from None
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"init_weights must hold real numbers: {exc}") from None
    if w.dtype == torch.bool or w.is_complex():
        raise TypeError(f"init_weights must be real numbers, got dtype {w.dtype}")
    if w.device.type == "meta":  # .to("cpu") would raise NotImplementedError
        raise ValueError("init_weights is a meta tensor, which holds no values")
    if w.dim() == 0:  # one domain's weight as a scalar
        w = w.reshape(1)
    if w.dim() != 1:  # a [2, 3] tensor for K = 6 was flattened silently
        raise ValueError(f"init_weights must be 1-D (K values), got shape {tuple(w.shape)}")
    return w.to("cpu", torch.float64)


def initial_weights(init_weights: Sequence[float] | Tensor | None, num_domains: int) -> Tensor:
    """Validated, normalised float32 starting weights (uniform when ``init_weights`` is None).

    Every weight must be > 0: both rules update multiplicatively (DoReMi in log space, ODM through
    its rewards), so a zero would stay zero for the whole run.  That includes a weight that is
    positive but so small next to the largest that it rounds to 0 in the float32 state.
    """
    if init_weights is None:
        return torch.full((num_domains,), 1.0 / num_domains, dtype=torch.float32)
    w = _weights_float64(init_weights)
    if w.numel() != num_domains:
        raise ValueError(f"init_weights must have {num_domains} values, got {w.numel()}")
    if not bool(torch.isfinite(w).all()) or bool((w <= 0).any()):
        raise ValueError("init_weights must be finite and > 0")
    total = w.sum()
    if not bool(torch.isfinite(total)):  # e.g. [1e308, 1e308]: scale down first, exactly
        w = w / w.max()
        total = w.sum()
    out = (w / total).to(torch.float32)
    tiny = (out <= 0).nonzero().reshape(-1)
    if tiny.numel():
        raise ValueError(
            f"init_weights[{int(tiny[0])}] is 0 in float32 (the state's dtype) after "
            f"normalising: every weight must be at least "
            f"{torch.finfo(torch.float32).smallest_normal * _EPS32:.1e} of their sum"
        )
    return out


# ------------------------------------------------------------------------------ checkpoints
# A counter of the state (updates, steps, skipped updates, dropped tokens) counts on after a load
# in int64, by at most a batch's tokens per update: from 2**62 no run could get there, and from
# 2**63 - 1 the next update wrapped it to -2**63.
MAX_COUNT = 2**62


def state_int(
    state: dict[str, Any], key: str, default: Any = 0, low: int = 0, high: int = 2**63
) -> int:
    """``state[key]`` (Python int or a one-element integer tensor) as an int in [low, high)."""
    value = state.get(key, default)
    name = f"state[{key!r}]"
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer, got a bool")
    if isinstance(value, Tensor):
        if value.device.type == "meta":  # .item() would raise NotImplementedError
            raise ValueError(f"{name} is a meta tensor, which holds no values")
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        if value.is_floating_point() or value.is_complex():
            # a float counter would be truncated silently (2.7 -> 2)
            raise TypeError(f"{name} must be an integer, got dtype {value.dtype}")
        value = int(value.reshape(()).item())  # loading is a host operation: syncing is fine
    else:
        try:
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if value >= 2**63:
        raise ValueError(f"{name} must fit in int64, got {value}")
    if value >= high:
        bound = f"2**{high.bit_length() - 1}" if high & (high - 1) == 0 else str(high)
        raise ValueError(f"{name} must be < {bound} (a count that goes on in int64), got {value}")
    return value


def weights_tolerance(num_domains: int) -> float:
    """How far from 1 the sum of K float32 weights may drift through the updates."""
    return max(1e-5, 8 * num_domains * _EPS32)


def state_vector(
    state: dict[str, Any],
    key: str,
    num_domains: int,
    device: torch.device,
    *,
    default: Any = None,
    positive: bool = False,
    sum_tolerance: float | None = None,
) -> Tensor:
    """``state[key]`` as a float32 ``[K]`` tensor on ``device``, checked for a checkpoint load.

    Finite and >= 0 (> 0 with ``positive``); with ``sum_tolerance``, a weight vector whose sum
    must be within that of 1.  The checks run on the float32 values that will be stored, so a
    float64 value that overflows or underflows in float32 is caught too.
    """
    name = f"state[{key!r}]"
    value = state.get(key, default)
    if not isinstance(value, Tensor):
        try:
            value = torch.as_tensor(_native(value))
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise TypeError(f"{name} must be a tensor of floats: {exc}") from None
    if value.shape != (num_domains,):
        raise ValueError(f"{name} must have shape ({num_domains},), got {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {value.dtype}")
    if value.device.type == "meta":  # copying it would raise NotImplementedError
        raise ValueError(f"{name} is a meta tensor, which holds no values")
    out = value.detach().to(device, torch.float32)
    host = out.to("cpu", torch.float64)
    if not bool(torch.isfinite(host).all()):
        raise ValueError(f"{name} must be finite (in float32)")
    if positive and bool((host <= 0).any()):
        raise ValueError(f"{name} must be > 0 (in float32)")
    if bool((host < 0).any()):
        raise ValueError(f"{name} must be >= 0")
    if sum_tolerance is not None:
        total = float(host.sum())
        if not abs(total - 1.0) <= sum_tolerance:
            raise ValueError(
                f"{name} must be normalised weights (sum 1 within {sum_tolerance:.1e}), "
                f"got sum {total!r}"
            )
    return out


def eager_dropped(dropped: Tensor) -> int:
    """``dropped``, the ranks' summed count of unmasked tokens with a domain id outside [0, K)
    (float32 ``[1]``, after a mixer's all-reduce), where a single process raises on such tokens:
    in eager mode on CPU (reading it costs no device sync); else 0 (GPU, torch.compile: the
    tokens stay dropped).  Every rank raises :func:`dropped_error` for it after the collective;
    an error on one rank before the collective left the others waiting in it until the group's
    timeout."""
    if dropped.device.type != "cpu" or torch.compiler.is_compiling():
        return 0
    return int(dropped[0])


def dropped_error(num_domains: int, bad: int, ranks: int, outcome: str) -> ValueError:
    """The error every rank raises for :func:`eager_dropped`'s count."""
    return ValueError(
        f"domain ids must be in [0, num_domains={num_domains}) on unmasked tokens; found {bad} "
        f"outside across the {ranks} ranks; {outcome}"
    )


def all_reduce_with_dropped(
    stats: Tensor, dropped: Tensor, group: Any, num_domains: int, outcome: str
) -> tuple[Tensor, Tensor]:
    """Sum float32 ``stats`` and this rank's count of tokens ``dropped`` for a bad domain id over
    ``group`` in one all-reduce; returns the summed statistics (``stats``' shape) and the summed
    count (int64 ``[1]``), after raising :func:`dropped_error` (with ``outcome``) on every rank
    where :func:`eager_dropped` finds one."""
    reduced = distributed.all_reduce_sum_(
        torch.cat([stats.reshape(-1), dropped.reshape(1).to(stats.dtype)]), group
    )
    bad = eager_dropped(reduced[-1:])
    if bad:
        raise dropped_error(num_domains, bad, distributed.world_size(group), outcome)
    return reduced[:-1].view_as(stats), reduced[-1:].to(torch.int64)
