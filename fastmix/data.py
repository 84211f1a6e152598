"""Token corpora to shuffled windows under live mixture weights, across ranks and workers.

``TokenCorpus`` memory-maps flat token files per domain.  ``MixtureDataset`` turns mixture weights
into the stream a training loop reads: for every global sample the sampler
(``fastmix.MixtureSampler``) picks a domain, and the compiled ``fastmix._C.WindowTable`` picks that
domain's next window in a keyed pseudo-random permutation of its windows (a Feistel network with
cycle-walking; nothing of the corpus's size is materialised).

Windows.  A window is ``seq_len + 1`` consecutive tokens starting at a multiple of ``seq_len``
inside one file (stride ``seq_len``: the last token of a window is the first of the next, so
``input_ids[:-1]`` / ``input_ids[1:]`` cover every token as a target exactly once per epoch).  A
window never crosses a file boundary: files are shards that may come from different sources, and a
single read per sample keeps the loader simple and fast; the up to ``seq_len - 1`` tokens after a
file's last full window are not read.

The global order.  Global sample ``g`` belongs to global step ``g // (world_size * B)`` (``B`` is
``batch_size``, or 1 when the dataset yields single samples).  Rank ``r`` takes rows
``[r * B, (r + 1) * B)`` of every global step, DataLoader worker ``w`` of ``n`` takes every
``n``-th of the rank's steps.  Every worker runs the same sampler over the whole global stream (a
draw costs nanoseconds, next to microseconds for reading a window), so each domain's window cursor
- how many of its windows the global stream has consumed - is the same everywhere, and the union
over ranks and workers is the one-process stream with no duplicate and no gap, whatever the world
size or worker count.

Live weights.  ``set_weights(w)`` writes the weights and the global step from which they apply to
shared memory read by the DataLoader workers.  Without ``step=`` the change applies from the first
step no worker has started yet, so up to ``prefetch_factor * num_workers`` batches that are already
produced (or being produced) still come from the old weights: that is the lag prefetching implies.
With ``step=`` (the same on every rank) the change applies exactly there; it must be a step no
worker has started, i.e. at least ``consumed_steps + prefetch_factor * num_workers``.  Every
applied change is recorded in ``weight_schedule``; the stream is a deterministic function of the
seed and that schedule.  A CUDA tensor is copied to pinned host memory with ``non_blocking=True``
and a CUDA event is recorded; a helper thread waits for the event (never the training thread) and
then publishes the weights at the first step boundary after the copy completed (or at ``step=``,
which workers then wait for), recording that step.

Passes.  Each ``iter(ds)`` starts from the resume point (step 0, or the loaded state) and replays
the changes made so far at their steps (the ring keeps the last 1024).  An iterator holds a
progress slot until it ends, and a slot left by DataLoader workers that have exited counts for
nothing, so a change made between passes applies from the next pass's first step.  One iterator
runs per process: a newer one supersedes the older, which raises on its next step.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import json
import multiprocessing as mp
import os
import queue
import reprlib
import select
import socket
import stat
import threading
import time
import unicodedata
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import IterableDataset

from fastmix import _C
from fastmix._checks import (
    allocatable,
    integer,
    plain_values,
    real_number,
    state_version,
    tensor_values,
    unique_keys,
)

__all__ = [
    "CorpusError",
    "TokenCorpus",
    "MixtureDataset",
    "WeightSchedule",
    "load_weights",
    "CORPUS_MANIFEST",
]

#: Name of the manifest ``fastmix prepare`` writes next to the token files.
CORPUS_MANIFEST = "corpus.json"
# Raw .bin files hold little-endian unsigned tokens of one of these widths.
_BIN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_NPY_KINDS = ("u", "i")

PathLike = str | os.PathLike


class CorpusError(ValueError):
    """A token file or domain that cannot be used: missing, unreadable, empty or malformed."""


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


# The keys a weights file may hold its weights under: fastmix's, then DoReMi's published configs'.
_WEIGHTS_KEYS = ("weights", "train_domain_weights")


def load_weights(source: Any, names: Sequence[str] | None = None) -> np.ndarray | dict[str, float]:
    """Read mixture weights from a ``weights.json`` path, a dict, a sequence, an array or a tensor.

    ``weights.json`` may be ``{"weights": {name: w, ...}}`` (what fastmix writes), DoReMi's
    ``{"train_domain_weights": {name: w, ...}, ...}`` (its train weights are read), a plain
    ``{name: w}`` mapping (where a domain may be named "weights": a number there is a weight) or
    a list of weights (also under ``"weights"``).  With ``names`` the result is a float64 array
    in that order (domains a mapping leaves out get weight 0; a name not in ``names`` is an
    error); without ``names`` a mapping stays a ``dict`` and anything else becomes a float64
    array.  Values are checked: finite, non-negative, not all zero.  Nothing is normalised.
    """
    if names is not None:
        # Each domain once: ["a", "a"] gave {"a": 1} as [1, 1], one domain's weight twice.
        if isinstance(names, (str, bytes)) or not isinstance(names, (Sequence, np.ndarray)) or (
            not all(isinstance(n, str) for n in names)
        ):
            raise TypeError(f"names must be a list of domain names (strings), got "
                            f"{reprlib.repr(names)}")
        seen: set[str] = set()
        for n in names:
            if n in seen:
                raise ValueError(f"names must be distinct, got {n!r} more than once")
            seen.add(n)
    return _read_weights(source, names)


def _read_weights(
    source: Any, names: Sequence[str] | None
) -> np.ndarray | dict[str, float]:
    """load_weights with ``names`` already checked (a corpus's: set_weights at every change)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.exists() and not path.is_file():  # a FIFO would block the open forever
            raise ValueError(f"weights: {str(path)!r} is not a regular file")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f, object_pairs_hook=unique_keys)
        except FileNotFoundError:
            raise ValueError(f"weights: file {str(path)!r} does not exist") from None
        except UnicodeDecodeError:
            raise ValueError(f"weights: {str(path)!r} is not UTF-8 text") from None
        except RecursionError:  # json's decoder recurses once per level of nesting
            raise ValueError(f"weights: {str(path)!r}: JSON nested too deeply") from None
        except (OSError, ValueError) as e:
            raise ValueError(f"weights: cannot read {str(path)!r}: {e}") from None
        if isinstance(data, Mapping):
            for key in _WEIGHTS_KEYS:
                if isinstance(data.get(key), (Mapping, list)):
                    data = data[key]
                    break
        if not isinstance(data, (Mapping, list)):
            raise ValueError(
                f"weights: {str(path)!r} must hold {{'weights': {{name: w}}}}, "
                "{'train_domain_weights': {name: w}}, {name: w} or a list"
            )
        source = data
    if isinstance(source, Mapping):
        items = {}
        for key, value in source.items():
            if not isinstance(key, str):
                raise TypeError(f"weights: domain names must be strings, got {key!r}")
            items[key] = real_number(value, f"weights[{key!r}]")
        if names is None:
            _check_weight_values(np.array(list(items.values()), dtype=np.float64), list(items))
            return items
        unknown = sorted(set(items) - set(names))
        if unknown:
            raise ValueError(
                f"weights name unknown domains {unknown}; the corpus has {list(names)}"
            )
        out = np.array([items.get(n, 0.0) for n in names], dtype=np.float64)
        _check_weight_values(out, names)
        return out
    source = plain_values(source, "weights")  # (also a JSON [true, 1])
    source = tensor_values(source, "weights")
    try:
        # (refused below: numpy reads bytearray(b"\x01\x02") as the weights [1, 2])
        raw = None if isinstance(source, (bytes, bytearray)) else np.asarray(source)
    except (TypeError, ValueError):
        raw = None
    if raw is not None and raw.dtype == object and raw.ndim == 1:
        # Python ints beyond int64 (numpy keeps them as objects): each checked as a number, as
        # a mapping's values are.
        raw = np.array([real_number(v, f"weights[{i}]") for i, v in enumerate(raw)], np.float64)
    # Strings, booleans and complex numbers would convert (or fail) with no word about why.
    if raw is None or raw.dtype.kind not in "iuf" and raw.size:
        what = type(source).__name__ if raw is None else f"{type(source).__name__} of {raw.dtype}"
        raise TypeError(
            f"weights must be a path, a mapping, or a sequence, an array or a tensor of real "
            f"numbers, got {what}"
        )
    out = raw.astype(np.float64)
    if out.ndim != 1:
        raise ValueError(f"weights must be 1-D, got shape {tuple(out.shape)}")
    if names is not None and len(out) != len(names):
        raise ValueError(f"weights has {len(out)} entries, the corpus has {len(names)} domains")
    _check_weight_values(out, names)
    return out.copy()


_FLOAT_MAX = float(np.finfo(np.float64).max)


def _check_weight_values(w: np.ndarray, names: Sequence[str] | None) -> None:
    # The usual case in two reductions (set_weights checks every change: 8 against 19 us at
    # K = 22): NaN fails the comparisons, and entries in [0, max / 2n] with a positive largest
    # have a finite, positive sum whatever its rounding.  Anything else takes the checks below,
    # which name the first bad entry.
    if w.size:
        lo, hi = float(w.min()), float(w.max())
        if lo >= 0.0 and 0.0 < hi <= _FLOAT_MAX / (2 * w.size):
            return
    label = (lambda i: repr(names[i])) if names is not None else str
    bad = np.flatnonzero(~np.isfinite(w))
    if bad.size:
        raise ValueError(f"weights must be finite; domain {label(int(bad[0]))} is {w[bad[0]]}")
    bad = np.flatnonzero(w < 0)
    if bad.size:
        raise ValueError(f"weights must be >= 0; domain {label(int(bad[0]))} is {w[bad[0]]}")
    with np.errstate(over="ignore"):  # an overflowing sum is reported below, not warned about
        total = w.sum()
    if w.size == 0 or not total > 0:
        raise ValueError("weights must have a positive sum")
    if not np.isfinite(total):
        raise ValueError("weights sum overflows float64: scale them down")


# ----------------------------------------------------------------------------------------------
# TokenCorpus
# ----------------------------------------------------------------------------------------------


# A fork copies a lock as it is: a DataLoader worker forked while another thread of the parent
# was mapping a file (holding _maps_lock) waited for that lock forever at its first read.  The
# maps the lock guards are consistent between bytecodes, so the child takes a fresh lock.
_CORPORA: weakref.WeakSet[TokenCorpus] = weakref.WeakSet()


def _fresh_map_locks() -> None:
    for corpus in list(_CORPORA):
        corpus._maps_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_map_locks)


