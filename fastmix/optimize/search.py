"""Search the simplex for the weights that minimise a predicted objective, under constraints.

RegMix's recipe: sample many mixtures from Dirichlet distributions around a prior, predict the
objective of each, and average the top-k (the average of good mixtures is more robust than the
single best prediction).  fastmix adds constraints and a local refinement:

- per-domain minimum and maximum weight;
- token availability: with a total token budget and each domain's token count, a domain cannot
  be read for more than ``max_epochs`` passes (``w_i ≤ max_epochs·tokens_i / total_tokens``).

Every candidate is projected exactly onto ``{lo ≤ w ≤ hi, Σw = 1}`` (bisection on the shift of
the Euclidean projection, vectorised over candidates), so all of them are feasible and so is any
average of them (the set is convex).
"""

from __future__ import annotations

import numbers
import reprlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastmix._checks import duplicates, flag, not_a_set, plain_values, real_number

__all__ = ["Constraints", "SearchResult", "project", "sample_mixtures", "search"]

Objective = Callable[[np.ndarray], np.ndarray]


def _integer(value: Any, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral,
                                                                    np.integer)):
        raise TypeError(f"{what} must be an integer, got {value!r}")
    return int(value)


def _seed(value: Any, what: str = "seed") -> int:
    """A seed for ``np.random.default_rng``: a non-negative integer (numpy's own error for -1
    names no argument)."""
    v = _integer(value, what)
    if v < 0:
        raise ValueError(f"{what} must be >= 0, got {v}")
    return v


def _rng_seed(value: Any, what: str = "seed") -> Any:
    """What ``np.random.default_rng`` takes (None, a Generator, a SeedSequence, a list of ints),
    for the functions that hand ``seed`` straight to it; an integer is checked as by _seed."""
    if value is None or isinstance(value, (np.random.Generator, np.random.SeedSequence)):
        return value
    if isinstance(value, (list, tuple)):
        return [_seed(v, what) for v in value]
    return _seed(value, what)


def domain_hint(unknown: Sequence[str], domains: Sequence[str]) -> str:
    """What to add to an "unknown domain" message: the names that look alike (a prefix kept or
    stripped, e.g. 'pile_cc' for 'train_the_pile_pile_cc'), else the domains there are."""
    def prefixed(long: str, short: str) -> bool:  # long = some prefix + a separator + short
        long, short = long.lower(), short.lower()
        n = len(short)
        return len(long) > n and long.endswith(short) and not long[-n - 1].isalnum()

    close = [d for u in unknown for d in domains if prefixed(d, u) or prefixed(u, d)]
    if close:
        return f"; did you mean {list(dict.fromkeys(close))[:5]}?"
    names = ", ".join(repr(d) for d in list(domains)[:8]) + (", ..." if len(domains) > 8 else "")
    return f"; the domains are [{names}]"


def _per_domain(value: Any, domains: Sequence[str], what: str, default: float) -> np.ndarray:
    K = len(domains)
    if value is None:
        return np.full(K, default, dtype=np.float64)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(domains))
        if unknown:
            raise ValueError(f"{what}: unknown domains {unknown}{domain_hint(unknown, domains)}")
        out = np.full(K, default, dtype=np.float64)
        for i, d in enumerate(domains):
            if d in value:
                out[i] = real_number(value[d], f"{what}[{d!r}]")
        return out
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{what} must be a number, a mapping or {K} numbers, got {value!r}")
    # (a bool among numbers: [True, 0] converted to [1, 0] without a word)
    arr = np.asarray(plain_values(value, what))
    if arr.dtype.kind not in "iuf":  # text, booleans, objects: nothing that merely converts
        raise TypeError(f"{what} must be a number, a mapping or {K} numbers, got {value!r}")
    arr = arr.astype(np.float64)
    if arr.ndim == 0:
        return np.full(K, float(arr))
    if arr.shape != (K,):
        raise ValueError(f"{what}: expected a scalar, a mapping or {K} values, got shape "
                         f"{arr.shape}")
    return arr.copy()


