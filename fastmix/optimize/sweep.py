"""Loading a sweep of small runs: which mixture each run trained on and what it scored.

A sweep is two aligned tables: *mixtures* (runs × domains, each row a weight vector) and
*metrics* (runs × targets).  They arrive as CSV files, pandas-like DataFrames, dicts of columns
or plain arrays.  Rows are matched by an id column when both tables have one (RegMix's
``index``, olmix's ``run``), otherwise by position.  Rows that were rounded before being written
(RegMix's sum to 0.996–1.003) are renormalised and the offsets are reported.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastmix._checks import duplicates, not_a_set, parse_float, real_number

from .search import _rng_seed

# Column names treated as run identifiers, in order of preference.
ID_COLUMNS = ("run", "run_id", "id", "index")
# Columns that are neither weights nor metrics (pandas' unnamed index, free-text run names).
_IGNORED = ("", "Unnamed: 0", "name")
# Cell texts meaning "no value" (NaN metrics: dropped with missing="drop", else an error).
_MISSING = ("", "nan", "na", "null", "none")


@dataclass
class Sweep:
    """Mixtures and metrics of a sweep, aligned row by row.

    Attributes:
        mixtures: ``(runs, domains)`` float64, every row non-negative and summing to 1.
        metrics: ``(runs, targets)`` float64, finite.
        domains: domain names (mixture columns).
        targets: metric names.
        run_ids: one id per row (as strings), or ``None`` when rows were matched by position.
        row_offsets: ``|sum(row) - 1|`` of each mixture row before renormalisation.
    """

    mixtures: np.ndarray
    metrics: np.ndarray
    domains: list[str]
    targets: list[str]
    run_ids: list[str] | None = None
    row_offsets: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def num_runs(self) -> int:
        """Rows of the sweep."""
        return int(self.mixtures.shape[0])

    @property
    def num_domains(self) -> int:
        """Mixture columns of the sweep."""
        return int(self.mixtures.shape[1])

    def target(self, name: str) -> np.ndarray:
        """The column of metric ``name`` (a KeyError lists the known targets)."""
        if name not in self.targets:
            raise KeyError(f"unknown target {name!r}; the sweep has {_preview(self.targets)}")
        return self.metrics[:, self.targets.index(name)]

    def select(self, rows: np.ndarray | Sequence[int]) -> Sweep:
        """A sweep holding only ``rows`` (indices or a boolean mask)."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        ids = None if self.run_ids is None else [self.run_ids[i] for i in rows]
        offsets = self.row_offsets[rows] if len(self.row_offsets) else self.row_offsets
        return Sweep(self.mixtures[rows], self.metrics[rows], list(self.domains),
                     list(self.targets), ids, offsets)

    def split(self, test_fraction: float = 0.2, seed: int = 0) -> tuple[Sweep, Sweep]:
        """Split the runs at random (fixed ``seed``) into a training and a held-out sweep."""
        if not 0.0 < real_number(test_fraction, "test_fraction") < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
        seed = _rng_seed(seed)
        n_test = int(round(self.num_runs * test_fraction))
        if n_test < 1 or n_test >= self.num_runs:
            raise ValueError(
                f"test_fraction={test_fraction} leaves {n_test} held-out runs of {self.num_runs}")
        order = np.random.default_rng(seed).permutation(self.num_runs)
        return self.select(np.sort(order[n_test:])), self.select(np.sort(order[:n_test]))

    def renormalization_report(self) -> dict[str, float]:
        """How far rows were from summing to 1 before renormalisation (max, mean, rows off)."""
        off = self.row_offsets if len(self.row_offsets) else np.zeros(1)
        return {"max_row_offset": float(off.max()), "mean_row_offset": float(off.mean()),
                "rows_renormalized": int((off > 1e-12).sum())}


