"""Mixture samplers: which domain each global sample comes from.

Three rules over K domains with weights w (normalised internally):

* ``"alias"`` -- i.i.d. draws through a Walker/Vose alias table driven by a counter-based RNG: draw
  ``i`` depends only on ``(seed, i, table)``, so any slice of the stream can be computed directly
  (random access, resume from a position, sharding across ranks and workers).
* ``"stratified"`` -- in every block of ``block`` consecutive draws, domain d appears floor or
  ceil of ``w[d] * block`` times (systematic sampling with a random offset per block), in a keyed
  shuffled order.  Random access by block.
* ``"greedy"`` -- Megatron-LM's deterministic largest-deficit rule (:func:`blend_indices`),
  streamed.

The heavy lifting is in ``fastmix._C`` (C++).  Every stream is the same bits on every machine: the
random numbers are SplitMix64 outputs of (key, counter), the tables are built in integer arithmetic.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fastmix import _C
from fastmix._checks import integer, plain_values, state_version, tensor_values

__all__ = ["MixtureSampler", "sample_domains", "blend_indices", "METHODS", "DEFAULT_BLOCK"]

Weights = Sequence[float] | np.ndarray | Mapping[str, float]

METHODS = ("alias", "stratified", "greedy")
# Default stratification block: 1024 draws, a common global batch size, so every batch-sized block
# matches the mixture to within one sample per domain.  Larger blocks resolve smaller weights.
DEFAULT_BLOCK = 1024
MAX_BLOCK = 1 << 30
_MAX_BLEND_DOMAINS = 32767  # dataset_index is int16
_U64 = 1 << 64
# A MixtureSampler's position and counts are int64.
_MAX_POSITION = (1 << 63) - 1
# The greedy rule's steps are exact in float64 below 2**52 (the C++ checks it too).
_GREEDY_STEPS = 1 << 52
_STATE_VERSION = 1
# Attributes MixtureSampler itself sets (pickling keeps a subclass's others).
_OWN_ATTRIBUTES = frozenset(
    ("_method", "_seed", "_block", "_names", "_lock", "_raw", "_table", "_positive", "_position",
     "_segment_start", "_counts", "_segment_counts")
)  # fmt: skip
_STATE_KEYS = frozenset(
    ("version", "method", "seed", "block", "names", "weights", "position", "segment_start",
     "counts", "segment_counts")
)  # fmt: skip


# A fork copies each lock as it is.  A sampler's state changes in several steps under its lock
# (draws, counts, position), so a child forked while another thread was inside a call would start
# with that lock held by no thread of its own (its first call waits forever) and a half-updated
# state.  So every live sampler's lock is taken before a fork (a call in progress finishes first)
# and released after it, in the parent and in the child.
_SAMPLERS: weakref.WeakSet[MixtureSampler] = weakref.WeakSet()
_HELD_ACROSS_FORK: list[threading.Lock] = []


def _lock_samplers_before_fork() -> None:
    locks = [sampler._lock for sampler in list(_SAMPLERS)]
    for lock in locks:
        lock.acquire()
    _HELD_ACROSS_FORK[:] = locks


def _release_samplers_after_fork() -> None:
    for lock in reversed(_HELD_ACROSS_FORK):
        lock.release()
    _HELD_ACROSS_FORK.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_lock_samplers_before_fork,
        after_in_parent=_release_samplers_after_fork,
        after_in_child=_release_samplers_after_fork,
    )


# ----------------------------------------------------------------------------------------- checks
def _as_weights(weights: Any, name: str = "weights") -> tuple[np.ndarray, tuple[str, ...] | None]:
    """Validate ``weights`` and return (float64 C-contiguous copy, names or None)."""
    names: tuple[str, ...] | None = None
    if isinstance(weights, Mapping):
        names = tuple(weights.keys())
        for key in names:
            if not isinstance(key, str):
                raise TypeError(f"{name} keys must be str domain names, got {type(key).__name__}")
        values: Any = list(weights.values())
    elif isinstance(weights, (str, bytes, bytearray)):  # (numpy reads a bytearray as uint8s)
        raise TypeError(
            f"{name} must be a sequence of numbers or a dict name -> weight, "
            f"got {type(weights).__name__}"
        )
    else:
        values = weights
    values = plain_values(tensor_values(values, name), name)
    try:
        array = np.asarray(values)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} must be a 1-D sequence of numbers: {exc}") from None
    if array.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers (int or float), got dtype {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} must not be empty")
    array = np.ascontiguousarray(array, dtype=np.float64).copy()
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {array[~np.isfinite(array)][:3].tolist()}")
    if np.any(array < 0):
        raise ValueError(f"{name} must be non-negative, got {array[array < 0][:3].tolist()}")
    with np.errstate(over="ignore"):
        total = float(np.sum(array))
        # The C++ layer adds in index order, numpy pairwise: either may overflow alone.
        in_order = float(np.cumsum(array)[-1])
    if not total > 0:
        raise ValueError(f"{name} must have at least one positive entry")
    if not (np.isfinite(total) and np.isfinite(in_order)):
        raise ValueError(f"{name} sum overflows float64")
    return array, names


def _check_seed(seed: Any, name: str = "seed") -> int:
    return integer(seed, name, 0, _U64 - 1)


def _check_out(out: Any, n: int) -> np.ndarray:
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    if out.dtype != np.int32:
        raise TypeError(f"out must have dtype int32, got {out.dtype}")
    if out.ndim != 1 or out.shape[0] != n:
        raise ValueError(f"out must have shape ({n},), got {out.shape}")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError("out must be writable")
    return out


def _new_ids(n: int) -> np.ndarray:
    try:
        return np.empty(n, dtype=np.int32)
    except (ValueError, MemoryError) as exc:  # numpy's messages do not say which argument
        raise ValueError(f"n={n}: cannot allocate {n} int32 ids ({exc})") from None


def _normalised(raw: np.ndarray) -> np.ndarray:
    # Exactly Megatron-LM's normalisation: float64 array divided by its numpy (pairwise) sum.
    return raw / np.sum(raw)


# ---------------------------------------------------------------------------- stateless functions
def sample_domains(
    weights: Weights,
    n: int,
    *,
    seed: int,
    offset: int = 0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Draws ``[offset, offset + n)`` of the alias stream for ``seed`` as int32 domain ids.

    The call with ``offset=o`` returns exactly ``sample_domains(weights, o + n, seed=seed)[o:]``,
    bit-identical on every run, process and machine; it is also what
    ``MixtureSampler(weights, seed=seed, method="alias")`` yields.  ``out``, if given, must be a
    writable C-contiguous int32 array of length ``n`` and is filled and returned.  The GIL is
    released while drawing.
    """
    raw, _ = _as_weights(weights)
    n = integer(n, "n", 0)
    seed = _check_seed(seed)
    offset = integer(offset, "offset", 0)
    if offset + n > _U64:
        raise ValueError(f"offset + n must be <= 2**64, got {offset + n}")
    out = _new_ids(n) if out is None else _check_out(out, n)
    if n:  # n = 0 at offset 2**64 is a valid empty slice the C++ uint64 cannot take
        _C.AliasTable(raw).fill(seed, offset, out)
    return out