def _check_prior(prior: Any, K: int) -> np.ndarray:
    """``prior`` as ``K`` non-negative finite weights summing to 1."""
    if isinstance(prior, (str, bytes)):
        raise TypeError(f"prior must be {K} weights, got {prior!r}")
    arr = np.asarray(plain_values(prior, "prior"))
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"prior must be {K} numbers, got {prior!r}")
    arr = arr.astype(np.float64)
    if arr.shape != (K,):
        raise ValueError(f"prior must be {K} weights (one per domain), got shape {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any() or not arr.max() > 0:
        raise ValueError(f"prior must be {K} non-negative finite weights with a positive sum")
    with np.errstate(over="ignore"):
        total = arr.sum()
    if not np.isfinite(total):  # e.g. [1.5e308, 1e308]: dividing by inf gave all zeros
        arr = arr / arr.max()
        total = arr.sum()
    return arr / total


@dataclass
class Constraints:
    """Feasible weights: ``lo_i ≤ w_i ≤ hi_i`` and ``Σ w_i = 1``.

    Args:
        domains: domain names (order of the weight vector).
        min_weight: scalar, ``{domain: value}`` or one value per domain (default 0).
        max_weight: likewise (default 1).
        token_counts: tokens available per domain (needs ``total_tokens``).
        total_tokens: tokens the run will train on.
        max_epochs: how many passes over a domain's tokens the run may make (default 1 when
            token counts are given: no token is seen twice).

    Raises:
        ValueError: on bounds outside [0, 1], ``min > max``, minimums summing above 1, or a
            budget that cannot be met within ``max_epochs`` — naming the domain or the numbers.
        TypeError: on a value that is not a number (``total_tokens="2"``), naming the argument.
    """

    domains: Sequence[str]
    min_weight: Any = None
    max_weight: Any = None
    token_counts: Any = None
    total_tokens: float | None = None
    max_epochs: float | None = None
    lo: np.ndarray = field(init=False)
    hi: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        # A string is iterable too: 'web' became the domains ['w', 'e', 'b'].
        if isinstance(self.domains, (str, bytes)) or not isinstance(self.domains, Iterable):
            raise TypeError(f"domains must be a list of names, got {self.domains!r}")
        not_a_set(self.domains, "domains must be a list of names")
        self.domains = [str(d) for d in self.domains]
        K = len(self.domains)
        if K < 1:
            raise ValueError("domains: need at least one domain")
        dup = sorted(duplicates(self.domains))
        if dup:
            raise ValueError(f"domains: names must be unique; {dup} repeat")
        lo = _per_domain(self.min_weight, self.domains, "min_weight", 0.0)
        hi = _per_domain(self.max_weight, self.domains, "max_weight", 1.0)
        for what, arr in (("min_weight", lo), ("max_weight", hi)):
            bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0) | (arr > 1))
            if bad.size:
                raise ValueError(f"{what} for domain {self.domains[bad[0]]!r} is {arr[bad[0]]}; "
                                 "weights lie in [0, 1]")
        bad = np.flatnonzero(lo > hi)
        if bad.size:
            i = bad[0]
            raise ValueError(f"domain {self.domains[i]!r}: min_weight {lo[i]:g} > max_weight "
                             f"{hi[i]:g}")
        # Per-domain token counts and the weights they allow (None without token counts).
        self.tokens: np.ndarray | None = None
        self.availability: np.ndarray | None = None
        if self.token_counts is not None or self.total_tokens is not None:
            if self.token_counts is None or self.total_tokens is None:
                raise ValueError("token_counts and total_tokens must be given together")
            total = real_number(self.total_tokens, "total_tokens")
            if not (np.isfinite(total) and total > 0):
                raise ValueError(f"total_tokens must be > 0, got {self.total_tokens}")
            epochs = 1.0 if self.max_epochs is None else real_number(self.max_epochs, "max_epochs")
            if not (np.isfinite(epochs) and epochs > 0):
                raise ValueError(f"max_epochs must be > 0, got {self.max_epochs}")
            tokens = _per_domain(self.token_counts, self.domains, "token_counts", np.nan)
            missing = [d for d, t in zip(self.domains, tokens, strict=True) if np.isnan(t)]
            if missing:
                raise ValueError(f"token_counts: no count for domains {missing}")
            bad = np.flatnonzero(~(tokens >= 0) | ~np.isfinite(tokens))
            if bad.size:
                i = int(bad[0])
                raise ValueError(f"token_counts for {self.domains[i]!r} is {tokens[i]:g}; counts "
                                 "must be finite and >= 0")
            # Counts near 1e308 overflow to an inf supply, which is right (more than enough).
            with np.errstate(over="ignore"):
                held = tokens.sum()
                supply = epochs * held
                self.availability = np.minimum(epochs * tokens / total, 1.0)
            if supply < total:
                raise ValueError(
                    f"infeasible budget: total_tokens={total:.4g} but the domains "
                    f"hold {held:.4g} tokens, i.e. at most {supply:.4g} within "
                    f"max_epochs={epochs:g}")
            self.tokens = tokens
            low = np.flatnonzero(self.availability < lo)
            if low.size:
                i = low[0]
                raise ValueError(
                    f"domain {self.domains[i]!r}: min_weight {lo[i]:g} needs "
                    f"{lo[i] * total:.4g} tokens but {tokens[i]:.4g} tokens × "
                    f"max_epochs={epochs:g} allow at most weight {self.availability[i]:.4g}")
            hi = np.minimum(hi, self.availability)
        elif self.max_epochs is not None:
            raise ValueError("max_epochs needs token_counts and total_tokens")
        if lo.sum() > 1 + 1e-12:
            raise ValueError(f"infeasible: min weights sum to {lo.sum():.6g} > 1")
        if hi.sum() < 1 - 1e-12:
            raise ValueError(
                f"infeasible: max weights (after token availability) sum to {hi.sum():.6g} < 1")
        self.lo, self.hi = lo, hi

    def feasible(self, W: np.ndarray, atol: float = 1e-9) -> np.ndarray:
        """Which rows of ``W`` satisfy every constraint (within ``atol``)."""
        W = np.atleast_2d(np.asarray(W, dtype=np.float64))
        return ((W >= self.lo - atol).all(1) & (W <= self.hi + atol).all(1)
                & (np.abs(W.sum(1) - 1) <= atol * W.shape[1]))

    def describe(self) -> dict[str, Any]:
        """The bounds per domain and the token budget, as plain values (``max_epochs``: the
        cap in effect, 1 with token counts when none was given; None without token counts)."""
        epochs = None
        if self.tokens is not None:  # (None here read as no cap, where one pass was enforced)
            epochs = 1.0 if self.max_epochs is None else float(self.max_epochs)
        return {"min_weight": dict(zip(self.domains, self.lo.tolist(), strict=True)),
                "max_weight": dict(zip(self.domains, self.hi.tolist(), strict=True)),
                "total_tokens": self.total_tokens, "max_epochs": epochs}


