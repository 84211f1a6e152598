"""Choosing mixture weights offline, from a sweep of small runs.

- :func:`load_sweep` reads mixtures (runs × domains) and metrics (runs × targets) and checks
  that they align; :class:`Sweep` holds them.
- Predictors of a metric from a mixture: :class:`RidgePredictor` (``linear``),
  :class:`TreePredictor` (``trees``; ``law+trees`` boosts from the mixing law),
  :class:`MixingLawPredictor` (``law``); :func:`evaluate` scores held-out predictions.
- :func:`fit_scaling_law` / :func:`fit_domain_laws`: ``L(n) = E + A·n^(−α)`` per domain.
- :func:`search` finds the weights minimising a predicted objective under :class:`Constraints`
  (per-domain bounds, token availability); :func:`pareto_front` / :func:`pareto_search` for
  several objectives; :func:`weights_from_affinity` for single-domain ablations.
- :func:`choose_weights` runs the whole recipe; ``fastmix optimize`` is its command.
"""

from __future__ import annotations

from .ablation import weights_from_affinity
from .choose import Choice, choose_weights
from .laws import ScalingLaw, fit_domain_laws, fit_scaling_law
from .pareto import ParetoFront, pareto_front, pareto_search
from .predictors import (
    PREDICTORS,
    MixingLawPredictor,
    Predictor,
    RidgePredictor,
    TreePredictor,
    cross_validate,
    evaluate,
    make_predictor,
)
from .search import Constraints, SearchResult, project, sample_mixtures, search
from .sweep import Sweep, load_sweep

__all__ = [
    "PREDICTORS",
    "Choice",
    "Constraints",
    "MixingLawPredictor",
    "ParetoFront",
    "Predictor",
    "RidgePredictor",
    "ScalingLaw",
    "SearchResult",
    "Sweep",
    "TreePredictor",
    "choose_weights",
    "cross_validate",
    "evaluate",
    "fit_domain_laws",
    "fit_scaling_law",
    "load_sweep",
    "make_predictor",
    "pareto_front",
    "pareto_search",
    "project",
    "sample_mixtures",
    "search",
    "weights_from_affinity",
]
