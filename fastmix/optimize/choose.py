"""The whole offline recipe in one call: evaluate a predictor on held-out runs, refit, search."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastmix._checks import not_a_set, real_number

from .pareto import ParetoFront, pareto_search
from .predictors import Predictor, _exponent, evaluate, make_predictor
from .search import Constraints, SearchResult, _check_prior, _integer, _seed, search
from .sweep import Sweep

__all__ = ["Choice", "choose_weights"]


@dataclass
class Choice:
    """What :func:`choose_weights` found.

    Attributes:
        weights: ``{domain: weight}``, summing to 1, inside the constraints.
        predicted: each target's predicted value at ``weights``.
        heldout: per target, Spearman/Pearson/MAE on the held-out runs (empty without holdout).
        heldout_pred: per target, ``(observed, predicted)`` arrays on the held-out runs.
        predictors: per target, the predictor refitted on every run.
        search: the search result (top-k, objective).
        pareto: the front across targets (two or more targets), else ``None``.
        objective_weights: ``{target: weight}`` of the objective.
        maximize: ``{target: bool}``, True where higher is better.
        info: the settings of the run (predictor, tune, holdout, seed, samples, top_k).
    """

    weights: dict[str, float]
    predicted: dict[str, float]
    heldout: dict[str, dict[str, float]]
    heldout_pred: dict[str, tuple[np.ndarray, np.ndarray]]
    predictors: dict[str, Predictor]
    search: SearchResult
    pareto: ParetoFront | None
    objective_weights: dict[str, float]
    maximize: dict[str, bool]
    info: dict[str, Any] = field(default_factory=dict)


def choose_weights(
    sweep: Sweep,
    targets: Sequence[str] | Mapping[str, float],
    *,
    predictor: str = "law+trees",
    tune: bool = False,
    constraints: Constraints | None = None,
    maximize: Sequence[str] = (),
    prior: np.ndarray | Mapping[str, float] | None = None,
    holdout: float | None = 0.2,
    samples: int = 50_000,
    top_k: int = 100,
    pareto_samples: int = 20_000,
    seed: int = 0,
) -> Choice:
    """Choose mixture weights from a sweep.

    1. Split the runs (fixed ``seed``), fit one predictor per target on the training part and
       score it on the held-out part (skipped when ``holdout=0``).
    2. Refit on every run.
    3. Minimise ``Σ_j w_j · ±(pred_j − mean_j) / std_j`` (targets standardised over the sweep
       so weights compare; ``−`` for targets in ``maximize``) with :func:`search`.
    4. With two or more targets, also return the Pareto front of sampled mixtures.

    Args:
        sweep: the loaded sweep.
        targets: target names, or ``{target: weight}`` for a weighted objective.
        predictor: ``linear``, ``trees``, ``law`` or ``law+trees``.
        tune: choose tree settings by CV on the training rows.
        constraints: feasible set (default: the simplex over the sweep's domains).
        maximize: targets where higher is better (accuracies).
        prior: centre of the search's Dirichlet sampling (default: mean sweep mixture).
        holdout: fraction of runs held out for evaluation (0 or None to skip).
        samples, top_k: search settings (RegMix-style top-k average).
        pareto_samples: mixtures sampled for the Pareto front (two or more targets).
        seed: seeds the split, the predictors and the search.
    """
    # One name is one target, not one per character (as load_sweep's targets=): 'loss' was the
    # targets l, o, s, and maximize='loss' the same.
    if isinstance(targets, str):
        targets = [targets]
    if isinstance(maximize, str):
        maximize = [maximize]
    # the objective sums the targets in this order: a set's changes with PYTHONHASHSEED
    not_a_set(targets, "targets must be a list of names or a dict name -> weight")
    if isinstance(targets, Mapping):
        # float() took the string "2" and True as weights
        obj_w = {str(k): real_number(v, f"targets[{k!r}]") for k, v in targets.items()}
    else:
        obj_w = {str(t): 1.0 for t in targets}
    if not obj_w:
        raise ValueError("targets: give at least one target")
    for t, w in obj_w.items():
        if t not in sweep.targets:
            raise ValueError(f"targets: {t!r} is not a metric of the sweep; it has "
                             f"{sweep.targets[:8]}{' ...' if len(sweep.targets) > 8 else ''}")
        if not (np.isfinite(w) and w >= 0):
            raise ValueError(f"targets: weight of {t!r} must be >= 0, got {w}")
    if sum(obj_w.values()) <= 0:
        raise ValueError("targets: weights sum to 0")
    unknown = sorted(set(maximize) - set(obj_w))
    if unknown:
        raise ValueError(f"maximize: {unknown} are not among the targets")
    if constraints is None:
        constraints = Constraints(sweep.domains)
    if list(constraints.domains) != list(sweep.domains):
        raise ValueError("constraints: domains differ from the sweep's domains")
    names = list(obj_w)
    maxi = {t: t in set(maximize) for t in names}
    # Checked before any fitting, so a bad setting fails in milliseconds, not minutes.
    if prior is None:
        prior_vec = sweep.mixtures.mean(0)
    elif isinstance(prior, Mapping):
        unknown = sorted(set(prior) - set(sweep.domains))
        if unknown:
            raise ValueError(f"prior: unknown domains {unknown}")
        missing = [d for d in sweep.domains if d not in prior]
        if missing:
            raise ValueError(f"prior: no weight for domains {missing}")
        prior_vec = np.array([real_number(prior[d], f"prior[{d!r}]") for d in sweep.domains])
    else:
        prior_vec = prior
    prior_vec = _check_prior(prior_vec, sweep.num_domains)
    for what, value in (("samples", samples), ("top_k", top_k),
                        ("pareto_samples", pareto_samples)):
        if _integer(value, what) < 1:
            raise ValueError(f"{what} must be >= 1, got {value}")
    if top_k > samples:
        raise ValueError(f"top_k must lie in [1, samples={samples}], got {top_k}")
    seed = _seed(seed)
    # Checked here: Sweep.split's messages named its own argument, test_fraction.
    holdout = 0.0 if holdout is None else real_number(holdout, "holdout")  # None: no evaluation
    if holdout and not 0 < holdout < 1:
        raise ValueError(f"holdout must be 0 (no evaluation) or lie in (0, 1), got {holdout}")

    for t in names:
        _check_enough(make_predictor(predictor, seed=seed, tune=tune), sweep, t, "the sweep")
    heldout: dict[str, dict[str, float]] = {}
    heldout_pred: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if holdout:
        try:
            train, test = sweep.split(holdout, seed)
        except ValueError as exc:  # too few runs to hold any out
            raise ValueError(str(exc).replace("test_fraction", "holdout")) from None
        if test.num_runs < 3:
            raise ValueError(
                f"holdout={holdout} leaves {test.num_runs} of {sweep.num_runs} runs to evaluate "
                "on; at least 3 are needed (hold out more, or 0 to skip the evaluation)")
        for t in names:
            p = make_predictor(predictor, seed=seed, tune=tune)
            _check_enough(p, train, t, "the training part of the split")
            pred = p.fit(train.mixtures, train.target(t)).predict(test.mixtures)
            heldout[t] = evaluate(test.target(t), pred)
            heldout_pred[t] = (test.target(t).copy(), pred)

    fitted: dict[str, Predictor] = {}
    for t in names:
        p = make_predictor(predictor, seed=seed, tune=tune)
        _check_enough(p, sweep, t, "the sweep")
        fitted[t] = p.fit(sweep.mixtures, sweep.target(t))

    mean, std = {}, {}
    for t in names:
        # In units scaled by a power of two: the std of a target at 1e160 overflowed (its
        # z-scores were all 0) and at 1e-200 underflowed to 0.
        e = _exponent(sweep.target(t))
        y = np.ldexp(sweep.target(t), -e)
        mean[t] = float(np.ldexp(y.mean(), e))
        std[t] = float(np.ldexp(y.std(), e)) or 1.0
    single = len(names) == 1

    def objective(W: np.ndarray) -> np.ndarray:
        total = np.zeros(W.shape[0])
        for t in names:
            pred = fitted[t].predict(W)
            z = pred if single else (pred - mean[t]) / std[t]
            total += obj_w[t] * (-z if maxi[t] else z)
        return total

    result = search(objective, constraints, prior=prior_vec, samples=samples, top_k=top_k,
                    seed=seed)
    weights = result.as_dict(sweep.domains)
    predicted = {t: float(fitted[t].predict(result.weights[None, :])[0]) for t in names}

    front = None
    if len(names) >= 2:
        front = pareto_search([fitted[t].predict for t in names], names, constraints,
                              prior=prior_vec, samples=pareto_samples,
                              maximize=[maxi[t] for t in names],
                              include=np.vstack([result.weights, result.top_k]), seed=seed + 1)
    return Choice(weights=weights, predicted=predicted, heldout=heldout,
                  heldout_pred=heldout_pred, predictors=fitted, search=result, pareto=front,
                  objective_weights=obj_w, maximize=maxi,
                  info={"predictor": predictor, "tune": tune, "holdout": holdout, "seed": seed,
                        "samples": samples, "top_k": top_k})


def _check_enough(p: Predictor, sweep: Sweep, target: str, where: str) -> None:
    need = p.min_runs(sweep.num_domains)
    if sweep.num_runs < need:
        raise ValueError(
            f"too few runs for predictor {p.name!r} on target {target!r}: {where} has "
            f"{sweep.num_runs} runs for {sweep.num_domains} domains, it needs at least {need}")