def project(V: np.ndarray, lo: np.ndarray, hi: np.ndarray, iters: int = 100) -> np.ndarray:
    """Euclidean projection of each row of ``V`` onto ``{lo ≤ w ≤ hi, Σw = 1}``.

    The projection is ``clip(v − τ, lo, hi)`` for the τ making the row sum to 1; Σ is monotone
    in τ, so bisection finds it (100 halvings of a bracket of width ≤ ``ptp(v) + 2``:
    below 1e-29).  Every returned entry satisfies ``lo ≤ w ≤ hi`` exactly (weights written from
    it must pass ``w >= 0`` checks) and rows sum to 1 within a few ulps.

    Raises:
        ValueError: on NaN/inf in ``V`` or the bounds, or bounds no row can meet (``lo > hi``,
            ``Σlo > 1`` or ``Σhi < 1``); on ``iters`` outside [1, 2100] (no float64 bracket
            changes after 2099 halvings).
        TypeError: on values that are not numbers.
    """
    V, lo, hi = _check_projection(V, lo, hi)  # (V: a private float64 copy)
    iters = _integer(iters, "iters")
    # A row's bracket is narrower than 2**1025 and the finest float64 spacing is 2**-1074: after
    # 2099 halvings the midpoint is an end and nothing changes (measured: a row spanning the
    # float64 range stops at 2099).  More only spent time: iters=10**30 never returned.
    if not 1 <= iters <= _MAX_PROJECT_ITERS:
        raise ValueError(f"iters must lie in [1, {_MAX_PROJECT_ITERS}], got {iters}")
    # Rows are independent: project a block of rows at a time, into V itself.  Whole-array
    # temporaries took ~8 copies of V (50,000 mixtures of 1,000 domains: 3.2 GB beyond the input;
    # of 10,000 domains, 32 GB); the blocks also stay in cache.
    rows = max(1, _PROJECT_BLOCK // max(1, V.shape[1]))
    for i in range(0, V.shape[0], rows):
        V[i : i + rows] = _project_rows(V[i : i + rows], lo, hi, iters)
    return V


# The most bisection steps project() takes: more cannot change a float64 bracket (see project).
_MAX_PROJECT_ITERS = 2100

# Entries per block of rows that project() works on at once (1 MiB of float64).
_PROJECT_BLOCK = 1 << 17


def _project_rows(V: np.ndarray, lo: np.ndarray, hi: np.ndarray, iters: int) -> np.ndarray:
    """project() of checked rows."""
    a = (V - hi[None, :]).min(1)  # τ here → every entry at hi: Σ = Σhi ≥ 1
    b = (V - lo[None, :]).max(1)  # τ here → every entry at lo: Σ = Σlo ≤ 1
    for _ in range(iters):
        mid = 0.5 * a + 0.5 * b  # (a + b) overflows for rows near 1e308; halving is exact
        s = np.clip(V - mid[:, None], lo, hi).sum(1)
        big = s > 1
        a = np.where(big, mid, a)
        b = np.where(big, b, mid)
    W = np.clip(V - (0.5 * a + 0.5 * b)[:, None], lo, hi)
    # The clipped sum misses 1 by ~1e-16 of rounding.  Move each entry by a share of the gap
    # proportional to its room towards the bound in the gap's direction: no entry can then
    # cross its bound (|gap| ≤ total room whenever Σlo ≤ 1 ≤ Σhi), unlike an even split, which
    # pushed a 5e-18 entry to -1.7e-17.  Entries strictly inside the box take the gap when they
    # have room for it, so the zeros (and other bounds met exactly) stay exact.  Clip after each
    # pass for the last ulp; two or three passes settle the sum.
    for _ in range(4):
        gap = 1.0 - W.sum(1)
        if not np.any(gap):
            break
        room = np.where((gap > 0)[:, None], hi - W, W - lo)
        inside = np.where((W > lo) & (W < hi), room, 0.0)
        use = np.where((inside.sum(1) >= np.abs(gap))[:, None], inside, room)
        total = use.sum(1)
        step = np.divide(gap, total, out=np.zeros_like(gap), where=total > 0)
        W = np.clip(W + step[:, None] * use, lo, hi)
    return W


def _numbers(value: Any, what: str) -> np.ndarray:
    """``value`` as a float64 array; TypeError naming ``what`` for text, booleans, objects."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{what} must be numbers, got {value!r}")
    try:
        arr = np.asarray(value)
    except ValueError:  # ragged rows
        raise ValueError(f"{what} must be a rectangular array of numbers") from None
    if arr.dtype == object and all(
        isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) for v in arr.flat
    ):
        # Python ints past int64 (a count of FLOPs, 8.4e22) are numbers numpy keeps as objects.
        try:
            return arr.astype(np.float64)
        except OverflowError:
            raise ValueError(f"{what}: a number is too large for float64") from None
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{what} must be numbers, got {reprlib.repr(value)}")
    return arr.astype(np.float64)


def _check_projection(V: Any, lo: Any, hi: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``V`` as ``(n, K)`` finite rows and bounds ``lo``/``hi`` of ``K`` values that a row can
    meet: unchecked, Σlo = 1.5 returned rows summing to 1.5 and NaN rows came back NaN."""
    V = np.atleast_2d(_numbers(V, "V"))
    if V.ndim != 2:
        raise ValueError(f"V must be (n, K) rows, got shape {V.shape}")
    if not np.isfinite(V).all():
        raise ValueError("V must be finite (found NaN/inf)")
    with np.errstate(over="ignore"):
        wide = np.flatnonzero(~np.isfinite(np.ptp(V, axis=1)))
    if wide.size:  # v - τ would overflow
        raise ValueError(f"V: row {wide[0]} spans more than float64 holds (max - min is inf)")
    K = V.shape[1]
    bounds = []
    for what, b in (("lo", lo), ("hi", hi)):
        b = _numbers(b, what)
        if b.ndim == 0:  # one bound for every column
            b = np.full(K, float(b))
        if b.shape != (K,):
            raise ValueError(f"{what} must be {K} bounds (one per column of V), got shape "
                             f"{b.shape}")
        if not np.isfinite(b).all():
            raise ValueError(f"{what} must be finite")
        bounds.append(b)
    lo, hi = bounds
    bad = np.flatnonzero(lo > hi)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"lo[{i}] = {lo[i]:g} > hi[{i}] = {hi[i]:g}")
    # The same slack as Constraints, whose bounds come here.
    if lo.sum() > 1 + 1e-12 or hi.sum() < 1 - 1e-12:
        raise ValueError(f"infeasible bounds: no row sums to 1 with sum(lo) = {lo.sum():.6g} "
                         f"and sum(hi) = {hi.sum():.6g}")
    return V, lo, hi


