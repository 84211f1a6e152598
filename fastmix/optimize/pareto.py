"""Several objectives at once: the non-dominated mixtures and what each trade costs.

A point *dominates* another when it is no worse on every objective and better on one (all
objectives minimised; pass ``maximize`` for the others).  The front is every non-dominated
point; equal points do not dominate each other, so duplicates on the front are all kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastmix._checks import flag

from .search import (
    _CONCENTRATIONS,
    Constraints,
    _check_prior,
    _draw_mixtures,
    _evaluate,
    _integer,
    _numbers,
    _rng_seed,
)

__all__ = ["pareto_front", "ParetoFront", "pareto_search"]


def _flags(maximize: Any) -> list[bool]:
    """``maximize`` as a list of bools, each a real bool: bool("no") is True, and numpy's
    dtype=bool also took 0.5 for True."""
    if isinstance(maximize, (str, bytes)) or not isinstance(maximize, (Sequence, np.ndarray)):
        raise TypeError(f"maximize must be a list of bools, got {type(maximize).__name__}")
    return [flag(m, f"maximize[{i}]") for i, m in enumerate(maximize)]


def pareto_front(values: np.ndarray, maximize: Sequence[bool] | None = None) -> np.ndarray:
    """Indices (ascending) of the non-dominated rows of ``values`` ``(points, objectives)``.

    Sorted sweep: after ordering points lexicographically, a point can only be dominated by
    an earlier one, and only by a point already on the front.  Two objectives take
    ``O(n log n)`` (a running minimum of the second along the sort); more compare each point
    with the current front (``O(n·front)`` vectorised).  ``maximize`` has one flag per
    objective, True where higher is better (default: lower is better for all).
    """
    # Numbers only: asarray(float64) read ["1", "2"] and booleans as values, dropped the
    # imaginary part of complex ones, and named nothing for ragged rows or an int past float64.
    V = _numbers(values, "values")
    if V.ndim != 2 or V.shape[0] == 0 or V.shape[1] == 0:
        raise ValueError(f"values must be (points, objectives) with both > 0, got {V.shape}")
    if not np.isfinite(V).all():
        raise ValueError("values must be finite")
    if maximize is not None:
        flip = np.array(_flags(maximize), dtype=bool)
        if flip.shape != (V.shape[1],):
            raise ValueError(f"maximize needs {V.shape[1]} flags, got {flip.shape}")
        V = np.where(flip[None, :], -V, V)
    order = np.lexsort(V.T[::-1])
    if V.shape[1] == 2:
        # (10,000 points all on the front: 2.3 s through the general sweep)
        return np.sort(order[~_dominated_2d(V[order, 0], V[order, 1])])
    front = np.empty(V.shape[0], dtype=np.int64)
    F = np.empty_like(V)  # the front so far, in its first `size` rows
    size = 0
    for i in order:
        v = V[i]
        if size and ((F[:size] <= v).all(1) & (F[:size] < v).any(1)).any():
            continue
        front[size], F[size] = i, v
        size += 1
    return np.sort(front[:size])


def _dominated_2d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For points sorted by (a, b): whether an earlier point dominates each.  Within a run of
    equal a only the run's first b can (if smaller); before the run, any b at or below."""
    n = a.size
    starts = np.flatnonzero(np.r_[True, a[1:] != a[:-1]])
    run_start = starts[np.searchsorted(starts, np.arange(n), side="right") - 1]
    best_before = np.r_[np.inf, np.minimum.accumulate(b)][run_start]
    return (best_before <= b) | (b[run_start] < b)


@dataclass
class ParetoFront:
    """Front mixtures, their predicted objectives, and the trade-offs along the front."""

    weights: np.ndarray  # (front, K)
    values: np.ndarray  # (front, objectives), in the objectives' own direction
    objectives: list[str]
    maximize: list[bool]

    def ideal(self) -> np.ndarray:
        """Best value of each objective anywhere on the front."""
        return np.where(self.maximize, self.values.max(0), self.values.min(0))

    def nadir(self) -> np.ndarray:
        """Worst value of each objective on the front."""
        return np.where(self.maximize, self.values.min(0), self.values.max(0))

    def trade_offs(self) -> list[dict[str, Any]]:
        """For each objective: the front point best on it and what the others cost there.

        ``cost`` is how much worse than its ideal each other objective is at that point (in
        its own unit, positive = worse) — what one pays elsewhere to be best at this one.
        """
        ideal = self.ideal()
        sign = np.where(self.maximize, -1.0, 1.0)
        rows = []
        for j, name in enumerate(self.objectives):
            i = int(np.argmax(self.values[:, j]) if self.maximize[j]
                    else np.argmin(self.values[:, j]))
            cost = sign * (self.values[i] - ideal)
            values = dict(zip(self.objectives, self.values[i].tolist(), strict=True))
            costs = {o: float(c) for o, c in zip(self.objectives, cost, strict=True) if o != name}
            rows.append({"best_at": name, "index": i, "values": values, "cost": costs})
        return rows


def pareto_search(objectives: Sequence[Any], names: Sequence[str], constraints: Constraints, *,
                  prior: np.ndarray | None = None, samples: int = 20_000,
                  maximize: Sequence[bool] | None = None, include: np.ndarray | None = None,
                  seed: int = 0) -> ParetoFront:
    """Sample feasible mixtures, predict every objective, keep the non-dominated ones.

    ``objectives`` are vectorised callables ``(n, K) -> (n,)`` (e.g. predictors' ``predict``),
    ``names`` their names; ``samples`` mixtures are drawn with :func:`sample_mixtures` around
    ``prior`` (default: uniform) under ``constraints``, seeded by ``seed``; ``maximize`` has one
    flag per objective (default: minimise all); ``include`` adds mixtures of one's own to the
    candidates (e.g. a search's result, so the front is not beaten by the chosen point).
    """
    if len(objectives) != len(names) or len(names) < 2:
        raise ValueError("need at least two objectives, each with a name")
    K = len(constraints.domains)
    prior = np.full(K, 1.0 / K) if prior is None else _check_prior(prior, K)
    if maximize is None:
        maximize = [False] * len(names)
    else:
        maximize = _flags(maximize)
        if len(maximize) != len(names):
            raise ValueError(f"maximize needs {len(names)} flags (one per objective), got "
                             f"{len(maximize)}")
    samples = _integer(samples, "samples")
    seed = _rng_seed(seed)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    cands = _draw_mixtures(samples, prior, constraints, _CONCENTRATIONS, seed, "samples")
    if include is not None:
        extra = np.atleast_2d(np.asarray(include, dtype=np.float64))
        if extra.shape[1] != K or not constraints.feasible(extra).all():
            raise ValueError(f"include: mixtures must be (n, {K}) and feasible")
        cands = np.vstack([cands, extra])
    # One value per candidate, as search() checks: a scalar or a short array would otherwise
    # broadcast or misalign and give a wrong front silently.
    V = np.column_stack([_evaluate(f, cands, f"objective {name!r}")
                         for f, name in zip(objectives, names, strict=True)])
    idx = pareto_front(V, maximize)
    # Order along the first objective so the front reads (and plots) as a curve.
    idx = idx[np.argsort(V[idx, 0], kind="stable")]
    return ParetoFront(cands[idx], V[idx], list(names), maximize)
