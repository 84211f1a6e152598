"""Per-domain scaling laws ``L(n) = E + A·n^(−α)``: extrapolate a domain's loss to more tokens.

Fitted like Chinchilla's: a Huber loss on ``log L`` (robust to a noisy early point), L-BFGS-B
from a grid of starts, ``E`` bounded to ``[0, min(loss))`` and ``α`` to ``(0, 3]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize

from fastmix._checks import real_number

from .predictors import single_threaded
from .search import _numbers, _seed

__all__ = ["ScalingLaw", "fit_scaling_law", "fit_domain_laws"]


@dataclass(frozen=True)
class ScalingLaw:
    """``L(n) = E + A·n^(−α)`` with ``n`` in the same unit as the fit (e.g. tokens).

    ``alpha`` is α; ``huber_loss`` is the Huber loss of the fit (on log residuals).
    """

    E: float
    A: float
    alpha: float
    huber_loss: float = 0.0

    def __call__(self, n: float | np.ndarray) -> float | np.ndarray:
        """The predicted loss at ``n``: a float for a scalar ``n``, else an array of its shape."""
        n = np.asarray(n, dtype=np.float64)
        if (n <= 0).any():
            raise ValueError("n must be > 0")
        return self.E + self.A * np.power(n, -self.alpha)


def fit_scaling_law(tokens: Sequence[float] | np.ndarray, loss: Sequence[float] | np.ndarray,
                    *, delta: float = 1e-3, seed: int = 0) -> ScalingLaw:
    """Fit ``L(n) = E + A·n^(−α)`` to one loss curve.

    Args:
        tokens: tokens seen (> 0) at each point, at least 4 distinct points.
        loss: the loss there (> 0).
        delta: Huber threshold on ``log L`` residuals (Chinchilla used 1e-3).
        seed: seeds the jittered starts.
    """
    n = _numbers(tokens, "tokens").ravel()
    y = _numbers(loss, "loss").ravel()
    delta = real_number(delta, "delta")
    seed = _seed(seed)
    if n.shape != y.shape:
        raise ValueError(f"tokens has {n.size} points but loss has {y.size}")
    if not (np.isfinite(n).all() and np.isfinite(y).all()):
        raise ValueError("tokens and loss must be finite")
    if (n <= 0).any() or (y <= 0).any():
        raise ValueError("tokens and loss must be > 0")
    if np.unique(n).size < 4:
        raise ValueError(f"need at least 4 distinct token counts for 3 parameters, got "
                         f"{np.unique(n).size}")
    if not (np.isfinite(delta) and delta > 0):
        raise ValueError(f"delta must be finite and > 0, got {delta}")
    # Work in log n scaled to O(1), and in units of the smallest loss, so L-BFGS sees a
    # well-conditioned problem whatever the units: in raw units E's gradient shrinks with the
    # loss's scale and the fit stopped early (losses x1000: L(1e12) off by 3.4%).
    x = np.log(n)
    x0 = float(x.min())
    unit = float(y.min())
    y = y / unit
    logy = np.log(y)
    ymin = 1.0

    def objective(p: np.ndarray) -> tuple[float, np.ndarray]:
        E, a, alpha = p  # L = E + exp(a − α·(x − x0))
        pw = np.exp(a - alpha * (x - x0))
        pred = E + pw
        r = np.log(pred) - logy
        ab = np.abs(r)
        quad = ab <= delta
        loss = np.where(quad, 0.5 * r * r, delta * (ab - 0.5 * delta)).sum()
        g = np.where(quad, r, delta * np.sign(r)) / pred
        return float(loss), np.array([g.sum(), (g * pw).sum(), -(g * pw * (x - x0)).sum()])

    rng = np.random.default_rng(seed)
    with single_threaded():
        best = _fit_starts(objective, y, n, ymin, rng)
    if best is None:
        raise ValueError("scaling-law fit diverged from every start")
    E, a, alpha = best.x
    # exp(a − α(x − x0)) = exp(a + α·x0)·n^(−α), back in the loss's units
    return ScalingLaw(E=float(E) * unit, A=float(np.exp(a + alpha * x0)) * unit,
                      alpha=float(alpha), huber_loss=float(best.fun))


def _fit_starts(objective: Any, y: np.ndarray, n: np.ndarray, ymin: float,
                rng: np.random.Generator) -> Any:
    best = None
    bounds = [(0.0, ymin * (1 - 1e-9)), (-30.0, 30.0), (1e-4, 3.0)]
    for e_frac, alpha0 in [(f, a) for f in (0.0, 0.5, 0.8, 0.95) for a in (0.1, 0.3, 0.7, 1.5)]:
        E0 = e_frac * ymin
        a0 = np.log(max(y[np.argmin(n)] - E0, 1e-9)) + rng.normal(0, 0.01)
        res = optimize.minimize(objective, np.array([E0, a0, alpha0]), jac=True,
                                method="L-BFGS-B", bounds=bounds)
        if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
            best = res
    return best


def fit_domain_laws(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
                    delta: float = 1e-3, seed: int = 0) -> dict[str, ScalingLaw]:
    """Fit one law per domain from ``curves``, ``{domain: (tokens, loss)}``; errors name the
    domain.  ``delta`` and ``seed`` as in :func:`fit_scaling_law`."""
    if not isinstance(curves, Mapping):  # a list of pairs failed on .items()
        raise TypeError(f"curves must be a mapping {{domain: (tokens, loss)}}, got "
                        f"{type(curves).__name__}")
    out: dict[str, ScalingLaw] = {}
    for name, curve in curves.items():
        if (isinstance(curve, (str, bytes)) or not isinstance(curve, (Sequence, np.ndarray))
                or len(curve) != 2):
            raise TypeError(f"domain {name!r}: expected a pair (tokens, loss), got "
                            f"{type(curve).__name__}")
        try:
            out[name] = fit_scaling_law(*curve, delta=delta, seed=seed)
        except ValueError as exc:
            raise ValueError(f"domain {name!r}: {exc}") from exc
        except TypeError as exc:
            raise TypeError(f"domain {name!r}: {exc}") from exc
    return out