# Beyond this a Dirichlet sample equals its mean to 6 digits, and c·K·prior must stay finite.
MAX_CONCENTRATION = 1e12


def _check_concentrations(concentrations: Any) -> np.ndarray:
    conc = _numbers(concentrations, "concentrations")
    if conc.ndim != 1 or conc.size == 0:
        raise ValueError(f"concentrations must be a non-empty list of numbers, got "
                         f"{concentrations!r}")
    bad = np.flatnonzero(~((conc > 0) & (conc <= MAX_CONCENTRATION)))
    if bad.size:
        raise ValueError(f"concentrations must lie in (0, {MAX_CONCENTRATION:g}], got "
                         f"{conc[bad[0]]:g}")
    return conc


_CONCENTRATIONS = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def sample_mixtures(n: int, prior: np.ndarray, constraints: Constraints, *,
                    concentrations: Sequence[float] = _CONCENTRATIONS,
                    seed: int = 0) -> np.ndarray:
    """``n`` feasible mixtures from Dirichlet(c·K·prior) for each concentration ``c`` in turn.

    Small ``c`` gives sparse mixtures far from the prior, large ``c`` mixtures near it, as in
    RegMix's sampler.  Each sample is projected onto the constraints.  Sample ``i`` uses
    ``concentrations[i % len(concentrations)]``; ``seed`` seeds the draws.
    """
    return _draw_mixtures(n, prior, constraints, concentrations, seed, "n")