def load_sweep(
    mixtures: Any,
    metrics: Any,
    *,
    id_column: str | None = None,
    domains: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    strip_prefix: str | None = None,
    tolerance: float = 0.05,
    missing: str = "raise",
) -> Sweep:
    """Load and check a sweep.

    Args:
        mixtures: runs × domains weights: a CSV path, a DataFrame (anything with ``columns`` and
            ``to_numpy()``), a mapping of column name to values, or a 2-D array.
        metrics: runs × targets, in any of the same forms.
        id_column: column identifying runs in both tables; by default the first of
            ``run, run_id, id, index`` present in both.  Rows are matched by it.
        domains: mixture columns to use (default: every numeric non-id column, see
            :func:`fastmix.optimize.sweep.value_columns`).  For arrays, the names of the columns.
        targets: metric columns to use (default: every numeric non-id column).  Only these are
            read and checked for NaN.
        strip_prefix: removed from the start of domain names (e.g. ``"train_the_pile_"``).
        tolerance: largest ``|sum(row) - 1|`` accepted before renormalising; rows further off
            are rejected as not being weights.
        missing: ``"raise"`` (default) on NaN metrics, or ``"drop"`` to drop those runs.

    Returns:
        A :class:`Sweep` with rows renormalised to sum to 1.

    Raises:
        ValueError: misaligned or duplicated rows, negative/NaN weights, rows far from summing
            to 1, NaN metrics (with ``missing="raise"``), unknown columns, a cell that is not a
            number in a column that holds numbers, names made equal by ``strip_prefix``.
    """
    if missing not in ("raise", "drop"):
        raise ValueError(f"missing must be 'raise' or 'drop', got {missing!r}")
    if not real_number(tolerance, "tolerance") >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    mix_cols = _as_columns(mixtures, "mixtures", domains)
    met_cols = _as_columns(metrics, "metrics", targets)

    key = id_column
    if key is not None:
        for name, cols in (("mixtures", mix_cols), ("metrics", met_cols)):
            if key not in cols:
                raise ValueError(f"id_column {key!r} is not a column of {name}")
    else:
        key = shared_id_column(mix_cols, met_cols)
        if key is None:
            mix_key = next((c for c in ID_COLUMNS if c in mix_cols), None)
            met_key = next((c for c in ID_COLUMNS if c in met_cols), None)
            if mix_key is not None and met_key is not None:
                # Both tables name their runs, differently: pairing rows by position would
                # silently give runs the metrics of others whenever the orders differ.
                raise ValueError(
                    f"mixtures identifies runs by column {mix_key!r} and metrics by "
                    f"{met_key!r}: give the id column the same name in both (rows are matched "
                    "by it; id_column names one column that both tables hold)")

    # Rows of empty cells at the end (',,,,': what a spreadsheet exports for rows it once used)
    # are no runs: they read as a run '' with no weights, or as one id '' repeated.  Matched by
    # position, such a row is a run where the other table has one there (its metrics missing,
    # say): dropping it would leave the tables misaligned.
    filled = {name: _filled_rows(cols) for name, cols in (("mixtures", mix_cols),
                                                           ("metrics", met_cols))}
    if key is None:
        filled = dict.fromkeys(filled, max(filled.values()))
    mix_cols = _first_rows(mix_cols, filled["mixtures"])
    met_cols = _first_rows(met_cols, filled["metrics"])
    domain_names = _value_columns(mix_cols, domains, "mixtures", "domains", key)
    target_names = _value_columns(met_cols, targets, "metrics", "targets", key)
    X = _numeric(mix_cols, domain_names, "mixtures")
    Y = _numeric(met_cols, target_names, "metrics")

    run_ids: list[str] | None = None
    if key is not None:
        mix_ids = [_id_str(v) for v in mix_cols[key]]
        met_ids = [_id_str(v) for v in met_cols[key]]
        for name, ids in (("mixtures", mix_ids), ("metrics", met_ids)):
            dup = duplicates(ids)
            if dup:
                raise ValueError(f"{name}: id column {key!r} repeats runs {_preview(dup)}")
        only_mix = sorted(set(mix_ids) - set(met_ids))
        only_met = sorted(set(met_ids) - set(mix_ids))
        if only_mix or only_met:
            raise ValueError(
                f"misaligned rows: by id column {key!r}, runs {_preview(only_mix)} have a "
                f"mixture but no metrics and runs {_preview(only_met)} have metrics but no "
                "mixture")
        where = {r: i for i, r in enumerate(met_ids)}
        Y = Y[[where[r] for r in mix_ids]]
        run_ids = mix_ids
    elif X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"misaligned rows: mixtures has {X.shape[0]} runs but metrics has {Y.shape[0]}, "
            f"and no id column ({', '.join(ID_COLUMNS)}) is shared to match them by")

    if X.shape[0] == 0:
        raise ValueError("the sweep has no runs")
    bad = ~np.isfinite(X)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(f"mixtures: run {_row_name(run_ids, r)} has a non-finite weight for "
                         f"domain {domain_names[c]!r} ({bad.sum()} such entries)")
    neg = X < 0
    if neg.any():
        r, c = np.argwhere(neg)[0]
        raise ValueError(
            f"mixtures: negative entry {X[r, c]:g} for domain {domain_names[c]!r} in run "
            f"{_row_name(run_ids, r)} ({neg.sum()} negative entries)")
    with np.errstate(over="ignore"):  # an inf sum is reported below
        sums = X.sum(axis=1)
    # With tolerance >= 1 an all-zero row got through and was renormalised to NaN (0/0); a
    # row summing past float64 to 0s.
    empty = np.flatnonzero(~(np.isfinite(sums) & (sums > 0)))
    if empty.size:
        r = int(empty[0])
        raise ValueError(f"mixtures: run {_row_name(run_ids, r)} sums to {sums[r]:g}: not a "
                         "weight vector (every row needs a positive, finite sum)")
    offsets = np.abs(sums - 1.0)
    worst = int(np.argmax(offsets))
    if offsets[worst] > tolerance:
        raise ValueError(
            f"mixtures: run {_row_name(run_ids, worst)} sums to {sums[worst]:.6g}, more than "
            f"tolerance={tolerance} away from 1; rows must be weights (renormalised when rounded)")

    nan_rows = ~np.isfinite(Y).all(axis=1)
    if nan_rows.any():
        if missing == "raise":
            r, c = np.argwhere(~np.isfinite(Y))[0]
            raise ValueError(
                f"metrics: target {target_names[c]!r} is NaN/inf in run {_row_name(run_ids, r)} "
                f"({int(nan_rows.sum())} runs affected); pass missing='drop' to drop them")
        keep = ~nan_rows
        X, Y, sums, offsets = X[keep], Y[keep], sums[keep], offsets[keep]
        if run_ids is not None:
            run_ids = [r for r, k in zip(run_ids, keep, strict=True) if k]
        if X.shape[0] == 0:
            raise ValueError("metrics: every run has a NaN metric")

    if strip_prefix:
        stripped = [d[len(strip_prefix):] if d.startswith(strip_prefix) else d
                    for d in domain_names]
        empty = [d for d, n in zip(domain_names, stripped, strict=True) if not n]
        if empty:  # (a nameless domain: weights.json's key "", --min-weight =0.1)
            raise ValueError(f"strip_prefix {strip_prefix!r} leaves domain {empty[0]!r} "
                             "without a name")
        dup = duplicates(stripped)
        if dup:
            sources = [d for d, n in zip(domain_names, stripped, strict=True) if n == dup[0]]
            raise ValueError(f"strip_prefix {strip_prefix!r} makes domain names collide: "
                             f"{sources} all become {dup[0]!r}")
        domain_names = stripped
    return Sweep(X / sums[:, None], Y, list(domain_names), list(target_names), run_ids, offsets)