def blend_indices(weights: Weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron-LM's ``build_blending_indices``, bit for bit, and faster.

    ``w = float64 weights / their float64 sum``; for every sample ``s`` the domain maximising
    ``w[d] * max(s, 1) - count[d]`` is chosen (strict ``>``: the lowest index wins ties).  Returns
    ``(dataset_index: int16[size], dataset_sample_index: int64[size])`` where the sample index is
    the running count of the chosen domain.  At most 32767 domains (int16).  The GIL is released.

    As in Megatron-LM, a zero-weight domain can still be chosen when every deficit ties at 0
    (lowest index wins), e.g. ``blend_indices([0, 1, 1], 3)[0]`` is ``[1, 2, 0]``.
    """
    raw, _ = _as_weights(weights)
    if raw.size > _MAX_BLEND_DOMAINS:
        raise ValueError(
            f"weights has {raw.size} domains; blend_indices supports at most "
            f"{_MAX_BLEND_DOMAINS} (dataset_index is int16)"
        )
    size = integer(size, "size", 0, 1 << 52)
    try:
        return _C.blend_indices(_normalised(raw), size)
    except MemoryError as exc:  # (as for sample_domains' n: say which argument asked for it)
        raise ValueError(
            f"size={size}: cannot allocate the outputs ({10 * size:,} bytes) ({exc})"
        ) from None


# ------------------------------------------------------------------------------------- the sampler
class MixtureSampler:
    """A stateful stream of domain ids with resumable state.

    Args:
        weights: a sequence / 1-D array of K non-negative finite weights (at least one positive),
            or a dict ``name -> weight`` (then :attr:`names` keeps the names, in the dict's order).
            Normalised internally; a zero weight is never drawn.
        seed: 0 <= seed < 2**64.  Unused by ``"greedy"``, which is deterministic.
        method: ``"alias"``, ``"stratified"`` or ``"greedy"`` (see the module docstring).
        block: stratification block (``"stratified"`` only; default :data:`DEFAULT_BLOCK` = 1024).

    Weight changes (:meth:`set_weights`) apply from the current :attr:`position`:

    * ``"alias"``: draw ``i`` keeps its counter ``i``; only the table changes.  So the stream after
      the change is exactly ``sample_domains(new_weights, ..., offset=position)``.
    * ``"stratified"``: a new segment starts at the current position and blocks are counted from
      there (the rest of a partly used block is skipped); the block guarantee holds for every full
      block of a segment.
    * ``"greedy"``: the rule restarts at the change point with zero counts, so the draws after it
      are exactly ``blend_indices(new_weights, ...)[0]``.

    ``"greedy"`` runs the rule over the positive-weight domains only, so that a zero weight is never
    drawn (Megatron's rule itself picks a zero-weight domain on an exact tie at deficit 0, e.g.
    weights ``[0, 1, 1]`` at sample 2; :func:`blend_indices` keeps that behaviour, bit for bit).
    With all weights positive the stream is exactly ``blend_indices(weights)[0]``.

    :meth:`state_dict` holds plain Python values (JSON-friendly); a sampler restored with
    :meth:`load_state_dict` continues bit-identically, also after weight changes.  A sampler
    pickles (and deep-copies) as its state.  One sampler may be shared by threads: each call is
    atomic (the draws release the GIL, so unserialised calls would read the same position twice),
    and a process forked meanwhile (a DataLoader starting its workers) waits for a call in
    progress, so the child's copy starts from a finished call.
    """

    def __init__(
        self,
        weights: Weights,
        *,
        seed: int = 0,
        method: str = "alias",
        block: int | None = None,
    ) -> None:
        if not isinstance(method, str) or method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self._method = method
        self._seed = _check_seed(seed)
        if block is not None and method != "stratified":
            raise ValueError(f"block applies only to method='stratified', not {method!r}")
        self._block = (
            integer(block, "block", 1, MAX_BLOCK) if block is not None else DEFAULT_BLOCK
        )
        raw, names = _as_weights(weights)
        self._names = names
        self._lock = threading.Lock()
        _SAMPLERS.add(self)
        self._install(raw, self._build(raw, method, self._block))
        self._position = 0
        self._segment_start = 0
        self._counts = np.zeros(raw.size, dtype=np.int64)
        self._segment_counts = np.zeros(raw.size, dtype=np.int64)

    # ------------------------------------------------------------------------------ properties
    @property
    def method(self) -> str:
        """``"alias"``, ``"stratified"`` or ``"greedy"``."""
        return self._method

    @property
    def seed(self) -> int:
        """The seed (unused by ``"greedy"``)."""
        return self._seed

    @property
    def block(self) -> int | None:
        """The stratification block, or None for the other methods."""
        return self._block if self._method == "stratified" else None

    @property
    def num_domains(self) -> int:
        """Number of domains, K."""
        return int(self._raw.size)

    @property
    def names(self) -> tuple[str, ...] | None:
        """Domain names when the weights were given as a dict, else None."""
        return self._names

    @property
    def weights(self) -> np.ndarray:
        """The current weights, normalised to sum 1 (float64 copy)."""
        return _normalised(self._raw)

    @property
    def position(self) -> int:
        """Number of draws taken so far (the index of the next draw)."""
        return self._position

    @property
    def counts(self) -> np.ndarray:
        """Draws per domain so far, over all weight changes (int64 copy)."""
        with self._lock:
            return self._counts.copy()

    # ------------------------------------------------------------------------------ drawing
    def sample(self, n: int) -> np.ndarray:
        """The next ``n`` domain ids (int32); advances :attr:`position` by ``n``."""
        n = integer(n, "n", 0)
        with self._lock:
            out, segment_counts = self._draw(n)
            # In place (the arrays are the sampler's own; `counts` hands out copies): a K-sized
            # delta and two sums per call were most of a data step's 32 draws at K = 10,000.
            if segment_counts is None:
                _C.accumulate_counts(out, self._counts, self._segment_counts)
            else:
                _C.accumulate_counts(out, self._counts)
                self._segment_counts = segment_counts
            self._position += out.size
            return out

    def peek(self, n: int) -> np.ndarray:
        """The next ``n`` domain ids without advancing: ``peek(n)`` equals the following
        ``sample(n)``."""
        n = integer(n, "n", 0)
        with self._lock:
            return self._draw(n)[0]

    def set_weights(self, weights: Weights) -> None:
        """Use ``weights`` from the current position on (same number of domains; a dict must have
        the sampler's names).  See the class docstring for what this means per method."""
        raw, names = _as_weights(weights)
        # Under the lock: a load_state_dict in another thread may change the names, K, method or
        # block this is checked and built against.
        with self._lock:
            if names is not None:
                if self._names is None:
                    raise ValueError("weights is a dict but the sampler was built without names")
                if set(names) != set(self._names) or len(names) != len(self._names):
                    raise ValueError(
                        f"weights keys must be {list(self._names)}, got {list(names)}"
                    )
                raw = np.array([weights[name] for name in self._names], dtype=np.float64)  # type: ignore[index]
            self._replace_weights(raw)

    def _set_checked_weights(self, raw: np.ndarray) -> None:
        """``set_weights`` for a float64 array that passed its checks already, owned by the
        sampler from here on (MixtureDataset's stream, whose weights were checked when given:
        the checks were ~30 of ~57 us per change at K = 22, paid again for every change a
        ``state_dict(step=)`` replays)."""
        with self._lock:
            self._replace_weights(raw)

    def _replace_weights(self, raw: np.ndarray) -> None:
        """New weights from the current position on; the caller holds the lock."""
        if raw.size != self._raw.size:
            raise ValueError(f"weights must have {self._raw.size} entries, got {raw.size}")
        self._install(raw, self._build(raw, self._method, self._block))
        self._segment_start = self._position
        self._segment_counts = np.zeros(raw.size, dtype=np.int64)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically, as plain Python values."""
        with self._lock:
            return {
                "version": _STATE_VERSION,
                "method": self._method,
                "seed": self._seed,
                "block": self._block,
                "names": list(self._names) if self._names is not None else None,
                "weights": [float(v) for v in self._raw],  # as given: repr round-trips exactly
                "position": self._position,
                "segment_start": self._segment_start,
                "counts": [int(v) for v in self._counts],
                "segment_counts": [int(v) for v in self._segment_counts],
            }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the whole state (weights, seed and method included) after validating it."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        if set(state) != _STATE_KEYS:
            raise ValueError(f"state has keys {sorted(state)}, expected {sorted(_STATE_KEYS)}")
        state_version(state["version"], _STATE_VERSION)
        method = state["method"]
        if not isinstance(method, str) or method not in METHODS:
            raise ValueError(f"state['method'] must be one of {METHODS}, got {method!r}")
        seed = _check_seed(state["seed"], "state['seed']")
        block = integer(state["block"], "state['block']", 1, MAX_BLOCK)
        if isinstance(state["weights"], Mapping):
            # Its keys were ignored: {"b": 2, "a": 1} gave domain a weight 2 under names [a, b].
            raise TypeError("state['weights'] must be a list of weights in the order of "
                            "state['names'], not a dict")
        raw, _ = _as_weights(state["weights"], "state['weights']")
        k = raw.size
        names = state["names"]
        if names is not None:
            if (
                not isinstance(names, (list, tuple))
                or len(names) != k
                or not all(isinstance(v, str) for v in names)
            ):
                raise ValueError(f"state['names'] must be None or {k} strings")
            if len(set(names)) != k:
                raise ValueError(f"state['names'] must be distinct, got {list(names)}")
            names = tuple(names)
        position = integer(state["position"], "state['position']", 0, _MAX_POSITION)
        segment_start = integer(state["segment_start"], "state['segment_start']", 0, position)
        counts = self._check_counts(state["counts"], k, position, "state['counts']")
        segment_counts = self._check_counts(
            state["segment_counts"], k, position - segment_start, "state['segment_counts']"
        )
        if np.any(segment_counts > counts):
            raise ValueError("state['segment_counts'] exceeds state['counts']")
        if np.any(segment_counts[raw == 0] > 0):  # a zero weight is never drawn
            raise ValueError("state['segment_counts'] has draws of a zero-weight domain")
        if method == "greedy" and position - segment_start >= _GREEDY_STEPS:
            raise ValueError(
                "state: the greedy rule is exact only below 2**52 steps after a weight change, "
                f"got {position - segment_start}"
            )
        table = self._build(raw, method, block)  # may still raise: nothing is changed before
        with self._lock:
            self._method, self._seed, self._block, self._names = method, seed, block, names
            self._install(raw, table)
            self._position, self._segment_start = position, segment_start
            self._counts, self._segment_counts = counts, segment_counts

    def __getstate__(self) -> dict[str, Any]:
        # The state, plus what a subclass keeps beside it.
        extra = {k: v for k, v in self.__dict__.items() if k not in _OWN_ATTRIBUTES}
        return {"sampler": self.state_dict(), "extra": extra}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._lock = threading.Lock()
        _SAMPLERS.add(self)
        self.load_state_dict(state["sampler"])
        self.__dict__.update(state["extra"])

    @staticmethod
    def _check_counts(values: Any, k: int, total: int, name: str) -> np.ndarray:
        if not isinstance(values, (list, tuple, np.ndarray)):
            raise ValueError(f"{name} must hold {k} integers")
        # numpy reads [True, 4, 5] as ints without a word
        if isinstance(values, (list, tuple)) and any(
            isinstance(v, (bool, np.bool_)) for v in values
        ):
            raise TypeError(f"{name} must hold integers, got a bool among them")
        try:
            array = np.asarray(values)
        except ValueError:  # ragged ([1, [2, 3], 4]): numpy's message names no key
            raise ValueError(f"{name} must hold {k} integers, got a ragged sequence") from None
        if array.ndim != 1:  # (a 0-d array has no len(): a bare TypeError naming nothing)
            raise ValueError(f"{name} must hold {k} integers, got shape {array.shape}")
        if array.size != k:
            raise ValueError(f"{name} must hold {k} integers")
        if array.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")
        array = array.astype(np.int64)
        # In Python ints: an int64 sum wraps, and counts of 2**62 each "summed" to 8.
        if np.any(array < 0) or sum(int(v) for v in array) != total:
            raise ValueError(f"{name} must be non-negative and sum to {total}")
        return array

    # ------------------------------------------------------------------------------ internals
    @staticmethod
    def _build(raw: np.ndarray, method: str, block: int) -> Any:
        """The drawing table for ``method`` (built before any attribute changes: it may raise)."""
        if method == "alias":
            return _C.AliasTable(raw)
        if method == "stratified":
            return _C.StratifiedTable(raw, block)
        # The rule runs over the positive-weight domains only: Megatron's rule can pick a
        # zero-weight domain on an exact tie at deficit 0 (e.g. weights [0, 1, 1] at s = 2), and
        # here a zero weight means never drawn.  With all weights positive this is exactly
        # blend_indices(weights).
        positive = np.flatnonzero(raw > 0).astype(np.int32)
        return positive, _normalised(raw[positive])

    def _install(self, raw: np.ndarray, table: Any) -> None:
        self._raw = raw
        if self._method == "greedy":
            self._positive, self._table = table
        else:
            self._table = table

    def _draw(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(ids, greedy counts after them or None); never mutates the sampler."""
        if self._position + n > _MAX_POSITION:
            raise ValueError("the sampler's position would pass 2**63 - 1 (its counts are int64)")
        out = _new_ids(n)
        if n == 0:  # (a stratified fill would build a whole block for nothing)
            counts = self._segment_counts.copy() if self._method == "greedy" else None
            return out, counts
        if self._method == "alias":
            self._table.fill(self._seed, self._position, out)
            return out, None
        if self._method == "stratified":
            self._table.fill(
                self._seed, self._segment_start, self._position - self._segment_start, out
            )
            return out, None
        positive = self._positive
        step = self._position - self._segment_start
        if positive.size == self._raw.size:
            segment_counts = self._segment_counts.copy()
            _C.greedy_fill(self._table, step, segment_counts, out)
            return out, segment_counts
        sub_counts = np.ascontiguousarray(self._segment_counts[positive])
        _C.greedy_fill(self._table, step, sub_counts, out)
        segment_counts = np.zeros_like(self._segment_counts)
        segment_counts[positive] = sub_counts
        return positive[out], segment_counts

    def __repr__(self) -> str:
        extra = f", block={self._block}" if self._method == "stratified" else ""
        return (
            f"MixtureSampler(K={self.num_domains}, method={self._method!r}, seed={self._seed}"
            f"{extra}, position={self._position})"
        )