def _draw_mixtures(n: int, prior: np.ndarray, constraints: Constraints,
                  concentrations: Sequence[float], seed: Any, what: str) -> np.ndarray:
    """:func:`sample_mixtures`, its errors about ``n`` naming ``what`` (search's ``samples``)."""
    K = len(constraints.domains)
    prior = _check_prior(prior, K)
    seed = _rng_seed(seed)
    n = _integer(n, what)
    if n < 1:
        raise ValueError(f"{what} must be >= 1, got {n}")
    conc = _check_concentrations(concentrations)
    G = _rows(n, K, what)
    rng = np.random.default_rng(seed)
    alpha_base = np.maximum(prior, 1e-3 / K)  # a zero prior entry would never be sampled
    alpha_base = alpha_base / alpha_base.sum()
    # Drawn a block of rows at a time (the generator's stream is the same as one call over the
    # whole array), normalised in place: whole-array temporaries made ~9 copies of the output.
    rows = max(1, _PROJECT_BLOCK // K)
    for i in range(0, n, rows):
        which = np.arange(i, min(i + rows, n)) % conc.size
        G[i : i + rows] = rng.gamma(conc[which, None] * K * alpha_base[None, :])
    np.maximum(G, 1e-300, out=G)  # Gamma draws underflow to 0 for tiny shapes
    G /= G.sum(1, keepdims=True)
    return project(G, constraints.lo, constraints.hi)


@dataclass
class SearchResult:
    """The chosen weights and how they were found.

    Attributes:
        weights: the chosen mixture: the average of the top-k samples, refined.
        objective: the objective at ``weights``.
        top_k, top_k_objective: the best sampled mixtures and their objectives, best first.
        averaged_objective: the objective at the top-k average, before refinement.
        refined: whether refinement improved on the average.
        evaluated: mixtures evaluated in all.
        candidates, candidate_objective: every sampled mixture and its objective
            (``keep_candidates=True``), else ``None``.
    """

    weights: np.ndarray
    objective: float
    top_k: np.ndarray
    top_k_objective: np.ndarray
    averaged_objective: float
    refined: bool
    evaluated: int
    candidates: np.ndarray | None = None
    candidate_objective: np.ndarray | None = None

    def as_dict(self, domains: Sequence[str]) -> dict[str, float]:
        """``weights`` as ``{domain: weight}``, in the order of ``domains``."""
        return {d: float(w) for d, w in zip(domains, self.weights, strict=True)}


def search(objective: Objective, constraints: Constraints, *, prior: np.ndarray | None = None,
           samples: int = 50_000, top_k: int = 100, refine_steps: int = 100,
           refine_batch: int = 64, seed: int = 0, keep_candidates: bool = False
           ) -> SearchResult:
    """Minimise ``objective`` (a vectorised function of ``(n, K)`` weights) over the constraints.

    Args:
        objective: maps ``(n, K)`` mixtures to ``(n,)`` values to minimise (e.g. a predictor's
            ``predict`` or a weighted sum over targets).
        constraints: the feasible set.
        prior: centre of the Dirichlet sampling (default: the middle of the feasible box).
        samples: how many mixtures to sample.
        top_k: how many of the best samples to average (RegMix used 100).
        refine_steps: rounds of local search from the average: each proposes ``refine_batch``
            perturbations (projected back onto the constraints) and keeps the best if it
            improves; the step shrinks when none does.  0 disables refinement.
        seed: seeds sampling and refinement.
        keep_candidates: also return every sampled mixture and its objective (for Pareto plots).
    """
    K = len(constraints.domains)
    if prior is None:
        prior = project((constraints.lo + constraints.hi)[None, :] / 2, constraints.lo,
                        constraints.hi)[0]
    prior = _check_prior(prior, K)
    # Integers checked up front: a float count fails deep inside numpy (IndexError).
    samples = _integer(samples, "samples")
    top_k = _integer(top_k, "top_k")
    refine_steps = _integer(refine_steps, "refine_steps")
    refine_batch = _integer(refine_batch, "refine_batch")
    seed = _seed(seed)
    keep_candidates = flag(keep_candidates, "keep_candidates")  # any value counted by truth
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not 1 <= top_k <= samples:
        raise ValueError(f"top_k must lie in [1, samples={samples}], got {top_k}")
    if refine_steps < 0 or refine_batch < 1:
        raise ValueError("refine_steps must be >= 0 and refine_batch >= 1")
    cands = _draw_mixtures(samples, prior, constraints, _CONCENTRATIONS, seed, "samples")
    values = _evaluate(objective, cands)
    order = np.argsort(values, kind="stable")[:top_k]
    avg = cands[order].mean(0)
    avg = project(avg[None, :], constraints.lo, constraints.hi)[0]  # only rounding to fix
    avg_value = float(_evaluate(objective, avg[None, :])[0])
    best_w, best_v = avg, avg_value
    evaluated = samples + 1
    refined = False
    # An improvement must beat rounding, measured against the spread of the sampled objectives
    # (an absolute 1e-12 ignored every improvement of a target in tiny units).
    spread = float(np.ptp(values)) or abs(best_v)
    tol = 1e-12 * spread
    rng = np.random.default_rng([seed, 1])
    step = 0.05
    noise = _rows(refine_batch if refine_steps else 0, K, "refine_batch")
    for _ in range(refine_steps):
        rng.standard_normal(out=noise)  # rng.normal(0, step) draws the same, then scales
        noise *= step
        noise -= noise.mean(1, keepdims=True)  # stay on the Σw = 1 plane before projecting
        prop = project(best_w[None, :] + noise, constraints.lo, constraints.hi)
        v = _evaluate(objective, prop)
        evaluated += refine_batch
        j = int(np.argmin(v))
        if v[j] < best_v - tol:
            best_w, best_v, refined = prop[j], float(v[j]), True
        else:
            step *= 0.7
            if step < 1e-4:
                break
    return SearchResult(weights=best_w, objective=best_v, top_k=cands[order],
                        top_k_objective=values[order], averaged_objective=avg_value,
                        refined=refined, evaluated=evaluated,
                        candidates=cands if keep_candidates else None,
                        candidate_objective=values if keep_candidates else None)


def _rows(n: int, K: int, what: str) -> np.ndarray:
    """An empty ``(n, K)`` float64 array; a size no allocation can take is a ValueError naming
    ``what`` (numpy's MemoryError, or its "array is too big", named no argument)."""
    try:
        return np.empty((n, K))
    except (MemoryError, ValueError):
        raise ValueError(f"{what}={n:,} mixtures of {K} domains need {n * K * 8 / 2**30:,.1f} "
                         "GiB, more than can be allocated here") from None


def _evaluate(objective: Objective, W: np.ndarray, what: str = "objective") -> np.ndarray:
    v = np.asarray(objective(W))
    # Only numbers: asarray(float64) also read strings ("0.25") and bools (a comparison
    # returned by mistake), and minimised those.
    if v.dtype.kind == "O":
        bad = next((x for x in v.flat
                    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real)), None)
        if bad is not None:
            raise TypeError(f"{what} must return real numbers, got a {type(bad).__name__} "
                            f"({reprlib.repr(bad)}) among its values")
    elif v.dtype.kind not in "iuf":
        raise TypeError(f"{what} must return real numbers, got an array of dtype {v.dtype}")
    v = v.astype(np.float64, copy=False).ravel()
    if v.shape != (W.shape[0],):
        raise ValueError(f"{what} returned {v.size} values for {W.shape[0]} mixtures")
    if not np.isfinite(v).all():
        raise ValueError(f"{what} returned NaN/inf")
    return v