def read_csv_columns(path: str | Path) -> dict[str, list[str]]:
    """Read a CSV file into ``{column: [cell strings]}`` (header row first).

    The file must be UTF-8; a byte-order mark (Excel's "CSV UTF-8" export) and blank lines are
    dropped (rows of empty cells are kept: :func:`load_sweep` drops those at the end that are no
    runs).  Errors are ValueErrors naming the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():  # a folder, a FIFO (read, it would wait for a writer)
            raise ValueError(f"{path} is not a regular file")
        raise ValueError(f"no such CSV file: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        # utf-8-sig: without it a BOM sticks to the first header ('\ufeffindex').
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # Decoding the whole file at once gives the byte offset, hence the line.
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start}); save the file as UTF-8") from None
    rows: list[list[str]] = []
    lines: list[int] = []  # the line each row starts on (a quoted cell may span lines)
    reader = csv.reader(io.StringIO(text, newline=""))
    start = 1
    try:
        for r in reader:
            if r:  # tolerate blank lines
                rows.append(r)
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as exc:
        hint = "; is a quote left open?" if "field limit" in str(exc) else ""
        raise ValueError(f"{path}: line {start}: {exc}{hint}") from None
    if not rows:
        raise ValueError(f"{path}: empty CSV file")
    # Names stripped as cells are: ``run, d0`` must give 'd0', and 'run' to match rows by.
    header, body = [h.strip() for h in rows[0]], rows[1:]
    for r, line in zip(body, lines[1:], strict=True):
        if len(r) != len(header):
            raise ValueError(f"{path}: line {line} has {len(r)} fields, header has {len(header)}")
    if len(set(header)) != len(header):
        raise ValueError(f"{path}: repeated column names {_preview(duplicates(header))}")
    return {h: [r[j] for r in body] for j, h in enumerate(header)}


def _filled_rows(cols: Mapping[str, Sequence[Any]]) -> int:
    """The rows of ``cols`` up to the last one with a cell that is not empty text."""
    n = max((len(v) for v in cols.values()), default=0)
    while n and all(
        len(v) >= n and isinstance(v[n - 1], str) and not v[n - 1].strip() for v in cols.values()
    ):
        n -= 1
    return n


def _first_rows(cols: dict[str, Sequence[Any]], n: int) -> dict[str, Sequence[Any]]:
    """``cols`` cut to its first ``n`` rows (as it is when it has no more)."""
    return {c: v[:n] if len(v) > n else v for c, v in cols.items()}


def _as_columns(obj: Any, what: str, names: Sequence[str] | None) -> dict[str, Sequence[Any]]:
    if isinstance(obj, (str, Path)):
        return read_csv_columns(obj)
    if hasattr(obj, "columns") and hasattr(obj, "to_numpy"):  # a pandas-like DataFrame
        cols = [str(c) for c in obj.columns]
        data = obj.to_numpy()
        if data.ndim != 2 or data.shape[1] != len(cols):
            raise ValueError(f"{what}: DataFrame data has shape {data.shape} for {len(cols)} "
                             "columns")
        return {c: list(data[:, j]) for j, c in enumerate(cols)}
    if isinstance(obj, Mapping):
        cols = {str(k): _column(v) for k, v in obj.items()}
        lengths = {len(v) for v in cols.values()}
        if len(lengths) > 1:
            raise ValueError(f"{what}: columns have different lengths {sorted(lengths)}")
        return cols
    try:
        arr = np.asarray(obj)
        if arr.dtype.kind != "b":
            arr = arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what}: expected a CSV path, DataFrame, mapping or 2-D array, got "
                        f"{type(obj).__name__}") from exc
    if arr.dtype.kind == "b":  # asarray(float64) read True as a weight (or metric) of 1
        raise TypeError(f"{what}: an array of bools holds no weights or metrics")
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array, got shape {arr.shape}")
    if names is None:
        prefix = "domain" if what == "mixtures" else "target"
        names = [f"{prefix}_{j}" for j in range(arr.shape[1])]
    if len(names) != arr.shape[1]:
        raise ValueError(f"{what}: {len(names)} names for {arr.shape[1]} columns")
    return {str(n): list(arr[:, j]) for j, n in enumerate(names)}


def _column(values: Any) -> list[Any]:
    """A mapping's column as a list of plain Python values (messages show '1.2x', not
    np.str_('1.2x')).

    A list of scalars is not passed through numpy, whose str dtype drops trailing NULs: run
    ids 'r2' and 'r2\\x00' became one run.
    """
    if isinstance(values, (list, tuple)) and not any(
            isinstance(v, (list, tuple, np.ndarray)) for v in values):
        return [v.item() if isinstance(v, np.generic) else v for v in values]
    return np.asarray(values).ravel().tolist()


def _value_columns(cols: Mapping[str, Sequence[Any]], wanted: Sequence[str] | None, what: str,
                   arg: str, key: str | None) -> list[str]:
    if wanted is not None:
        if isinstance(wanted, str):  # one column, not one per character ('loss' was l, o, s, s)
            wanted = [wanted]
        not_a_set(wanted, f"{arg} must be a list of column names")
        if not isinstance(wanted, Iterable):
            raise TypeError(f"{arg} must be a list of column names, got {type(wanted).__name__}")
        wanted = [str(w) for w in wanted]
        repeated = sorted(duplicates(wanted))
        if repeated:
            raise ValueError(f"{arg}: columns {_preview(repeated)} are listed more than once")
        unknown = [w for w in wanted if w not in cols]
        if unknown:
            raise ValueError(f"{arg}: {what} has no column {_preview(unknown)}; it has "
                             f"{_preview(list(cols))}")
        if not wanted:
            raise ValueError(f"{arg}: empty list of columns")
        return wanted
    out = value_columns(cols, what, key)
    if not out:
        flags = [c for c in data_columns(cols, key)
                 if any(isinstance(v, (bool, np.bool_)) for v in cols[c])]
        hint = f"; columns {_preview(flags)} hold bools, which are not numbers" if flags else ""
        raise ValueError(f"{what}: no numeric columns besides ids{hint}")
    return out


def shared_id_column(mixtures: Mapping[str, Any], metrics: Mapping[str, Any]) -> str | None:
    """The first of ``ID_COLUMNS`` both tables have (what matches their rows), or None."""
    return next((c for c in ID_COLUMNS if c in mixtures and c in metrics), None)


def data_columns(cols: Mapping[str, Any], id_column: str | None = None) -> list[str]:
    """The columns that may hold weights or metrics: not run ids, not index or name columns."""
    return [c for c in cols if c != id_column and c not in _IGNORED and c not in ID_COLUMNS]


def value_columns(cols: Mapping[str, Sequence[Any]], what: str = "table",
                  id_column: str | None = None) -> list[str]:
    """The numeric columns of ``cols`` that are not run ids: the default domains or targets.

    A column is numeric when every cell is a number or missing (empty, ``nan``, ``NA``, ...).
    A column where most cells are numbers but some are not (``0.0O1``, a typo) is an error
    naming the column, the row and the cell: treating it as text would silently drop a domain
    or a metric.  Columns of mostly text (run names) are left out.
    """
    out = []
    for c in data_columns(cols, id_column):
        values = cols[c]
        bad = []
        numbers = 0
        for i, v in enumerate(values):
            if _is_missing(v):
                continue
            try:
                parse_float(v)
                numbers += 1
            except (TypeError, ValueError):
                bad.append(i)
        if not bad:
            out.append(c)
        elif numbers > len(bad):
            i = bad[0]
            ids = cols.get(id_column) if id_column is not None else None
            row = f"row {i}" if ids is None else f"run {_id_str(ids[i])!r} (row {i})"
            raise ValueError(f"{what}: column {c!r} holds numbers, but {row} is "
                             f"{values[i]!r}, not a number ({len(bad)} such cells)")
    return out


def _is_missing(v: Any) -> bool:
    """Cells that mean "no value": empty or NaN-like text, ``None``."""
    return v is None or isinstance(v, str) and v.strip().lower() in _MISSING


def _numeric(cols: Mapping[str, Sequence[Any]], names: Sequence[str], what: str) -> np.ndarray:
    out = np.empty((len(cols[names[0]]), len(names)), dtype=np.float64)
    for j, n in enumerate(names):
        for i, v in enumerate(cols[n]):
            out[i, j] = _to_float(v, what, n, i)
    return out


def _to_float(v: Any, what: str, col: str, row: int) -> float:
    if _is_missing(v):
        return math.nan
    try:
        return parse_float(v)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: column {col!r} row {row}: {v!r} is not a number") from exc


_INTEGER = re.compile(r"[+-]?[0-9]+")


def _id_str(v: Any) -> str:
    """Ids compare as text, so ``1``, ``1.0`` and ``"1"`` are the same run.

    Digit strings compare exactly (``20240101120000000001`` is not rounded to a float64
    neighbour); a float is folded to its integer only where float64 holds integers exactly.
    """
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    s = str(v).strip()
    if _INTEGER.fullmatch(s):
        return str(int(s))
    try:
        f = parse_float(s)  # strict: float('1_0') would make run '1_0' run '10'
        if f.is_integer() and abs(f) < 2**53:
            return str(int(f))
    except ValueError:
        pass
    return s


def _row_name(run_ids: list[str] | None, row: int) -> str:
    return f"row {row}" if run_ids is None else f"{run_ids[row]!r} (row {row})"


def _preview(items: Sequence[Any], n: int = 5) -> str:
    items = list(items)
    if not items:
        return "[]"
    head = ", ".join(repr(x) for x in items[:n])
    return f"[{head}{', ...' if len(items) > n else ''}] ({len(items)})"