class TokenCorpus:
    """Flat token files per domain, memory-mapped on first read and never read whole.

    Args:
        domains: maps a domain name to one token file or a list of them.  A file is either raw
            little-endian ``uint16``/``uint32`` tokens (``.bin`` or any other suffix) or a 1-D
            integer ``.npy`` array (its dtype comes from the header; a signed one must hold no
            negative id: a batch that reads one raises ``CorpusError``).  A file of another
            suffix than ``.bin`` that starts with the ``.npy`` magic is read as ``.npy``.
        dtype: dtype of the raw files (``"uint16"`` or ``"uint32"``).  When omitted, it is read from
            a ``corpus.json`` next to the file (written by ``fastmix prepare``).

    Every file is checked when the corpus is built (exists, is readable, its size is a multiple of
    the token size, it is not empty as a domain), with errors that name the domain and the file.
    The corpus pickles without its memory maps (each process maps the files again), so it travels
    cheaply to DataLoader workers under any start method.
    """

    #: The most files one process keeps memory-mapped (the least recently read are unmapped, and
    #: mapped again when next read).  ``None``: half the process's soft limit on open files, at
    #: most 32768 (each map holds a file descriptor and a memory area).
    max_open_maps: int | None = None

    def __init__(
        self, domains: Mapping[str, PathLike | Sequence[PathLike]], *, dtype: Any = None
    ) -> None:
        if not isinstance(domains, Mapping) or not domains:
            raise TypeError("domains must be a non-empty mapping of name -> file or list of files")
        self._bin_dtype = None if dtype is None else _bin_dtype(dtype, "dtype")
        self.names: list[str] = []
        self.files: dict[str, list[Path]] = {}
        self.file_tokens: dict[str, list[int]] = {}
        self._flat_files: list[Path] = []
        self._flat_dtypes: list[np.dtype] = []
        self._flat_offsets: list[int] = []  # byte offset of the data (the .npy header)
        self._flat_sizes: list[int] = []
        # What each file was when inspected (device, inode, bytes), to refuse mapping another
        # file that has taken its name since (a domain prepared again while a job runs; a spawned
        # DataLoader worker maps the files anew).
        self._flat_ids: list[tuple[int, int, int]] = []
        self._host = socket.gethostname()
        #: The corpus.json the corpus was loaded from (``from_dir``), else None.
        self.manifest: dict[str, Any] | None = None
        # corpus.json (or the error reading it) per directory, while the files are inspected
        self._manifests: dict[Path, dict[str, Any] | CorpusError | None] = {}
        # ... and the file names it lists, as a set (a list scan per file was O(files) each)
        self._manifest_files: dict[Path, frozenset[str]] = {}
        for name, spec in domains.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"domain names must be non-empty strings, got {name!r}")
            if isinstance(spec, (str, bytes, os.PathLike)):
                paths = [spec]
            elif isinstance(spec, Sequence):
                paths = list(spec)
            else:
                raise TypeError(
                    f"domain {name!r}: expected a path or a list of paths, "
                    f"got {type(spec).__name__}"
                )
            if not paths:
                raise CorpusError(f"domain {name!r} lists no files")
            sizes = []
            self.names.append(name)
            self.files[name] = []
            for p in paths:
                if not isinstance(p, (str, bytes, os.PathLike)):
                    raise TypeError(f"domain {name!r}: file must be a path, got {p!r}")
                # Absolute: a relative path would follow the process's working directory.
                path = Path(os.path.abspath(os.fsdecode(p)))
                dt, offset, n, identity = self._inspect(name, path)
                self._flat_ids.append(identity)
                self.files[name].append(path)
                self._flat_files.append(path)
                self._flat_dtypes.append(dt)
                self._flat_offsets.append(offset)
                self._flat_sizes.append(n)
                sizes.append(n)
            if sum(sizes) == 0:
                listing = ", ".join(repr(str(p)) for p in self.files[name])
                raise CorpusError(f"domain {name!r} is empty: its files ({listing}) hold no tokens")
            self.file_tokens[name] = sizes
        # Whether any file's dtype can hold negative ids (checked where windows are read).
        self._any_signed = any(dt.kind == "i" for dt in self._flat_dtypes)
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self._maps_lock = threading.Lock()
        _CORPORA.add(self)
        self._evicts = False  # (set at each new map: more files than max_open_maps)
        del self._manifests, self._manifest_files

    @classmethod
    def from_dir(cls, path: PathLike) -> TokenCorpus:
        """Load a corpus written by ``fastmix prepare`` (``<path>/corpus.json`` + token files)."""
        root = Path(path)
        if not root.is_dir():  # (a token file given for its directory said "has no corpus.json")
            why = "is not a directory" if root.exists() else "does not exist"
            raise CorpusError(
                f"from_dir: {str(root)!r} {why}; give the folder `fastmix prepare` wrote"
            )
        manifest = _read_manifest(root)
        if manifest is None:
            raise CorpusError(f"{str(root)!r} has no {CORPUS_MANIFEST} (run `fastmix prepare`)")
        where = repr(str(root / CORPUS_MANIFEST))
        domains = {}
        listed = []  # (domain, file name) in the order the corpus inspects the files
        for name, info in manifest["domains"].items():
            files = info.get("files") if isinstance(info, Mapping) else None
            if (
                not isinstance(files, list)
                or not files
                or not all(isinstance(f, str) and f for f in files)
            ):
                raise CorpusError(f"{where}: domain {name!r} needs 'files', a list of file names")
            domains[name] = [root / f for f in files]
            listed += [(name, f) for f in files]
        if not domains:
            raise CorpusError(f"{where} lists no domains")
        if "dtype" not in manifest:
            raise CorpusError(f"{where} has no 'dtype' ('uint16' or 'uint32')")
        try:
            dtype = _bin_dtype(manifest["dtype"], "dtype")
        except ValueError as e:
            raise CorpusError(f"{where}: {e}") from None
        corpus = cls(domains, dtype=dtype)
        _check_one_file_per_name(where, listed, corpus._flat_ids)
        for name, info in manifest["domains"].items():
            # A copy cut short at a token boundary, or a file written after the manifest, loads
            # with no other sign.
            expected = info.get("tokens")
            held = sum(corpus.file_tokens[name])
            if isinstance(expected, int) and not isinstance(expected, bool) and expected != held:
                raise CorpusError(
                    f"{where}: domain {name!r} has {expected:,} tokens, its files "
                    f"({corpus.domain_files(name)}) hold {held:,}: a file is truncated or was "
                    "replaced (prepare the domain again)"
                )
        corpus.manifest = manifest
        return corpus

    def _inspect(
        self, name: str, path: Path
    ) -> tuple[np.dtype, int, int, tuple[int, int, int]]:
        """dtype, data offset, token count and identity (device, inode, bytes) of one file, all
        read through one open descriptor, so that they describe the same file even when its name
        is given to another file meanwhile (a domain prepared again while a job starts)."""
        where = f"domain {name!r}, file {str(path)!r}"
        if not path.exists():
            raise CorpusError(f"{where}: no such file")
        if not path.is_file():  # (before open: opening a FIFO would wait for a writer)
            raise CorpusError(f"{where}: not a regular file")
        try:
            f = _open_nonblocking(path)
        except OSError as e:
            raise CorpusError(f"{where}: cannot be read ({e.strerror or e})") from None
        with f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise CorpusError(f"{where}: not a regular file")
            identity = (st.st_dev, st.st_ino, st.st_size)
            size = st.st_size
            try:
                head = f.read(8)
            except OSError as e:
                raise CorpusError(f"{where}: cannot be read ({e.strerror or e})") from None
            # A .bin file is raw whatever it starts with: uint16 tokens 20115, 19797, 22864 (ids
            # of a 50k vocabulary) are the bytes of the .npy magic, and such a file failed to load.
            if path.suffix == ".npy" or (path.suffix != ".bin" and head[:6] == b"\x93NUMPY"):
                dt, offset, n = _npy_header(f, size, where)
                return dt, offset, n, identity
        dt = self._bin_dtype
        if dt is None:
            manifest = self._manifest_beside(path)
            if manifest is not None:
                dt = _bin_dtype(manifest.get("dtype"), f"dtype in {path.parent / CORPUS_MANIFEST}")
        else:
            try:
                manifest = self._manifest_beside(path)
            except CorpusError:  # not a fastmix manifest: no opinion on an explicit dtype
                manifest = None
            if manifest is not None:
                listed = self._manifest_files.get(path.parent)
                if listed is None:
                    listed = self._manifest_files[path.parent] = _manifest_file_names(manifest)
                _check_manifest_dtype(where, path, dt, manifest, listed)
        if dt is None:
            raise CorpusError(
                f"{where}: a raw token file needs dtype= ('uint16' or 'uint32') or a "
                f"{CORPUS_MANIFEST} beside it"
            )
        if size % dt.itemsize:
            raise CorpusError(
                f"{where}: size {size} bytes is not a multiple of the token size "
                f"({dt.itemsize} bytes for {dt.name}); the file is truncated or has another dtype"
            )
        return dt, 0, size // dt.itemsize, identity

    def _manifest_beside(self, path: Path) -> dict[str, Any] | None:
        """The corpus.json beside ``path`` (None without one), read once per directory while the
        corpus is built; a damaged one raises CorpusError, every time it is asked for."""
        if path.parent not in self._manifests:
            try:
                self._manifests[path.parent] = _read_manifest(path.parent)
            except CorpusError as e:
                self._manifests[path.parent] = e
        manifest = self._manifests[path.parent]
        if isinstance(manifest, CorpusError):
            raise manifest
        return manifest

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "max_open_maps" and value is not None:  # an error here, not at a later read
            _max_open_maps(value)
        super().__setattr__(name, value)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()  # each process maps the files itself
        del state["_maps_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if not isinstance(state.get("_maps"), OrderedDict):  # pickled when it was a list
            state["_maps"] = OrderedDict()
        state.setdefault("_evicts", False)
        self.__dict__.update(state)
        self._maps_lock = threading.Lock()
        _CORPORA.add(self)

    # -- sizes ----------------------------------------------------------------------------------

    @property
    def num_domains(self) -> int:
        """Number of domains, K."""
        return len(self.names)

    @property
    def tokens(self) -> dict[str, int]:
        """Tokens per domain."""
        return {name: sum(sizes) for name, sizes in self.file_tokens.items()}

    def num_windows(self, seq_len: int) -> dict[str, int]:
        """Windows of ``seq_len + 1`` tokens (stride ``seq_len``, inside one file) per domain."""
        seq_len = integer(seq_len, "seq_len", 1)
        return {
            name: sum(_file_windows(n, seq_len) for n in sizes)
            for name, sizes in self.file_tokens.items()
        }

    def window_table(self, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(n_windows[K], file_begin[K + 1], file_window_end[F]) as ``_C.WindowTable`` takes them.

        Files are numbered in domain order; domain ``d`` owns files ``file_begin[d]`` to
        ``file_begin[d + 1] - 1`` and ``file_window_end[f]`` counts the domain's windows up to and
        including file ``f``.
        """
        seq_len = integer(seq_len, "seq_len", 1)
        n_windows = np.zeros(self.num_domains, np.int64)
        file_begin = np.zeros(self.num_domains + 1, np.int64)
        ends = []
        for d, name in enumerate(self.names):
            total = 0
            for n in self.file_tokens[name]:
                total += _file_windows(n, seq_len)
                ends.append(total)
            n_windows[d] = total
            file_begin[d + 1] = len(ends)
        return n_windows, file_begin, np.array(ends, np.int64)

    def file_path(self, file_index: int) -> Path:
        """Path of the ``file_index``-th file (files numbered in domain order)."""
        # Checked as in tokens_of: -1 named the last file, one past the end an IndexError.
        return self._flat_files[self._file_index(file_index)]

    def domain_files(self, name: str) -> str:
        """The domain's files as one string, for error messages."""
        if name not in self.files:
            raise ValueError(f"no domain {name!r}; the corpus has {self.names}")
        return ", ".join(repr(str(p)) for p in self.files[name])

    # -- reading --------------------------------------------------------------------------------

    def tokens_of(self, file_index: int) -> np.ndarray:
        """The whole file as a read-only memory-mapped array (mapped on first read; a process
        keeps the ``max_open_maps`` most recently read files mapped)."""
        return self._map(self._file_index(file_index))

    def read(self, file_index: int, offset: int, length: int) -> np.ndarray:
        """``length`` tokens of file ``file_index`` from token ``offset`` (a view of the map)."""
        tokens = self._map(self._file_index(file_index))
        offset, length = integer(offset, "offset", 0), integer(length, "length", 0)
        if offset + length > tokens.size:
            raise ValueError(
                f"offset + length = {offset + length} is past the end of file {file_index} "
                f"({tokens.size} tokens)"
            )
        return tokens[offset : offset + length]

    def _file_index(self, file_index: Any) -> int:
        i = integer(file_index, "file_index")
        if not 0 <= i < len(self._flat_files):
            raise ValueError(f"file_index must be in [0, {len(self._flat_files)}), got {i}")
        return i

    def _map(self, file_index: int) -> np.ndarray:
        maps = self._maps
        arr = maps.get(file_index)
        if arr is not None:
            # The order of use matters only where files can be let go: a corpus of fewer files
            # than the limit skips it (the lock and the move cost ~0.35 us per read, ~11 us per
            # batch of 32 windows, ~10% of next() here).
            if self._evicts:
                with self._maps_lock:
                    if file_index in maps:
                        maps.move_to_end(file_index)
            return arr
        # The map is made from the descriptor the check looked at: a file renamed over this one
        # between the check and the map cannot be mapped under the old file's length.
        with self._open_unchanged(file_index) as f:
            if self._flat_sizes[file_index] == 0:
                # mmap refuses a length of 0 ("cannot mmap an empty file"): an empty shard of a
                # domain is an empty array, as an empty .npy already was.
                arr = np.empty(0, dtype=self._flat_dtypes[file_index])
                arr.flags.writeable = False
            else:
                arr = np.memmap(
                    f,
                    dtype=self._flat_dtypes[file_index],
                    mode="r",
                    offset=self._flat_offsets[file_index],
                    shape=(self._flat_sizes[file_index],),
                )
        with self._maps_lock:
            maps[file_index] = arr
            # Each map holds a file descriptor (Python's mmap keeps a duplicate) and a memory
            # area: the least recently read are let go past max_open_maps (reading every file of a
            # large corpus ended in "Too many open files" at the descriptor limit, 1024 by
            # default on Linux).  A view still in use keeps its map alive until it is dropped.
            limit = _max_open_maps(self.max_open_maps)
            self._evicts = len(self._flat_files) > limit
            while len(maps) > limit:
                maps.popitem(last=False)
        return arr

    def _open_unchanged(self, file_index: int) -> BinaryIO:
        """File ``file_index`` open for reading, once its descriptor is known to be the file
        inspected when the corpus was opened."""
        path = self._flat_files[file_index]
        dev, ino, size = self._flat_ids[file_index]
        try:
            f = _open_nonblocking(path)
        except OSError as e:
            why = e.strerror or e
            raise CorpusError(f"file {str(path)!r} cannot be read now ({why})") from None
        st = os.fstat(f.fileno())
        # Inodes name a file on this host only: elsewhere (a pickled corpus) the size must do.
        same_host = socket.gethostname() == self._host
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_size != size
            or (same_host and (st.st_dev, st.st_ino) != (dev, ino))
        ):
            f.close()
            raise CorpusError(
                f"file {str(path)!r} has changed since the corpus was opened (replaced or "
                f"resized: {size} bytes then, {st.st_size} now); open the corpus again"
            )
        return f

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {t:,} tokens" for n, t in self.tokens.items())
        return f"TokenCorpus({parts})"


def _max_open_maps(setting: int | None) -> int:
    """``TokenCorpus.max_open_maps`` in effect: the setting, else half the soft limit on open
    files (at least 16, at most 32768)."""
    if setting is not None:
        # (checked when a file is mapped too: the class attribute may be set directly; it was
        # max(1, int(setting)), so 0 meant 1, 2.7 meant 2 and "abc" a bare ValueError)
        return integer(setting, "TokenCorpus.max_open_maps", 1)
    try:
        import resource
    except ImportError:  # (Windows)
        return 512
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft < 0:
        return 32768
    return max(16, min(soft // 2, 32768))


def _file_windows(n_tokens: int, seq_len: int) -> int:
    return max(0, (n_tokens - 1) // seq_len)


def _open_nonblocking(path: Path) -> BinaryIO:
    """``open(path, "rb")`` that fails instead of waiting when ``path`` is a FIFO without a writer
    (O_NONBLOCK changes nothing for regular files)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    return os.fdopen(fd, "rb")


def _npy_header(f: BinaryIO, size: int, where: str) -> tuple[np.dtype, int, int]:
    """dtype, data offset and length of the 1-D integer array in the .npy file open as ``f``
    (``size`` bytes). The header is read as np.load reads it, from the same descriptor the
    caller identified the file by; the data must fit in the file (a mapping past its end would
    fault on the first read)."""
    fmt = np.lib.format
    try:
        f.seek(0)
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(f)
        else:  # 3.0 only holds structured arrays whose field names need UTF-8
            raise ValueError(f"format version {version[0]}.{version[1]} is not read here")
        offset = f.tell()
    except (ValueError, TypeError, OSError, EOFError) as e:
        raise CorpusError(f"{where}: not a valid .npy file ({e})") from None
    if len(shape) != 1 or dtype.kind not in _NPY_KINDS:
        raise CorpusError(
            f"{where}: a .npy token file must be a 1-D integer array, got shape "
            f"{shape} and dtype {dtype}"
        )
    if dtype.kind == "u" and dtype.itemsize == 8:
        # input_ids are int64: ids from 2**63 on would come out negative.
        raise CorpusError(
            f"{where}: uint64 token ids do not fit int64 input_ids; save the array as "
            "uint32 or int64"
        )
    n = int(shape[0])
    if offset + n * dtype.itemsize > size:
        raise CorpusError(
            f"{where}: truncated .npy file: its header promises {n:,} tokens "
            f"({n * dtype.itemsize:,} bytes), {size - offset:,} bytes follow the header"
        )
    return dtype, offset, n


def _bin_dtype(dtype: Any, what: str) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in _BIN_DTYPES:
        raise ValueError(f"{what} must be 'uint16' or 'uint32' for raw token files, got {dtype!r}")
    if dt != dt.newbyteorder("<"):  # raw token files are little-endian; '>u2' would misread them
        raise ValueError(f"{what}: raw token files are little-endian, got {dtype!r}")
    return _BIN_DTYPES[dt.name]


def _manifest_file_names(manifest: dict[str, Any]) -> frozenset[str]:
    """Every file name a fastmix manifest lists, over all its domains."""
    return frozenset(
        f
        for info in manifest["domains"].values()
        if isinstance(info, Mapping) and isinstance(info.get("files"), list)
        for f in info["files"]
        if isinstance(f, str)
    )


def _check_manifest_dtype(
    where: str, path: Path, dtype: np.dtype, manifest: dict[str, Any], listed: frozenset[str]
) -> None:
    """An explicit dtype= must agree with a fastmix manifest that lists the file (another dtype
    would read every token wrong); a manifest that does not list it is none of our business.
    ``listed``: the manifest's file names (``_manifest_file_names``)."""
    try:
        theirs = _bin_dtype(manifest.get("dtype"), "dtype")
    except ValueError:
        return
    if path.name in listed and theirs != dtype:
        raise CorpusError(
            f"{where}: dtype={dtype.name!r} but {str(path.parent / CORPUS_MANIFEST)!r} says "
            f"{theirs.name!r}"
        )


@functools.lru_cache(maxsize=1 << 16)  # (prepare checks every corpus.json name twice per domain)
def _file_name_key(name: str) -> str:
    """``name`` as a file system that tells neither letter case nor Unicode normalisation apart
    may take it (the default on macOS and Windows; macOS also normalises file names): its
    canonical caseless form, so two names with one key may name one file there."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())


def _check_one_file_per_name(
    where: str, listed: Sequence[tuple[str, str]], identities: Sequence[tuple[int, int, int]]
) -> None:
    """Refuse two file names of a manifest, differing only in letter case or Unicode
    normalisation, that are one file here (``identities``: (device, inode, bytes) of each listed
    file, in order): on such a file system the domain prepared last overwrote the other's tokens,
    which the token-count check would only call a truncated or replaced file.  Two such names
    that are two files (a file system that tells them apart) are fine."""
    seen: dict[tuple[int, int], tuple[str, str]] = {}
    for (name, file), (device, inode, _) in zip(listed, identities, strict=True):
        if not inode:  # a file system without inode numbers: nothing to compare
            continue
        other, other_file = seen.setdefault((device, inode), (name, file))
        if other_file != file and _file_name_key(other_file) == _file_name_key(file):
            raise CorpusError(
                f"{where}: domains {other!r} ({other_file!r}) and {name!r} ({file!r}) list one "
                "file on this file system, which does not tell letter case or Unicode "
                "normalisation apart in file names (the default on macOS and Windows): the "
                "domain prepared last overwrote the other's tokens; prepare the domains again "
                "under names that differ otherwise"
            )


def _read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / CORPUS_MANIFEST
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # JSON, UTF-8, nesting too deep
        raise CorpusError(f"{str(path)!r} cannot be read: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("domains"), dict):
        raise CorpusError(f"{str(path)!r} is not a fastmix corpus manifest (no 'domains' mapping)")
    return data


# ----------------------------------------------------------------------------------------------
# Shared control block: weight changes and worker progress
# ----------------------------------------------------------------------------------------------

_METHODS = ("alias", "stratified", "greedy")
_POLICIES = ("reshuffle", "stop", "error")
_STATE_FORMAT = "fastmix.MixtureDataset"
_STATE_VERSION = 1
_MAP_FIELDS = ("file", "offset", "epoch", "window")  # what WindowTable.map writes per sample
# Ring of weight changes in shared memory.  A change is pending only until every worker has started
# its step (at most prefetch_factor * num_workers steps), so 1024 slots are far more than needed
# even when a rule changes the weights every step.
_EVENT_CAPACITY = 1024
# Progress slots: one per DataLoader worker of this rank, and one more for the iterator in the
# process that owns the dataset (iterating without workers).
_WORKER_SLOTS = 256
_IN_PROCESS_SLOT = _WORKER_SLOTS
# A worker waiting for weights whose CUDA copy has not completed gives up after this long.
_WAIT_TIMEOUT_S = 120.0
_READY, _PENDING, _CANCELLED = 1, 0, 2
# A progress slot no iterator holds.  Not -1: an iterator that will next produce step 0 records
# step - 1 = -1 as started, and it must still count as live (its changes are not consumed yet).
_NO_ITERATOR = -(2**62)


class _Control:
    """Shared memory that carries weight changes to DataLoader workers and their progress back.

    Every write and every read-modify-write happens under one inter-process lock, so the step a
    change is given (the first step no worker has started) is race-free: a worker records the step
    it starts and collects the pending changes in the same critical section.
    """

    def __init__(self, num_domains: int):
        # A spawn-context lock travels to workers under every start method (a fork-context one
        # cannot be pickled for spawn), and fork children inherit it all the same.
        self.lock = mp.get_context("spawn").Lock()
        self.tensors = {
            "event_step": torch.full((_EVENT_CAPACITY,), -1, dtype=torch.int64),
            "event_id": torch.full((_EVENT_CAPACITY,), -1, dtype=torch.int64),
            "event_flag": torch.zeros(_EVENT_CAPACITY, dtype=torch.int64),
            # The order set_weights was called in (a CUDA change is published when its copy
            # lands, after changes made later): at one step the change made last wins.
            "event_made": torch.zeros(_EVENT_CAPACITY, dtype=torch.int64),
            "event_weights": torch.zeros(_EVENT_CAPACITY, num_domains, dtype=torch.float64),
            "count": torch.zeros(1, dtype=torch.int64),
            "started": torch.full((_WORKER_SLOTS + 1,), _NO_ITERATOR, dtype=torch.int64),
            # Who holds each slot: the process (a slot of a process that has exited is free) and
            # the registration (a newer iterator on the same slot supersedes the older one).
            "owner_pid": torch.zeros(_WORKER_SLOTS + 1, dtype=torch.int64),
            # ... and when that process started (0 where unknown): a pid the OS has since given
            # to another process no longer holds the slot.
            "owner_start": torch.zeros(_WORKER_SLOTS + 1, dtype=torch.int64),
            "owner_token": torch.full((_WORKER_SLOTS + 1,), -1, dtype=torch.int64),
            "registrations": torch.zeros(1, dtype=torch.int64),
            # The furthest step any iterator has claimed in this generation.
            "high_water": torch.full((1,), -1, dtype=torch.int64),
            "exhausted": torch.full((num_domains,), -1, dtype=torch.int64),
            # Bumped by clear(): iterators (and dataset copies in workers) of an earlier
            # generation must neither write here nor produce (see _StaleIterator).
            "generation": torch.zeros(1, dtype=torch.int64),
        }
        for t in self.tensors.values():
            t.share_memory_()
        self._views: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        from multiprocessing import context

        if context.get_spawning_popen() is not None:  # to a worker process: share the same memory
            return {"lock": self.lock, "tensors": self.tensors, "_views": None}
        # A plain pickle or deepcopy makes an independent copy with its own lock.
        return {"lock": None, "tensors": {k: t.clone() for k, t in self.tensors.items()}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.lock = state["lock"] or mp.get_context("spawn").Lock()
        self.tensors = state["tensors"]
        if "owner_start" not in self.tensors:  # pickled before slots recorded start times
            self.tensors["owner_start"] = torch.zeros_like(self.tensors["owner_pid"])
        if state["lock"] is None:
            for t in self.tensors.values():
                t.share_memory_()
        self._views = None

    @property
    def v(self) -> dict[str, np.ndarray]:
        if self._views is None:  # numpy views of the shared tensors (rebuilt after unpickling)
            self._views = {k: t.numpy() for k, t in self.tensors.items()}
        return self._views

    # -- writers (main process) ------------------------------------------------------------------

    def earliest_step(self, floor: int) -> int:
        with self.lock:
            return self._earliest_step(floor)

    def _earliest_step(self, floor: int, live: np.ndarray | None = None) -> int:
        started = self.v["started"][self._live_slots() if live is None else live]
        return max(floor, int(started.max()) + 1) if started.size else floor

    def _live_slots(self) -> np.ndarray:
        """The slots held by iterators in a process still running (a DataLoader whose workers
        have exited leaves their slots behind), through _running: publish() looks once and
        uses the answer twice."""
        v = self.v
        held = np.flatnonzero(v["started"] != _NO_ITERATOR)
        me = os.getpid()
        owners = [(int(v["owner_pid"][i]), int(v["owner_start"][i])) for i in held]
        running = _running([o for o in owners if o[0] != me])
        live = [i for i, o in zip(held, owners, strict=True) if o[0] == me or running[o]]
        return np.array(live, dtype=np.int64)

    def publish(
        self,
        weights: np.ndarray | None,
        step: int | None,
        floor: int,
        made: int,
        flag: int = _READY,
        least: int | None = None,
    ) -> tuple[int, int]:
        """Append change number ``made``; returns (event id, the step it applies from).

        ``floor`` places a change without ``step``; a given ``step`` must only come after
        ``least`` (default ``floor``) and the steps the live iterators have started."""
        v = self.v
        low = floor if least is None else min(floor, least)
        with self.lock:
            live = self._live_slots()
            earliest = self._earliest_step(floor if step is None else low, live)
            if step is None:
                step = earliest
            elif step < earliest:
                raise ValueError(
                    f"step={step}: the stream has already been produced up to step {earliest - 1} "
                    f"(DataLoader workers run ahead by prefetch_factor * num_workers batches); "
                    f"the earliest step a change can reach now is {earliest}"
                )
            count = int(v["count"][0])
            slot = count % _EVENT_CAPACITY
            if count >= _EVENT_CAPACITY and v["event_flag"][slot] != _CANCELLED:
                # The slot's change is consumed once every live worker has started its step (it
                # was collected then).  Without workers, once the furthest step claimed has:
                # an idle in-process iterator (a peek) must not hold the ring, and one that
                # resumes after missing changes says so (collect); a new pass replays what the
                # ring still holds.
                workers = v["started"][live[live < _WORKER_SLOTS]]
                consumed_through = (
                    int(workers.min()) if workers.size else max(low - 1, int(v["high_water"][0]))
                )
                if v["event_step"][slot] > consumed_through:
                    raise RuntimeError(
                        f"more than {_EVENT_CAPACITY} weight changes are pending at once; "
                        "change the weights at most once per step"
                    )
            v["event_step"][slot] = step
            v["event_flag"][slot] = flag
            if weights is not None:
                v["event_weights"][slot] = weights
            v["event_id"][slot] = count
            v["event_made"][slot] = made
            v["count"][0] = count + 1
        return count, step

    def fill(self, event_id: int, weights: np.ndarray | None) -> None:
        """Complete a change published without its values (``None`` cancels it)."""
        v = self.v
        slot = event_id % _EVENT_CAPACITY
        with self.lock:
            if v["event_id"][slot] != event_id:
                return
            if weights is None:
                v["event_flag"][slot] = _CANCELLED
            else:
                v["event_weights"][slot] = weights
                v["event_flag"][slot] = _READY

    def dump(self, min_step: int = -1) -> list[tuple[int, list[float]]]:
        """Every change still in the ring for a step >= ``min_step``, in the order they were
        made, as (step, weights)."""
        v = self.v
        with self.lock:
            ids = v["event_id"].copy()
            made = v["event_made"].copy()
            flags = v["event_flag"].copy()
            steps = v["event_step"].copy()
            # Only the rows asked for: the ring is 1024 x K (80 MB at K = 10,000).
            keep = np.flatnonzero((ids >= 0) & (flags == _READY) & (steps >= min_step))
            weights = dict(zip(keep.tolist(), v["event_weights"][keep], strict=True))
        # (not by event id: a CUDA change is published after changes made later, and where two
        # share a step the one made last must win when the list is replayed in order)
        order = [i for i in np.argsort(made, kind="stable").tolist() if i in weights]
        return [(int(steps[i]), weights[i].tolist()) for i in order]

    # -- readers (iterators) ---------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return int(self.v["generation"][0])

    def registrations(self) -> int:
        """How many iterators have begun (a counter that only grows)."""
        with self.lock:
            return int(self.v["registrations"][0])

    def count(self) -> int:
        """How many changes have been published (a counter that only grows)."""
        with self.lock:
            return int(self.v["count"][0])

    def register(self, slot: int, num_slots: int, step: int, generation: int) -> int:
        """An iterator begins: it will next produce ``step``; returns its token for the slot.
        Worker 0 also frees the slots of workers beyond ``num_slots`` (an earlier loader's)."""
        v = self.v
        with self.lock:
            if int(v["generation"][0]) != generation:
                raise _StaleIterator
            token = int(v["registrations"][0])
            v["registrations"][0] = token + 1
            v["started"][slot] = step - 1
            v["owner_pid"][slot] = os.getpid()
            v["owner_start"][slot] = _start_time(os.getpid())
            v["owner_token"][slot] = token
            if slot == 0:
                v["started"][num_slots:_WORKER_SLOTS] = _NO_ITERATOR
            return token

    def release(self, slot: int, token: int) -> None:
        """An iterator has ended: its slot no longer holds back where changes go."""
        v = self.v
        with self.lock:
            if int(v["owner_token"][slot]) == token:
                v["started"][slot] = _NO_ITERATOR
                v["owner_token"][slot] = -1

    def unclaim(self, slot: int, token: int, started: int) -> None:
        """The step an iterator claimed was not produced: it has started only ``started``."""
        v = self.v
        with self.lock:
            if int(v["owner_token"][slot]) == token:
                v["started"][slot] = started

    def collect(
        self,
        slot: int,
        token: int,
        position: int,
        claim: int,
        generation: int,
        seen: int,
        taken: np.ndarray,
    ) -> tuple[list[tuple[int, int, np.ndarray]], int]:
        """Mark ``claim`` started; return the changes (made, step, weights) with step >=
        position that are not in ``taken``, and the count of changes published so far (pass it
        back as ``seen``).  ``taken`` (the iterator's own: the event id last returned from each
        slot of the ring) records what is returned, so each change is returned once (every
        step copied and merged again every change still ahead: with 1,000 changes scheduled
        ahead, a step in-process took 0.95-1.21 ms instead of 58-100 us).

        Waits while a change due at or before ``claim`` still waits for its CUDA copy.  Raises
        _StaleIterator for an iterator of an earlier generation (a state was loaded since),
        _SupersededIterator when a newer iterator has taken the slot, and _MissedChanges when
        more changes than the ring holds were published since ``seen``.
        """
        v = self.v
        deadline = None
        while True:
            with self.lock:
                if int(v["generation"][0]) != generation:
                    raise _StaleIterator
                if int(v["owner_token"][slot]) != token:
                    raise _SupersededIterator
                count = int(v["count"][0])
                if count - seen > _EVENT_CAPACITY:
                    raise _MissedChanges
                live = (v["event_id"] >= 0) & (v["event_step"] >= position)
                waiting = live & (v["event_flag"] == _PENDING) & (v["event_step"] <= claim)
                if not waiting.any():
                    v["started"][slot] = claim
                    v["high_water"][0] = max(int(v["high_water"][0]), claim)
                    ready = np.flatnonzero(
                        live & (v["event_flag"] == _READY) & (v["event_id"] != taken)
                    )
                    taken[ready] = v["event_id"][ready]
                    changes = [
                        (
                            int(v["event_made"][i]),
                            int(v["event_step"][i]),
                            v["event_weights"][i].copy(),
                        )
                        for i in ready
                    ]
                    return changes, count
            deadline = deadline or time.monotonic() + _WAIT_TIMEOUT_S
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"weights due at step {claim} never arrived from the main process "
                    f"(waited {_WAIT_TIMEOUT_S:.0f} s for their device-to-host copy)"
                )
            time.sleep(1e-4)

    def claimed_end(self) -> int:
        """One past the furthest step an iterator of this generation has claimed (iterators that
        have ended included)."""
        with self.lock:
            return int(self.v["high_water"][0]) + 1

    def clear(self) -> int:
        """Forget every change, exhaustion mark and iterator (the main process loads another
        state); returns the new generation."""
        with self.lock:
            v = self.v
            v["generation"][0] += 1
            v["event_step"][:] = -1
            v["event_id"][:] = -1
            v["event_flag"][:] = _PENDING
            v["exhausted"][:] = -1
            v["started"][:] = _NO_ITERATOR
            v["owner_token"][:] = -1
            v["high_water"][0] = -1
            return int(v["generation"][0])

    def mark_exhausted(self, domain: int, sample: int, generation: int | None = None) -> None:
        with self.lock:
            if generation is not None and int(self.v["generation"][0]) != generation:
                return  # an abandoned run's iterator: its marks are not this run's
            if self.v["exhausted"][domain] < 0:
                self.v["exhausted"][domain] = sample


class _StaleIterator(Exception):
    """An iterator begun before the dataset loaded another state (its run was abandoned)."""


class _SupersededIterator(Exception):
    """A newer iterator holds this one's progress slot (e.g. ``iter(ds)`` again in-process)."""


class _MissedChanges(Exception):
    """More changes were published while an iterator was idle than the ring keeps."""


def _proc_stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):  # gone, or no /proc (macOS)
        return None


def _started_at(fields: list[bytes] | None) -> int | None:
    """The start time in ``_proc_stat`` fields, in clock ticks since boot (None if unknown)."""
    try:
        return int(fields[19]) if fields else None  # field 22 of stat(5); fields[0] is field 3
    except (IndexError, ValueError):
        return None


def _same_start(start: int, at: int | None) -> bool:
    """Whether a process that started at ``at`` (None: unknown) can be the one recorded as
    starting at ``start`` (0: not recorded)."""
    return start == 0 or at is None or at == start


def _start_time(pid: int) -> int:
    """When process ``pid`` started, in clock ticks since boot (0 where /proc cannot say)."""
    at = _started_at(_proc_stat(pid))
    return 0 if at is None else at


def _alive(pid: int, start: int = 0) -> bool:
    """Whether process ``pid`` is running and, if ``start`` is known (not 0), is the process
    that started then and not a later one the OS has given the same pid."""
    if os.name != "posix":  # (os.kill(pid, 0) is no probe on Windows)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive unless /proc says otherwise below
        pass
    fields = _proc_stat(pid)
    if fields is None:  # no /proc (macOS), or it has just exited: the kill probe decides
        return True
    if fields[0] == b"Z":  # an exited worker its parent has not joined yet holds back nothing
        return False
    return _same_start(start, _started_at(fields))


# Open pidfds of the processes _running has been asked about, by (pid, start time).  A pidfd
# stays bound to its process (a later process given the same pid is another one) and turns
# readable when the process exits, so one poll over all of them tells which have exited.
_PIDFDS: dict[tuple[int, int], int] = {}
_PIDFDS_LOCK = threading.Lock()


def _running(owners: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bool]:
    """``_alive(pid, start)`` for each ``(pid, start)``, in one poll where the OS has pidfds.

    set_weights asks this about every DataLoader worker at every change: a kill probe and an
    open, read and close of /proc/<pid>/stat per worker took ~27 us each on an idle machine and
    ~100 us with the workers busy; a poll over pidfds kept open, 5.9 us for two and 6.3 for four
    (Zen 3).  Pidfds of exited processes are closed at each call (by then their slots are free or
    freed next), so the cache holds only running processes.  Where pidfds are missing (not
    Linux, Linux < 5.3) or cannot be opened, _alive answers.
    """
    if not owners and not _PIDFDS:
        return {}
    if not hasattr(os, "pidfd_open") or not hasattr(select, "poll"):
        return {o: _alive(*o) for o in owners}
    answer: dict[tuple[int, int], bool] = {}
    with _PIDFDS_LOCK:
        for pid, start in owners:
            if (pid, start) in _PIDFDS or (pid, start) in answer:
                continue
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                answer[(pid, start)] = False
                continue
            except OSError:  # no pidfds here, or out of file descriptors: probe as before
                answer[(pid, start)] = _alive(pid, start)
                continue
            # The pid may belong to a later process already: the start time says (once).
            if not _same_start(start, _started_at(_proc_stat(pid))):
                os.close(fd)
                answer[(pid, start)] = False
            else:
                _PIDFDS[(pid, start)] = fd
        poller = select.poll()
        for fd in _PIDFDS.values():
            poller.register(fd, select.POLLIN)
        exited = {fd for fd, _ in poller.poll(0)}
        for key, fd in list(_PIDFDS.items()):
            if fd in exited:
                os.close(fd)
                del _PIDFDS[key]
        for key in owners:
            answer.setdefault(key, key in _PIDFDS)
    return answer


def _close_pidfds_in_child() -> None:
    # A forked child inherits the descriptors but not the need for them; its own calls open
    # their own.
    global _PIDFDS_LOCK
    _PIDFDS_LOCK = threading.Lock()
    for fd in _PIDFDS.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _PIDFDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_pidfds_in_child)


# ----------------------------------------------------------------------------------------------
# The global stream
# ----------------------------------------------------------------------------------------------


# What _Stream.state() holds: the global stream's position, the same on every rank.
_STREAM_KEYS = ("step", "cursors", "user_weights", "dropped", "finished", "sampler", "pending")
# What tells two states' positions apart (load_state_dict: the same one loaded again).
_POSITION_KEYS = (*_STREAM_KEYS, "next_step", "worker", "stride", "events", "floor", "weights")


class _Stream:
    """The global sample stream from one state: draws domains, maps windows, applies changes.

    Every process that iterates the dataset runs one of these over every global step; only the
    steps it produces read tokens.
    """

    def __init__(self, ds: MixtureDataset, state: dict[str, Any] | None):
        from fastmix.sampler import MixtureSampler

        self.ds = ds
        K = ds.corpus.num_domains
        self.generation: int | None = None  # the iterator's, when one runs this stream
        self.warn = True  # of a domain dropped at its cap (a replay of drawn steps does not)
        self.pending: dict[int, tuple[int, np.ndarray]] = {}
        # pending's steps as a heap: plan() finds the due changes without scanning them all (a
        # replay merges every change at once: a scan per step made state_dict(step=) quadratic
        # in the changes, 4.7 s after 20,000 steps with a change at each)
        self._due: list[int] = []
        # No domain can reach its cap before this step (see plan): the check is O(K).
        self._cap_check_at = 0
        if state is None:
            self.step = 0
            self.cursors = np.zeros(K, np.int64)
            self.user_weights = ds._initial_weights.copy()
            self.dropped = np.zeros(K, bool)
            self.finished = False
            self.sampler = MixtureSampler(
                self.user_weights, seed=ds.seed, method=ds.method, block=ds.block
            )
        else:
            self.step = int(state["step"])
            self.cursors = np.array(state["cursors"], np.int64)
            self.user_weights = np.array(state["user_weights"], np.float64)
            self.dropped = np.array(state["dropped"], bool)
            self.finished = bool(state["finished"])
            # Any valid weights do: load_state_dict restores the sampler's own weights and position.
            self.sampler = MixtureSampler(
                ds._initial_weights, seed=ds.seed, method=ds.method, block=ds.block
            )
            self.sampler.load_state_dict(state["sampler"])
            for step, weights in state.get("pending", []):
                self.merge(-1, int(step), np.asarray(weights, np.float64))
        # Output buffers of the rank's slice, reused every step (the batch copies out of them).
        n = ds._slice[1] - ds._slice[0]
        self._out = {k: np.empty(n, np.int64) for k in _MAP_FIELDS}
        self._none = {k: np.empty(0, np.int64) for k in _MAP_FIELDS}
        self._out_views = [self._out[k] for k in _MAP_FIELDS]
        self._none_views = [self._none[k] for k in _MAP_FIELDS]
        # The corpus's file table, checked and copied once when first mapped (map_windows did it
        # on every step: O(files) per step, 1.3 ms at a million files).
        self._table: Any = None

    def merge(self, made: int, step: int, weights: np.ndarray) -> None:
        """Take change number ``made`` for ``step``: at one step the change made last wins."""
        if step < self.step:
            return
        old = self.pending.get(step)
        if old is None:
            heapq.heappush(self._due, step)
        if old is None or made > old[0]:
            self.pending[step] = (made, weights)

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "cursors": self.cursors.tolist(),
            "user_weights": self.user_weights.tolist(),
            "dropped": self.dropped.tolist(),
            "finished": self.finished,
            "sampler": self.sampler.state_dict(),
            "pending": [[s, w.tolist()] for s, (_, w) in sorted(self.pending.items())],
        }

    def _apply_weights(self) -> None:
        w = np.where(self.dropped, 0.0, self.user_weights)
        total = w.sum()
        if not total > 0:
            self.finished = True  # every domain with weight is exhausted: the stream ends
            return
        self.sampler._set_checked_weights(w / total)  # (checked when given to the dataset)

    def plan(self, produce: bool) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
        """Draw global step ``self.step``; returns (domains of the slice, window mapping) or None.

        ``None`` means the stream has ended (``on_exhausted="stop"`` or every domain dropped); the
        incomplete global step is not produced, so every rank sees the same number of steps.
        """
        ds = self.ds
        if self._due and self._due[0] <= self.step:
            while self._due and self._due[0] <= self.step:  # in step order: the last one wins
                self.user_weights = self.pending.pop(heapq.heappop(self._due))[1]
            self._apply_weights()
        if self.finished:
            return None
        G = ds._global_batch
        b0, b1 = ds._slice if produce else (0, 0)
        out = self._out if produce else self._none
        caps = ds._caps
        # Snapshot the sampler only when some domain can reach its cap within this step.  The
        # cursors advance by G in all per step, so with `room` windows left to the nearest cap
        # none can be reached for (room - G) // G more steps: the O(K) check is skipped until
        # then (~9 us per step at K = 10,000).  Cursors only go back and domains only drop
        # (both give more room), so the skip stays safe.
        snap = start_cursors = None
        if ds._capped and self.step >= self._cap_check_at:
            room = np.where(self.dropped, np.iinfo(np.int64).max, caps - self.cursors).min()
            if room < G:
                snap = (0, self.sampler.state_dict())
                start_cursors = self.cursors.copy()  # (map advances them in place)
            else:
                self._cap_check_at = self.step + int(room - G) // G + 1
        domains = self.sampler.sample(G)
        done = 0
        while True:
            n = self._map(domains, done, b0, b1, out)
            done += n
            if done == G:
                break
            d = int(domains[done])
            name = ds.corpus.names[d]
            epochs = int(self.cursors[d] // ds._n_windows[d])
            where = f"global sample {self.step * G + done} (step {self.step})"
            if ds.on_exhausted == "error":
                # Back to the start of the step: the sampler had drawn it whole and the cursors
                # had moved past its first `done` samples, so a retry or a state saved now went
                # on from a stream no run produces.
                assert snap is not None and start_cursors is not None
                self.sampler.load_state_dict(snap[1])
                self.cursors[:] = start_cursors
                raise RuntimeError(
                    f"domain {name!r} is exhausted after {epochs} epoch(s) of "
                    f"{int(ds._n_windows[d])} windows at {where} (on_exhausted='error')"
                )
            ds._control.mark_exhausted(d, self.step * G + done, self.generation)
            if ds.on_exhausted == "stop":
                self.finished = True
                return None
            # "reshuffle" with max_epochs: drop the domain, renormalise the rest, redraw from here.
            self.dropped[d] = True
            if self.warn:
                warnings.warn(
                    f"fastmix: domain {name!r} reached max_epochs={ds.max_epochs} at {where}; it "
                    "is dropped and the other domains' weights are renormalised",
                    RuntimeWarning,
                    stacklevel=2,
                )
            assert snap is not None  # a cap can only be reached when the snapshot was taken
            snap_at, snap_state = snap
            self.sampler.load_state_dict(snap_state)
            if done > snap_at:
                self.sampler.sample(done - snap_at)
            self._apply_weights()
            if self.finished:
                return None
            snap = (done, self.sampler.state_dict())
            domains = np.concatenate([domains[:done], self.sampler.sample(G - done)])
        self.step += 1
        if not produce:
            return None
        return domains[b0:b1], out

    def _map(
        self, domains: np.ndarray, done: int, b0: int, b1: int, out: dict[str, np.ndarray]
    ) -> int:
        """Map samples ``done..`` of the global step; fills ``out`` for slice rows ``[b0, b1)``."""
        ds = self.ds
        if done == 0 and out is self._out:  # the common case: the whole slice, no redraw
            begin, end, views = b0, b1, self._out_views
        elif done < b1:  # part of the slice is still to map: its rows from max(b0, done) on
            lo = max(b0, done)
            begin, end = lo - done, b1 - done
            views = [out[k][lo - b0 :] for k in _MAP_FIELDS]
        else:
            begin, end, views = 0, 0, self._none_views
        if self._table is None:
            self._table = _C.WindowTable(
                ds._n_windows, ds._file_begin, ds._file_window_end, ds.seq_len
            )
        return self._table.map(domains[done:], self.cursors, ds._caps, ds.seed, begin, end, *views)

    def read(
        self, domains: np.ndarray, out: dict[str, np.ndarray], shared: bool = False
    ) -> torch.Tensor:
        """Copy the planned windows out of the memory maps into a LongTensor [B, seq_len + 1].

        ``shared`` allocates it in shared memory (as the DataLoader's own collate does in workers),
        so handing it to the main process sends a handle instead of copying 0.5 MB per batch.
        """
        corpus, length = self.ds.corpus, self.ds.seq_len + 1
        ids = _empty_long((len(domains), length), shared)
        rows = ids.numpy()
        files, offsets = out["file"].tolist(), out["offset"].tolist()
        for j, (f, off) in enumerate(zip(files, offsets, strict=True)):
            rows[j] = corpus._map(f)[off : off + length]  # (indices from WindowTable.map: valid)
        # Signed .npy files can hold negative ids (a -1 pad), which would reach the embedding as
        # an index error or, on a GPU, a device-side assert (~7 us per batch of 32 x 2049 here;
        # corpora of unsigned files skip it).
        if corpus._any_signed and rows.size and rows.min() < 0:
            j = int(np.flatnonzero(rows.min(axis=1) < 0)[0])
            raise CorpusError(
                f"file {str(corpus.file_path(files[j]))!r} holds a negative token id "
                f"({int(rows[j].min())}) in tokens [{offsets[j]}, {offsets[j] + length}): "
                "token ids must be >= 0"
            )
        return ids


def _check_batch_fits(batch: int, seq_len: int, global_batch: int) -> None:
    """ValueError naming batch_size (or world_size) when a step's buffers cannot be allocated
    here: numpy's MemoryError at the first step, from a DataLoader worker, named neither."""
    if not allocatable((batch, seq_len + 1), np.int64):  # the batch's tokens
        raise ValueError(
            f"batch_size={batch:,}: a batch of {batch:,} x (seq_len + 1 = {seq_len + 1:,}) tokens "
            f"is {batch * (seq_len + 1) * 8 / 2**30:,.1f} GiB, more than can be allocated here"
        )
    if not allocatable(global_batch, np.int32):  # the step's draws, for every rank
        raise ValueError(
            f"batch_size x world_size = {global_batch:,} draws per step "
            f"({global_batch * 4 / 2**30:,.1f} GiB), more than can be allocated here"
        )


def _empty_long(shape: tuple[int, int], shared: bool) -> torch.Tensor:
    if not shared:
        return torch.empty(shape, dtype=torch.int64)
    try:  # what torch's default_collate does in workers: allocate straight into shared memory
        elem = torch.empty(0, dtype=torch.int64)
        storage = elem._typed_storage()._new_shared(shape[0] * shape[1], device=elem.device)
        return elem.new(storage).resize_(shape)
    except (AttributeError, RuntimeError):  # private API moved: share after allocating
        return torch.empty(shape, dtype=torch.int64).share_memory_()


class _MixtureIterator:
    """One process's iterator: every ``stride``-th of the rank's steps from ``next_step`` on.

    It holds progress slot ``slot`` (the worker's, or the in-process one) until it ends; a newer
    iterator on the same slot supersedes it.
    """

    def __init__(self, ds: MixtureDataset, worker_id: int, num_workers: int, slot: int):
        if not 0 <= worker_id < num_workers <= _WORKER_SLOTS:
            raise ValueError(
                f"worker {worker_id} of {num_workers}: MixtureDataset supports up to "
                f"{_WORKER_SLOTS} DataLoader workers per rank"
            )
        # A copy older than the main process's last load_state_dict: raised by __next__, where a
        # DataLoader worker hands the error to the main process (from here it would only die).
        self.stale = ds._generation != ds._control.generation
        if self.stale:
            return
        state = ds._resume
        self.ds = ds
        self.generation = ds._generation
        self.stream = _Stream(ds, state)
        self.stream.generation = self.generation
        self.worker_id, self.stride = worker_id, num_workers
        # A state saved by a single iterator (in-process, or one worker) has produced every step
        # before its position, so any number of workers can take over from there.
        single = state is not None and state.get("stride") == 1 and (
            state.get("next_step") == state["step"]
        )
        if state is not None and state.get("next_step") is not None and not single:
            if (state["worker"], state["stride"]) != (worker_id, num_workers):
                raise ValueError(
                    f"state was saved by DataLoader worker {state['worker']} of {state['stride']}; "
                    f"it cannot resume worker {worker_id} of {num_workers} (load the whole "
                    "loader's state with StatefulDataLoader and as many workers, or save "
                    "ds.state_dict(step=steps_consumed), which resumes with any number)"
                )
            self.next_step = int(state["next_step"])
        else:
            self.next_step = self.stream.step + worker_id
        self.slot = slot
        try:
            self.token = ds._control.register(slot, num_workers, self.next_step, self.generation)
        except _StaleIterator:
            raise RuntimeError(
                "the MixtureDataset loaded another state while this iterator was being made"
            ) from None
        # next() and state_dict() from different threads (a prefetching thread, a checkpoint
        # thread): a state must not mix two steps.
        self.lock = threading.Lock()
        self.producing: int | None = None  # the thread inside next()
        self.seen = ds._control.count()
        # The event id last collected from each slot of the ring (merged into the stream).
        self.taken = np.full(_EVENT_CAPACITY, -1, np.int64)
        ds._active = self
        self.in_worker = torch.utils.data.get_worker_info() is not None

    def __iter__(self) -> _MixtureIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.stale:
            raise RuntimeError(
                "this copy of the MixtureDataset predates a load_state_dict in the main process "
                "(DataLoader workers with persistent_workers=True keep the dataset they started "
                "with): make a new DataLoader after loading a state"
            )
        with self.lock:
            self.producing = threading.get_ident()
            try:
                return self._next()
            except StopIteration:
                self.ds._control.release(self.slot, self.token)  # (no-op once superseded)
                raise
            finally:
                self.producing = None

    def _next(self) -> dict[str, Any]:
        stream, ds = self.stream, self.ds
        if stream.finished:
            raise StopIteration
        try:
            changes, self.seen = ds._control.collect(
                self.slot,
                self.token,
                stream.step,
                self.next_step,
                self.generation,
                self.seen,
                self.taken,
            )
        except _MissedChanges:
            raise RuntimeError(
                f"more than {_EVENT_CAPACITY} weight changes were made while this iterator was "
                "idle (the ring keeps that many): start a new iteration"
            ) from None
        except _StaleIterator:  # load_state_dict since: this run was abandoned, it ends here
            raise StopIteration from None
        except _SupersededIterator:
            where = "in this process" if self.slot == _IN_PROCESS_SLOT else "as this worker"
            raise RuntimeError(
                f"a newer iterator over this MixtureDataset has started {where} (iter(ds) again, "
                "e.g. next(iter(ds)) to look at a batch, or a second DataLoader); only the newest "
                "runs, so that next_step, set_weights and state_dict() follow one stream.  For a "
                "second, independent stream iterate copy.deepcopy(ds)"
            ) from None
        for made, step, weights in changes:
            stream.merge(made, step, weights)
        try:
            while stream.step < self.next_step:
                stream.plan(produce=False)
                if stream.finished:
                    raise StopIteration
            planned = stream.plan(produce=True)
        except RuntimeError:
            # on_exhausted="error": the stream is back at the start of the step it failed in,
            # which is not produced, so a change may still reach it (ds.next_step said the step
            # after it and step= refused it: a retry failed there again whatever was changed).
            ds._control.unclaim(self.slot, self.token, self.next_step - self.stride)
            raise
        if planned is None:
            raise StopIteration
        self.next_step += self.stride
        domains, out = planned
        ids = stream.read(domains, out, shared=self.in_worker)
        if ds.batch_size is None:
            return {"input_ids": ids[0], "domain": int(domains[0])}
        return {"input_ids": ids, "domain": torch.from_numpy(domains.astype(np.int64))}

    def state_dict(self) -> dict[str, Any]:
        if self.producing == threading.get_ident():
            # A signal handler that interrupted next() in this thread: the stream is half-way
            # through a step (and waiting for the lock would never end).
            raise RuntimeError(
                "MixtureDataset.state_dict() was called while this thread is inside next() (from "
                "a signal handler?): set a flag there and take the state after next() returns"
            )
        with self.lock:
            return self._state_dict()

    def _state_dict(self) -> dict[str, Any]:
        state = self.stream.state()
        # Changes already in shared memory that this iterator has not collected yet.
        pending = {s: w for s, w in state["pending"]}
        for step, weights in self.ds._control.dump(self.stream.step):
            pending[step] = weights
        state["pending"] = [[s, pending[s]] for s in sorted(pending)]
        state.update(next_step=self.next_step, worker=self.worker_id, stride=self.stride)
        # The floor a loaded state left (how far the workers that saved it had run): without it
        # a dataset loading a worker's own state placed a change without step= before it, not
        # where the run that saved the state would (the main process's state writes its own
        # next_step over this).
        state["floor"] = self.ds._floor
        return state


class WeightSchedule(Sequence[tuple[int, list[float]]]):
    """``MixtureDataset.weight_schedule``: the weight changes applied, ``(step, weights)`` pairs
    (``weights`` a list of floats) in the order they were made; it compares equal to the list of
    those pairs.  Held as one float64 row per change: a list of Python floats took 32 bytes per
    domain and change (0.8 GB after 100,000 changes at K = 256), and full garbage collections
    walked every one of those lists.
    """

    def __init__(self, num_domains: int):
        self._k = num_domains
        # (steps, rows, n) replaced as a whole: a reader holding the previous tuple never sees
        # a half-made entry (rows are written beyond its n, or into a new array).
        self._data: tuple[list[int], np.ndarray, int] = ([], np.empty((0, num_domains)), 0)

    def __len__(self) -> int:
        return self._data[2]

    def __getitem__(self, index: Any) -> Any:
        steps, rows, n = self._data
        if isinstance(index, slice):
            return [(steps[i], rows[i].tolist()) for i in range(*index.indices(n))]
        i = range(n)[index]  # (IndexError and TypeError as a list gives them)
        return steps[i], rows[i].tolist()

    def __iter__(self) -> Iterator[tuple[int, list[float]]]:
        # The entries there were when it started (a change recorded meanwhile, by the thread
        # that waits for a CUDA copy, may be inserted before the position it has reached).
        steps, rows, n = self._data
        for i in range(n):
            yield steps[i], rows[i].tolist()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (WeightSchedule, list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  (mutable, like the list it stands for)

    def __repr__(self) -> str:
        return repr(list(self))

    def __getstate__(self) -> dict[str, Any]:
        steps, rows, n = self._data  # (not the rows reserved for growth: unset memory)
        return {"_k": self._k, "_data": (steps[:n], rows[:n].copy(), n)}

    def _insert(self, i: int, step: int, weights: np.ndarray) -> None:
        steps, rows, n = self._data
        if i == n and n < len(rows):
            rows[n] = weights
            steps.append(step)
            self._data = (steps, rows, n + 1)
            return
        grown = np.empty((max(16, 2 * len(rows)) if n == len(rows) else len(rows), self._k))
        grown[:i], grown[i], grown[i + 1 : n + 1] = rows[:i], weights, rows[i:n]
        self._data = ([*steps[:i], step, *steps[i:n]], grown, n + 1)

    def _entry(self, i: int) -> tuple[int, np.ndarray]:
        """Entry ``i`` with its weights as a float64 array of its own."""
        steps, rows, _ = self._data
        return steps[i], rows[i].copy()

    def _entries(self) -> Iterator[tuple[int, np.ndarray]]:
        steps, rows, n = self._data
        for i in range(n):
            yield steps[i], rows[i].copy()

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps int64 [n], weights float64 [n, K])."""
        steps, rows, n = self._data
        return np.array(steps[:n], np.int64), rows[:n].copy()


# ----------------------------------------------------------------------------------------------
# MixtureDataset
# ----------------------------------------------------------------------------------------------


class MixtureDataset(IterableDataset):
    """A stream of token windows drawn from the corpus's domains under mixture weights.

    Args:
        corpus: the ``TokenCorpus`` to read.
        seq_len: tokens per training sequence; each sample holds ``seq_len + 1`` tokens.
        weights: mixture weights: a ``weights.json`` path, a ``{name: w}`` dict (names left out get
            0), a sequence, an array or a tensor, in the corpus's domain order.
        seed: seeds the domain draws and every domain's per-epoch window permutation.
        method: the sampler, ``"alias"`` (i.i.d. draws), ``"stratified"`` or ``"greedy"`` (low
            discrepancy: the realised counts track the weights closely).
        block: the stratified sampler's block length (passed to ``MixtureSampler``).
        batch_size: yield ready batches ``{"input_ids": LongTensor[B, seq_len + 1], "domain":
            LongTensor[B]}`` of this per-rank size (use ``DataLoader(ds, batch_size=None)``); when
            ``None`` yield single samples ``{"input_ids": LongTensor[seq_len + 1], "domain": int}``.
            Batch here rather than in the DataLoader: with workers, a DataLoader batching single
            samples fills each batch from one worker's samples (every ``num_workers``-th), so
            its batches would depend on the number of workers.
        rank, world_size: this process's slice of every global batch; default from
            ``torch.distributed`` when it is initialised, else 0 and 1.
        max_epochs: the most passes over any one domain (``None``: unlimited with "reshuffle", one
            pass with "stop" and "error").
        on_exhausted: when a domain has read all its allowed epochs: ``"reshuffle"`` drops it and
            renormalises the other domains (it is reported in ``exhausted`` and by a warning; the
            stream ends when no domain with weight is left); ``"stop"`` ends the stream; ``"error"``
            raises ``RuntimeError``.  Without ``max_epochs``, "reshuffle" starts the domain's next
            epoch (a new permutation of its windows) forever.

    The last incomplete global step is dropped when the stream ends, so every rank sees the same
    number of steps.  See the module docstring for the global order, live weights and their lag.

    Checkpointing: ``state_dict()`` / ``load_state_dict()`` follow torchdata's ``Stateful``, so a
    ``StatefulDataLoader`` saves each worker's position and resumes it bit-identically.  Changes
    made with ``set_weights`` after a worker's last snapshot live in the main process: save
    ``dataset.state_dict()`` alongside ``loader.state_dict()`` and load it (before the loader's)
    when resuming, or they are lost.  That state also holds ``next_step`` as it was (how far the
    workers had run), the earliest step a change made after resuming can reach.  With a plain
    ``DataLoader`` save ``state_dict(step=steps_consumed)``: the main process replays the draws
    up to there, and the state resumes with any number of workers.
    """

    def __init__(
        self,
        corpus: TokenCorpus,
        seq_len: int,
        weights: Any,
        *,
        seed: int = 0,
        method: str = "alias",
        block: int | None = None,
        batch_size: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        max_epochs: int | None = None,
        on_exhausted: str = "reshuffle",
    ) -> None:
        super().__init__()
        if not isinstance(corpus, TokenCorpus):
            raise TypeError(f"corpus must be a TokenCorpus, got {type(corpus).__name__}")
        self.corpus = corpus
        self.seq_len = integer(seq_len, "seq_len", 1)
        # A seed that is no int is a TypeError, as for MixtureSampler (it was a ValueError).
        self.seed = integer(seed, "seed", 0, 2**64 - 1)
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        self.method = method
        self.block = block
        self.batch_size = None if batch_size is None else integer(batch_size, "batch_size", 1)
        if on_exhausted not in _POLICIES:
            raise ValueError(f"on_exhausted must be one of {_POLICIES}, got {on_exhausted!r}")
        self.on_exhausted = on_exhausted
        self.max_epochs = None if max_epochs is None else integer(max_epochs, "max_epochs", 1)
        self.rank, self.world_size = _rank_and_world(rank, world_size)

        self._n_windows, self._file_begin, self._file_window_end = corpus.window_table(self.seq_len)
        # Epochs a domain may read: unlimited only for "reshuffle" without max_epochs.
        if self.max_epochs is not None:
            allowed: int | None = self.max_epochs
        else:
            allowed = None if on_exhausted == "reshuffle" else 1
        self._capped = allowed is not None
        big = int(np.iinfo(np.int64).max)
        # In Python ints: windows * max_epochs can pass int64 (a cap that large never binds).
        self._caps = np.array(
            [big if allowed is None else min(int(n) * allowed, big) for n in self._n_windows],
            dtype=np.int64,
        )
        per_rank = self.batch_size or 1
        self._global_batch = per_rank * self.world_size
        self._slice = (self.rank * per_rank, (self.rank + 1) * per_rank)
        _check_batch_fits(per_rank, self.seq_len, self._global_batch)

        self._initial_weights = self._check(weights)
        self._weights = self._initial_weights.copy()
        from fastmix.sampler import MixtureSampler

        # Built once here so a bad block/method fails now, not later inside a DataLoader worker.
        MixtureSampler(self._initial_weights, seed=self.seed, method=method, block=block)
        self._control = _Control(corpus.num_domains)
        self._generation = self._control.generation  # see _Control.clear
        self._resume: dict[str, Any] | None = None
        # state_dict(step=)'s replay: [the resume point it started from, its stream, how many
        # of the changes recorded (_recorded) are merged into it]
        self._replay: list[Any] | None = None
        self._floor = 0
        # The earliest step a change with step= may name (apart from the steps started): the
        # floor, except after loading a state that resumes with any number of workers.
        self._least = 0
        self._active: _MixtureIterator | None = None
        self.weight_schedule = WeightSchedule(corpus.num_domains)
        self._made = 0  # set_weights calls so far: the order changes were made in
        self._schedule_made: list[int] = []  # weight_schedule's entries' numbers, ascending
        # ... in the order they were recorded (a CUDA change lands after changes made later):
        # what a state_dict(step=) replay has merged is a prefix of it
        self._recorded: list[int] = []
        self._weights_made = -1
        self._registrations_at_load = -1
        self._async: queue.Queue | None = None
        self._async_thread: threading.Thread | None = None
        self._async_error: BaseException | None = None
        # _record runs in the calling thread (set_weights) and in the thread that waits for
        # CUDA copies: unguarded, two changes at once lost one or raised IndexError.
        self._record_lock = threading.Lock()

    # -- weights ---------------------------------------------------------------------------------

    def _check(self, weights: Any) -> np.ndarray:
        w = _read_weights(weights, self.corpus.names)
        empty = np.flatnonzero((w > 0) & (self._n_windows == 0))
        if empty.size:
            name = self.corpus.names[int(empty[0])]
            raise ValueError(
                f"domain {name!r} has weight {w[empty[0]]:g} but no window of seq_len + 1 = "
                f"{self.seq_len + 1} tokens: its files ({self.corpus.domain_files(name)}) hold "
                f"{self.corpus.tokens[name]:,} tokens and a window never crosses a file boundary"
            )
        return w

    @property
    def names(self) -> list[str]:
        """The corpus's domain names, in weight order."""
        return list(self.corpus.names)

    @property
    def weights(self) -> np.ndarray:
        """The weights most recently set, as given: not normalised (``[2, 2]`` stays so), nor
        renormalised for exhausted domains."""
        return self._weights.copy()

    @property
    def next_step(self) -> int:
        """The earliest global step a weight change made now can reach on this rank (where one
        without ``step=`` applies from; after loading a ``state_dict(step=)`` state, a change
        with ``step=`` may also name any step from that state's on that no iterator of this run
        has started: the saving run's workers' lead binds only changes without ``step=``).

        Iterating in-process (no DataLoader workers) it is the number of steps consumed, so
        ``set_weights(w, step=ds.next_step)`` makes the stream independent of timing - also for a
        CUDA tensor, whose step is then fixed at once (the iterator waits for the copy there).
        """
        return self._control.earliest_step(self._floor)

    def set_weights(self, weights: Any, *, step: int | None = None) -> int | None:
        """Change the mixture weights from a global step on; returns that step.

        Without ``step`` the change applies from the first global step no DataLoader worker (or
        in-process iterator) of this rank has started (single rank only: other ranks' workers
        would pick another step).  With ``step`` it applies exactly there (use the same value on
        every rank): ``steps_consumed + prefetch_factor * num_workers`` is always safe; a step
        some worker has already started is a ValueError naming the earliest possible one.

        A CUDA tensor is never synchronised: its copy to pinned memory is enqueued with an event and
        the weights are published once the copy has completed; the return value is then ``None``
        and ``weight_schedule`` records the step when it is known (``flush_weights()`` waits).
        Changes land in the order they were made: one made while a CUDA change is still in flight
        queues behind it (and also returns ``None``).
        """
        self._raise_async_error()
        if step is None and self.world_size > 1:
            # Each rank's workers run ahead by a different amount, so "the first step not started"
            # differs between ranks and their streams would diverge (duplicates and gaps).
            raise ValueError(
                f"set_weights: with world_size={self.world_size} pass step= (the same on every "
                "rank), e.g. step = steps_consumed + prefetch_factor * num_workers"
            )
        if step is not None:
            step = integer(step, "step", 0)  # 1.5 or "3": TypeError (it was a ValueError)
            if step >= 2**62:
                raise ValueError(f"step must be < 2**62, got {step}")
        if isinstance(weights, torch.Tensor) and weights.device.type == "cuda":
            if weights.dtype == torch.bool or weights.is_complex():
                raise TypeError(f"weights must be real numbers, got a {weights.dtype} tensor")
            if weights.shape != (self.corpus.num_domains,):
                raise ValueError(
                    f"weights must have shape ({self.corpus.num_domains},), "
                    f"got {tuple(weights.shape)}"
                )
            host = torch.empty(weights.shape, dtype=torch.float64, pin_memory=True)
            host.copy_(weights.detach(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._submit_async(host, event, step, self._next_made())
            return None
        w = self._check(weights)
        made = self._next_made()
        if step is None and self._async is not None and self._async.unfinished_tasks:
            # Behind CUDA changes still in flight: published now, at the first step not started,
            # an older CUDA change would land at a later step and win.
            self._submit_async(torch.from_numpy(w), None, None, made)
            return None
        _, eff = self._control.publish(w, step, self._floor, made, least=self._least)
        self._record(eff, w, made)
        return eff

    def _next_made(self) -> int:
        self._made += 1
        return self._made - 1

    def _record(self, step: int, w: np.ndarray, made: int) -> None:
        """Add change ``made`` to weight_schedule, which lists the changes in the order they were
        made (replaying it with set_weights(w, step=s) gives the same stream)."""
        with self._record_lock:
            i = bisect.bisect(self._schedule_made, made)
            self._schedule_made.insert(i, made)
            self.weight_schedule._insert(i, step, w)
            self._recorded.append(made)  # (last: a change listed here is in weight_schedule)
            if made > self._weights_made:
                self._weights, self._weights_made = w, made

    def _submit_async(
        self, host: torch.Tensor, event: Any, step: int | None, made: int | None = None
    ) -> None:
        """Publish ``host`` once ``event.synchronize()`` returns, on a helper thread."""
        made = self._next_made() if made is None else made
        placeholder = None
        if step is not None:  # reserve the step now so no worker runs past it while the copy lands
            placeholder, _ = self._control.publish(
                None, step, self._floor, made, flag=_PENDING, least=self._least
            )
        if self._async is None:
            self._async = queue.Queue()
            self._async_thread = threading.Thread(
                target=self._async_loop, name="fastmix-weights", daemon=True
            )
            self._async_thread.start()
        self._async.put((host, event, placeholder, step, made))

    def _async_loop(self) -> None:
        assert self._async is not None
        while True:
            host, event, placeholder, step, made = self._async.get()
            try:
                if event is not None:  # (None: a host change queued behind CUDA ones)
                    event.synchronize()  # blocks this helper thread only
                w = self._check(host.numpy().copy())
                if placeholder is not None:
                    self._control.fill(placeholder, w)
                    eff = step
                else:
                    _, eff = self._control.publish(w, None, self._floor, made)
                self._record(eff, w, made)
            except BaseException as e:  # surfaced by the next set_weights / flush_weights
                if placeholder is not None:
                    self._control.fill(placeholder, None)
                self._async_error = e
            finally:
                self._async.task_done()

    def flush_weights(self) -> None:
        """Wait until every CUDA weight change has been published (raises its error, if any)."""
        if self._async is not None:
            self._async.join()
        self._raise_async_error()

    def _raise_async_error(self) -> None:
        if self._async_error is not None:
            error, self._async_error = self._async_error, None
            raise ValueError(f"set_weights (CUDA tensor): {error}") from error

    def check_ranks(self, process_group: Any = None) -> None:
        """Raise ValueError on every rank unless all ranks build the same global stream.

        Compares, across the ranks of ``process_group`` (default: the world group): the seed,
        sampler (method, block), seq_len, per-rank batch size, world_size (which must be the
        group's size), epoch cap and policy, the domains and their window tables (each file's
        length), the initial and current weights, the weight changes made with ``set_weights``
        and the loaded resume point; and checks that every rank index is taken exactly once.
        The error names what differs.  Ranks built differently do not fail on their own: each
        reads a slice of a different stream, so samples repeat or go missing without a sign.

        A collective that synchronises with the host: call it on every rank, once, after building
        the dataset (and after ``load_state_dict``).  Without torch.distributed initialised it
        returns at world_size 1 (nothing to compare) and raises ValueError at any other.
        """
        from fastmix import distributed

        group = distributed.resolve_group(process_group)
        if group is None:
            if self.world_size == 1:
                return
            raise ValueError(
                f"check_ranks: world_size={self.world_size} but torch.distributed is not "
                "initialised, so there are no other ranks to compare with"
            )
        resume = None
        if self._resume is not None:
            resume = {key: self._resume.get(key) for key in _STREAM_KEYS}
        fields = {
            "seed": self.seed,
            "method": self.method,
            "block": self.block,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "max_epochs": self.max_epochs,
            "on_exhausted": self.on_exhausted,
            "domains": list(self.corpus.names),
            # file lengths (as windows) and token dtypes; not paths, which may differ by host
            "corpus files": ([str(dt) for dt in self.corpus._flat_dtypes], self._n_windows,
                             self._file_begin, self._file_window_end),
            "initial weights": self._initial_weights,
            "weights": self._weights,
            # as two arrays, digested as bytes (item by item, each float's repr: ~37 us per
            # change at K = 22, 0.4 s for a run that changed them at each of 10,000 steps)
            "set_weights changes": self.weight_schedule._arrays(),
            "resume point": resume,
        }  # fmt: skip
        distributed.check_ranks_agree(
            "MixtureDataset", fields, group, rank=self.rank, num_ranks=self.world_size
        )

    @property
    def exhausted(self) -> list[str]:
        """Domains dropped (or that ended the stream) at their epoch cap, in the order it happened.

        Read from shared memory, so it reports what any DataLoader worker has seen.
        """
        return list(self.exhausted_at)

    @property
    def exhausted_at(self) -> dict[str, int]:
        """Exhausted domain -> the global sample index at which it was exhausted."""
        marks = self._control.v["exhausted"]
        order = np.argsort(marks, kind="stable")
        return {self.corpus.names[d]: int(marks[d]) for d in order if marks[d] >= 0}

    # -- iteration -------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return _MixtureIterator(self, 0, 1, _IN_PROCESS_SLOT)
        return _MixtureIterator(self, info.id, info.num_workers, info.id)

    def _iter_worker(self, worker_id: int, num_workers: int) -> _MixtureIterator:
        """The iterator DataLoader worker ``worker_id`` of ``num_workers`` would run (for tests)."""
        return _MixtureIterator(self, worker_id, num_workers, worker_id)

    # -- checkpoints -----------------------------------------------------------------------------

    def _header(self) -> dict[str, Any]:
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "seed": self.seed,
            "method": self.method,
            "seq_len": self.seq_len,
            "global_batch": self._global_batch,
            "domains": list(self.corpus.names),
            # Each domain's windows of seq_len + 1 tokens: a corpus prepared again with more or
            # fewer tokens maps every cursor to other windows, which a resumed run read silently.
            "windows": self._n_windows.tolist(),
        }

    def state_dict(self, step: int | None = None) -> dict[str, Any]:
        """Where the stream is: the live iterator's position in this process, else the resume point.

        Holds O(K) numbers (cursors, weights, the sampler's state) and the pending weight changes:
        nothing per sample.  In the main process it first waits for CUDA weight copies still in
        flight (``flush_weights()``), so a change made just before the checkpoint is in it.

        ``step``: the global steps of this rank the training loop has consumed (counted from 0,
        not from the resume point).  With DataLoader workers the main process does not know
        their position, so without ``step`` (and without StatefulDataLoader's own state) a
        resumed run would start again from the resume point; with it the stream is replayed
        here, draws only, up to that step, and the state resumes with any number of workers.
        A step with more than 1024 weight changes still to come (what a resumed run holds) is
        a ValueError naming the earliest step that has few enough.
        """
        in_worker = torch.utils.data.get_worker_info() is not None
        if not in_worker:
            self.flush_weights()
        state = self._header()
        if step is not None:
            if in_worker:
                raise ValueError("state_dict(step=) is for the main process, not a worker")
            state.update(self._state_at(integer(step, "step", 0)))
        elif self._active is not None:
            state.update(self._active.state_dict())
        else:
            state.update(_Stream(self, self._resume).state())
            state.update(next_step=None, worker=None, stride=None)
            if self._resume is not None and self._resume.get("next_step") is not None:
                state.update({k: self._resume[k] for k in ("next_step", "worker", "stride")})
            # (a worker's state keeps the floor it loaded, as its iterator's does; the main
            # process writes its own below)
            state["floor"] = self._floor
        # Changes still to come; a worker's own state needs only its "pending" ones.  Those before
        # the state's step are history load_state_dict skips (a ring of up to 1024 weight
        # vectors: 93 MB and 8.7 s at K = 10,000 when the weights change every step).
        state["events"] = (
            []
            if in_worker
            # (from _least, not the floor: after a state_dict(step=) state, a change with step=
            # may lie below the floor, and was lost on the next resume)
            else [[s, w] for s, w in self._control.dump(max(self._least, int(state["step"])))]
        )
        if not in_worker:
            # The earliest step a change can reach now: with DataLoader workers they, not this
            # process, hold the position, so a resumed run must not place a change before it.
            state["floor"] = self.next_step
            # ``ds.weights``: with DataLoader workers the stream's own weights above are those at
            # the resume point, not the latest change.
            state["weights"] = self._weights.tolist()
        if step is None:
            state["exhausted"] = self.exhausted_at
        else:  # not the marks of workers that have prefetched past the step
            end = (state["step"] + state["finished"]) * self._global_batch
            state["exhausted"] = {k: v for k, v in self.exhausted_at.items() if v < end}
        return state

    def _state_at(self, step: int) -> dict[str, Any]:
        """The stream's state after ``step`` global steps: replayed from the resume point with
        every change made since (``weight_schedule`` holds them all; the shared ring only the
        last 1024)."""
        start = 0 if self._resume is None else int(self._resume["step"])
        # The furthest step started: the DataLoader's workers are gone once its pass has ended
        # (a last checkpoint after the loop), so the live ones alone do not tell.
        end = max(self.next_step, self._control.claimed_end())
        if not start <= step <= end:
            raise ValueError(
                f"state_dict: step must be between the resume point {start} and the "
                f"furthest step started {end} (the steps consumed), got {step}"
            )
        # The replay goes on from the previous call's (~6 us per step at batch 32, K = 22: a replay
        # of a whole long run at every checkpoint would grow with the run), unless the resume point
        # changed, an earlier step is asked for, or a change came for a step it has passed (a
        # new pass over the dataset starts again from the resume point).  It takes only the
        # changes recorded since the previous call: going through every change of the run at
        # each call, a call every 100 steps took 10-12 ms after 20,000 steps with a change at
        # each (1.5-2.0 ms now), and more the longer the run.
        # (under the lock: a change the CUDA thread records meanwhile is in all or none)
        with self._record_lock:
            recorded = len(self._recorded)
            replay = self._replay
            if replay is not None and (replay[0] is not self._resume or replay[1].step > step):
                replay = None
            if replay is not None:
                changes = [
                    (made, self._scheduled(made)) for made in self._recorded[replay[2] : recorded]
                ]
                # A replay that ended drew its last step (the one it ended in) too: a change
                # there would have been applied before the draw (it went on as ended).
                reached = replay[1].step + replay[1].finished
                if any(s < reached for _, (s, _) in changes):
                    replay = None
            if replay is None:
                stream = _Stream(self, self._resume)
                # It marks the domains it drops (the sample numbers an iterator producing those
                # steps marks): right after a load, no iterator of this run may have produced them.
                stream.generation = self._generation
                stream.warn = False  # the iterators have warned of the domains dropped
                replay = self._replay = [self._resume, stream, 0]
                entries = self.weight_schedule._entries()
                changes = list(zip(self._schedule_made, entries, strict=True))
        stream = replay[1]
        for made, (s, w) in changes:
            stream.merge(made, s, np.asarray(w, np.float64))
        replay[2] = recorded
        while stream.step < step and not stream.finished:
            stream.plan(produce=False)
        state = stream.state()
        # A resumed run holds the changes still to come in the ring (load_state_dict refuses a
        # state listing more): a step far behind a run that changed the weights at every step
        # gave a state its own load_state_dict called damaged.
        if len(state["pending"]) > _EVENT_CAPACITY:
            later = state["pending"][-_EVENT_CAPACITY][0]
            raise ValueError(
                f"state_dict: step={step} leaves {len(state['pending'])} weight changes still to "
                f"come, more than the {_EVENT_CAPACITY} a resumed run can hold; a state at step "
                f"{later} or later holds few enough"
            )
        # Produced by one iterator up to here: any number of workers can take over.
        return {**state, "next_step": stream.step, "worker": 0, "stride": 1}

    def _scheduled(self, made: int) -> tuple[int, np.ndarray]:
        """The entry of ``weight_schedule`` for change number ``made``."""
        return self.weight_schedule._entry(bisect.bisect_left(self._schedule_made, made))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``: the next iteration continues exactly where it was.

        Also on a dataset that has already run (rolling back to an earlier checkpoint): the
        changes, exhaustion marks and ``weight_schedule`` of the abandoned run are dropped, and
        the stream is the one a fresh process loading ``state`` would produce.  Afterwards
        ``weight_schedule`` lists the restored changes still to come.  A state saved with
        another seed, method, seq_len, global batch, list of domains or count of windows in a
        domain (a corpus prepared again) is a ValueError naming what differs.
        """
        if not isinstance(state, Mapping):  # (as the sampler and the mixers say it)
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        if not _same(state.get("format"), _STATE_FORMAT):
            raise ValueError("state is not a MixtureDataset state_dict")
        header = self._header()
        state_version(state.get("version"), _STATE_VERSION)
        for key in ("seed", "method", "seq_len", "global_batch", "domains"):
            if not _same(state.get(key), header[key]):
                raise ValueError(
                    f"state was saved with {key}={state.get(key)!r}, this dataset has "
                    f"{key}={header[key]!r}"
                )
        _check_windows(state.get("windows"), header["windows"], self.corpus.names)
        _check_state_body(state, self)
        state = dict(state)
        in_worker = torch.utils.data.get_worker_info() is not None
        if not in_worker:
            if (
                self._resume is not None
                and self._control.registrations() == self._registrations_at_load
                and all(
                    _plain(self._resume.get(k)) == _plain(state.get(k)) for k in _POSITION_KEYS
                )
            ):
                # The position already loaded, and nothing has run since: StatefulDataLoader
                # with num_workers=0 loads the dataset's state itself, inside iter(loader),
                # after the user's own load; changes made in between must stay.
                self._resume = state
                self._active = None
                return
            # The main process owns the shared ring.  CUDA copies of the abandoned run finish
            # first (their errors belong to it), then everything it left is cleared, and its
            # iterators and worker copies (an older generation) stop touching it.
            if self._async is not None:
                self._async.join()
            self._async_error = None
            self._generation = self._control.clear()
            self.weight_schedule = WeightSchedule(self.corpus.num_domains)
            self._schedule_made, self._weights_made = [], -1
            self._recorded = []
        self._resume = state
        self._active = None
        self._weights = np.array(state["user_weights"], np.float64)
        # (a dict: names.index per domain made loading quadratic in K when many domains are
        # exhausted, 1.3-1.6 s at K = 10,000 with all of them)
        index = {name: d for d, name in enumerate(self.corpus.names)}
        for name, sample in dict(state.get("exhausted", {})).items():
            self._control.mark_exhausted(index[name], int(sample))
        if not in_worker:
            # Restore the changes still to come.
            self._floor = int(state["step"])
            changes = dict((int(s), w) for s, w in state.get("pending", []))
            changes.update((int(s), w) for s, w in state.get("events", []) if s >= self._floor)
            for s in sorted(changes):
                w = np.asarray(changes[s], np.float64)
                made = self._next_made()
                self._control.publish(w, s, self._floor, made)
                self._record(s, w, made)
            if state.get("weights") is not None:
                self._weights = np.array(state["weights"], np.float64)
            self._floor = max(self._floor, int(state.get("floor", self._floor)))
            # A state produced by one iterator up to its step (state_dict(step=), or in-process)
            # resumes with any number of workers, which produce every step from there again:
            # a change with step= need only come after it.  The floor (how far the saving
            # run's workers had prefetched, which differs between ranks) places only changes
            # without step=; it refused `steps_consumed + prefetch_factor * num_workers` after
            # resuming with fewer workers, on some ranks and not others.
            single = state.get("stride") == 1 and state.get("next_step") == state["step"]
            self._least = int(state["step"]) if single else self._floor
            self._registrations_at_load = self._control.registrations()

    def __getstate__(self) -> dict[str, Any]:
        from multiprocessing import context

        state = self.__dict__.copy()
        state.update(_async=None, _async_thread=None, _active=None, _async_error=None, _replay=None,
                     _record_lock=None)
        if context.get_spawning_popen() is None:
            # A copy (pickle, deepcopy, torch.save), not a DataLoader worker: it continues from
            # where this dataset is, as a dataset loading state_dict() would (it used to restart
            # from the resume point while keeping this one's progress marks).
            state["_copy_of"] = self.state_dict()
        return state

    def __copy__(self) -> MixtureDataset:
        # A shallow copy would share the control block (progress slots, pending changes) and
        # loading its position there would reset the original's: copies are independent.
        import copy

        return copy.deepcopy(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        where = state.pop("_copy_of", None)
        if "_recorded" not in state:  # pickled before it existed (a replay starts afresh)
            state["_recorded"] = list(state.get("_schedule_made", []))
        state["_record_lock"] = threading.Lock()
        if isinstance(state.get("weight_schedule"), list):  # pickled when it was a list
            schedule = WeightSchedule(state["corpus"].num_domains)
            for i, (step, w) in enumerate(state["weight_schedule"]):
                schedule._insert(i, step, np.asarray(w, np.float64))
            state["weight_schedule"] = schedule
        self.__dict__.update(state)
        if where is not None:
            self.load_state_dict(where)

    def __repr__(self) -> str:
        return (
            f"MixtureDataset({self.corpus.num_domains} domains, seq_len={self.seq_len}, "
            f"batch_size={self.batch_size}, rank={self.rank}/{self.world_size}, "
            f"method={self.method!r}, seed={self.seed})"
        )


def _same(value: Any, expected: Any) -> bool:
    """``value == expected`` for a state's header field, False where that is no truth value: a
    tensor or an array compares to an array, whose truth is "ambiguous" (or fails to broadcast),
    which failed the load naming no key."""
    try:
        return bool(value == expected)
    except (ValueError, RuntimeError, TypeError):
        return False


def _plain(value: Any) -> Any:
    """A state's value with NumPy arrays and scalars as lists and Python numbers (nested), so two
    states compare with ``==``: a state holding arrays (which load) failed its second load, by
    StatefulDataLoader after the user's, with NumPy's "truth value ... ambiguous"."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check_windows(saved: Any, now: list[int], names: Sequence[str]) -> None:
    """The corpus a state was saved on held as many windows per domain as this one (a state
    without ``"windows"`` predates the check and is taken as it is)."""
    if saved is None:
        return
    saved = _plain(saved)
    if not isinstance(saved, list) or len(saved) != len(now):
        raise ValueError(f"state['windows'] must list one count per domain, got {saved!r}")
    for name, was, is_ in zip(names, saved, now, strict=True):
        if not _same(was, is_):
            raise ValueError(
                f"state was saved on a corpus whose domain {name!r} held {was!r} windows of "
                f"seq_len + 1 tokens; this corpus's holds {is_}: the corpus has changed since, "
                "and the saved positions would read other windows (to go on anyway, with other "
                "windows than the saved run's, delete the state's 'windows' entry)"
            )


def _check_state_body(state: Mapping[str, Any], ds: MixtureDataset) -> None:
    """Checks the position part of a ``MixtureDataset`` state (the header is checked first):
    every value a resumed stream will use, so that loading it cannot fail half-way."""
    names = ds.corpus.names
    num_domains = len(names)

    damaged = ": not a MixtureDataset state_dict, or damaged"

    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"state[{key!r}] {why}{damaged}")

    def is_int(value: Any, high: int) -> bool:
        return (
            not isinstance(value, (bool, np.bool_))
            and isinstance(value, (int, np.integer))
            and 0 <= value < high
        )

    def count(key: str, high: int = 2**62) -> None:
        if not is_int(state.get(key), high):
            raise bad(key, f"must be an int in [0, {high}), got {state.get(key)!r}")

    def weight_vector(key: str, value: Any) -> None:
        # As load_weights and set_weights take them: real numbers only.  Read as float64 straight
        # away, ["1", "1"] and [True, True] loaded as weights.
        what = f"state[{key!r}]"
        try:
            raw = np.asarray(plain_values(value, what))
        except TypeError as e:
            raise TypeError(f"{e}{damaged}") from None
        except ValueError:  # ragged: reported below
            raw = None
        if raw is not None and raw.dtype == object:  # ints beyond int64: checked one by one
            for i, v in enumerate(raw.reshape(-1)):
                try:
                    real_number(v, f"{what}[{i}]")
                except TypeError as e:
                    raise TypeError(f"{e}{damaged}") from None
                except ValueError:  # too large for float64: reported below
                    pass
        elif raw is not None and raw.dtype.kind not in "iuf" and raw.size:
            kind = {"U": "strings", "S": "bytes", "b": "bools", "c": "complex numbers"}
            raise TypeError(
                f"{what} must hold real numbers, got {kind.get(raw.dtype.kind, raw.dtype)}{damaged}"
            )
        try:
            weights = np.asarray(value, np.float64)
            if weights.shape != (num_domains,):
                raise ValueError(f"shape {weights.shape}, expected ({num_domains},)")
            _check_weight_values(weights, None)
        except (TypeError, ValueError, OverflowError) as e:
            raise bad(key, f"is not a valid weight vector ({e})") from None

    for key in ("step", "cursors", "user_weights", "dropped", "finished", "sampler"):
        if key not in state:
            raise bad(key, "is missing")
    count("step")
    if state.get("floor") is not None:
        count("floor")
    # Where a DataLoader worker's iterator goes on: all None (saved outside an iterator), else the
    # worker's next step, its id and the number of workers (one iterator: 0 and 1).  Unchecked,
    # worker="0" or stride=0 failed only in iter(), as a state "saved by DataLoader worker 0 of
    # 1" that "cannot resume worker 0 of 1".
    if any(state.get(key) is not None for key in ("next_step", "worker", "stride")):
        for key in ("next_step", "worker", "stride"):
            if state.get(key) is None:
                raise bad(key, "must be set with next_step, worker and stride (or all None)")
        count("next_step")
        stride = state["stride"]
        if not is_int(stride, _WORKER_SLOTS + 1) or stride == 0:
            raise bad("stride", f"must be the number of DataLoader workers, an int in [1, "
                                f"{_WORKER_SLOTS}], got {stride!r}")
        stride = int(stride)
        count("worker", stride)
    for key in ("cursors", "user_weights", "dropped"):
        try:
            n = len(state[key])
        except TypeError:
            n = -1
        if n != num_domains:
            raise bad(key, f"must hold one entry per domain ({num_domains})")
    if not all(is_int(c, 2**63) for c in state["cursors"]):
        raise bad("cursors", "must hold ints in [0, 2**63)")
    # Real bools: bool("False") is True, and ended the stream.
    if not all(isinstance(v, (bool, np.bool_)) for v in state["dropped"]):
        raise bad("dropped", "must hold bools")
    if not isinstance(state["finished"], (bool, np.bool_)):
        raise bad("finished", f"must be a bool, got {state['finished']!r}")
    for key in ("user_weights", "weights"):
        if key == "weights" and state.get(key) is None:
            continue  # states saved before it existed, and those of DataLoader workers
        weight_vector(key, state[key])
    for key in ("pending", "events"):
        entries = state.get(key, [])
        if not isinstance(entries, (list, tuple)) or len(entries) > _EVENT_CAPACITY:
            raise bad(key, f"must list at most {_EVENT_CAPACITY} [step, weights] pairs")
        for entry in entries:
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise bad(key, f"must list [step, weights over {num_domains} domains] pairs")
            if not is_int(entry[0], 2**62):
                raise bad(key, f"has a step that is not an int in [0, 2**62): {entry[0]!r}")
            weight_vector(key, entry[1])
    exhausted = state.get("exhausted", {})
    known = set(names)
    if not isinstance(exhausted, Mapping) or any(
        name not in known or not is_int(v, 2**63) for name, v in exhausted.items()
    ):
        raise bad("exhausted", "must map the corpus's domain names to sample indices >= 0")
    # The sampler: the dataset's own rule and seed (another would be another stream), and a
    # state it loads.
    from fastmix.sampler import DEFAULT_BLOCK, MixtureSampler

    sampler = state["sampler"]
    if not isinstance(sampler, Mapping):
        raise bad("sampler", "must be a MixtureSampler state")
    expected = {"method": ds.method, "seed": ds.seed, "block": ds.block or DEFAULT_BLOCK}
    for key, value in expected.items():
        if sampler.get(key) != value:
            raise bad("sampler", f"has {key}={sampler.get(key)!r}, this dataset {value!r}")
    try:
        k = len(sampler.get("weights", ()))
    except TypeError:
        k = -1
    if k != num_domains:
        raise bad("sampler", f"must be a MixtureSampler state over {num_domains} domains")
    try:
        MixtureSampler([1.0]).load_state_dict(sampler)
    except (TypeError, ValueError) as e:
        raise bad("sampler", f"is not a valid sampler state ({e})") from None
    # Where the parts say the stream is must agree: each step draws global_batch samples and maps
    # each to one window (a stream that has ended may stop part-way through a step).  A state
    # edited or pieced together from two went on silently as another stream, or failed later (a
    # cursor at 2**63 - 1 ended in a bare AssertionError).
    if not state["finished"]:
        at = int(state["step"]) * ds._global_batch
        if sampler["position"] != at:
            raise bad("sampler", f"is at position {sampler['position']}, not step * global_batch "
                                 f"= {at}")
        if sum(int(c) for c in state["cursors"]) != at:
            raise bad("cursors", f"must sum to step * global_batch = {at}")
    if state.get("next_step") is not None:
        # An iterator runs the steps from the stream's position up to next_step without producing
        # them, and moves on by stride after each step it produces: next_step is never behind the
        # stream nor a whole stride ahead (else steps were produced twice, or skipped).
        step, stride = int(state["step"]), int(state["stride"])
        if not step <= state["next_step"] < step + stride:
            raise bad(
                "next_step",
                f"must be in [step, step + stride) = [{step}, {step + stride}), got "
                f"{state['next_step']}",
            )


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    world_size = integer(world_size, "world_size", 1)
    rank = integer(rank, "rank")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return rank, world_size
