"""Predict a run's metric from its mixture: ridge, gradient-boosted trees, the mixing law.

Every predictor has ``fit(X, y) -> self`` and ``predict(X) -> y`` where ``X`` is ``(runs,
domains)`` weights and ``y`` one metric per run; ``min_runs(num_domains)`` says how many runs it
needs, and fitting fewer raises a ValueError that says so.  Everything is seeded.

- :class:`RidgePredictor`: linear regression with an L2 penalty chosen by K-fold CV.
- :class:`TreePredictor`: gradient-boosted trees (LightGBM when installed, else scikit-learn's
  HistGradientBoostingRegressor), RegMix's settings by default; optionally boosted from the
  mixing law's prediction (``base="law"``) and with its size chosen by CV on the training rows.
- :class:`MixingLawPredictor`: ``y = c + k·exp(tᵀr)`` (Ye et al. 2024), Huber loss, L-BFGS from
  many starts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import reprlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import optimize, stats

from fastmix._checks import flag, real_number

from .search import _integer, _seed

__all__ = [
    "Predictor",
    "RidgePredictor",
    "TreePredictor",
    "MixingLawPredictor",
    "make_predictor",
    "evaluate",
    "cross_validate",
    "PREDICTORS",
]


def evaluate(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Spearman ρ, Pearson r and mean absolute error of predictions on held-out runs."""
    y_true = np.asarray(y_true, dtype=np.float64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.float64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} values but y_pred has {y_pred.size}")
    if y_true.size < 3:
        raise ValueError(f"need at least 3 held-out runs to evaluate, got {y_true.size}")
    if not (np.isfinite(y_true).all() and np.isfinite(y_pred).all()):
        raise ValueError("y_true and y_pred must be finite")
    # Constant up to rounding (a predictor fitted on a constant target varies by ~1e-16): no
    # ranking to report, where spearmanr would rank the rounding noise.
    scale = max(float(np.abs(y_true).max()), float(np.abs(y_pred).max()))
    constant = _flat(y_true, scale) or _flat(y_pred, scale)
    rho = 0.0 if constant else float(stats.spearmanr(y_true, y_pred)[0])
    r = 0.0 if constant else float(stats.pearsonr(y_true, y_pred)[0])
    return {"spearman": rho, "pearson": r, "mae": float(np.mean(np.abs(y_true - y_pred)))}


def _flat(v: np.ndarray, scale: float) -> bool:
    # Relative to the values' own scale: an absolute floor of 1 called every target in tiny
    # units (1e-200) constant and reported no ranking.
    return bool(np.ptp(v) <= 1e-12 * scale)


def _exponent(y: np.ndarray) -> int:
    """``e`` with ``max|y| < 2**e``: ``np.ldexp(y, -e)`` is exact and at most 1 in size.

    Fits work on those values and scale results back with ``np.ldexp(·, e)``: squares and
    standard deviations of raw targets over- or underflow (1e160, 1e-200), and LightGBM keeps
    labels as float32 (1e39 is inf, 1e-38 rounds away).  A power of two changes no digit, so
    targets of ordinary size fit exactly as before.
    """
    return int(np.frexp(np.abs(y).max())[1]) if y.size else 0


def _check_xy(X: Any, y: Any, min_runs: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"{name}: X must be (runs, domains), got shape {X.shape}")
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(f"{name}: y must be one value per run ({X.shape[0]}), got shape "
                         f"{y.shape}")
    if not (np.isfinite(X).all() and np.isfinite(y).all()):
        raise ValueError(f"{name}: X and y must be finite (found NaN/inf)")
    if X.shape[0] < min_runs:
        raise ValueError(f"{name}: too few runs ({X.shape[0]}) for {X.shape[1]} domains; this "
                         f"predictor needs at least {min_runs}")
    return X, y


def _check_x(X: Any, num_domains: int | None, name: str) -> np.ndarray:
    if num_domains is None:
        raise RuntimeError(f"{name}: call fit() before predict()")
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[None, :]
    if X.ndim != 2 or X.shape[1] != num_domains:
        raise ValueError(f"{name}: X must be (n, {num_domains}), got shape {X.shape}")
    return X


def single_threaded() -> contextlib.AbstractContextManager[Any]:
    """Limit BLAS and OpenMP to one thread while fitting (a no-op without threadpoolctl).

    The fits are thousands of tiny BLAS calls (a 512×17 matrix-vector product, L-BFGS-B's
    vector updates) or small tree builds; on a busy machine the worker threads wait for cores
    and every call pays for it: the RegMix mixing-law fit took 26 s instead of 0.75 s on 2
    shared cores.  One thread also makes the results independent of the core count.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    return np.array_split(np.random.default_rng(seed).permutation(n), k)


class Predictor:
    """Base class: ``fit(X, y)``, ``predict(X)``, ``min_runs(num_domains)``, ``name``."""

    name = "predictor"

    def min_runs(self, num_domains: int) -> int:  # pragma: no cover - overridden
        """The fewest runs a fit on ``num_domains`` domains needs."""
        raise NotImplementedError

    def fit(self, X: np.ndarray, y: np.ndarray) -> Predictor:  # pragma: no cover
        """Fit ``(runs, K)`` mixtures ``X`` to ``(runs,)`` values ``y``; returns self."""
        raise NotImplementedError

    def predict(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover
        """Predicted values ``(n,)`` for ``(n, K)`` mixtures."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Settings and fitted values worth recording next to the weights."""
        return {"name": self.name}


class RidgePredictor(Predictor):
    """Ridge regression ``y ≈ b + wᵀx`` with α chosen by K-fold CV (mean squared error).

    Features are standardised before the penalty so α means the same for every domain; all
    α are solved at once from one SVD per fold.

    Args:
        alphas: the candidate penalties (default: 41 values from 1e-6 to 1e4, log-spaced).
        folds: K of the K-fold CV (>= 2).
        seed: seeds the folds.
    """

    name = "linear"

    def __init__(self, alphas: Sequence[float] | None = None, folds: int = 5,
                 seed: int = 0) -> None:
        alphas = np.asarray(np.logspace(-6, 4, 41) if alphas is None else alphas)
        if alphas.dtype.kind not in "iuf":
            raise TypeError(f"alphas must be numbers, got {reprlib.repr(alphas.tolist())}")
        self.alphas = alphas.astype(np.float64)
        # NaN compared False everywhere and silently fitted a constant; 0 is plain least squares.
        if (self.alphas.ndim != 1 or self.alphas.size == 0 or not np.isfinite(self.alphas).all()
                or (self.alphas < 0).any()):
            raise ValueError("alphas must be a non-empty list of finite non-negative numbers")
        folds = _integer(folds, "folds")
        if folds < 2:
            raise ValueError(f"folds must be >= 2, got {folds}")
        self.folds, self.seed = folds, _seed(seed)
        self.alpha_: float | None = None
        self.coef_: np.ndarray | None = None
        self.intercept_ = 0.0
        self._k: int | None = None

    def min_runs(self, num_domains: int) -> int:
        return 2 * self.folds

    @staticmethod
    def _solve(X: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, ...]:
        mu, sd = X.mean(0), X.std(0)
        # A domain at one weight in every run varies only by renormalisation rounding (sd ~1e-17):
        # standardising that noise gave it coefficients of ~1e13.  Treat it as constant.
        constant = sd <= 1e-12 * np.maximum(1.0, np.abs(mu))
        sd = np.where(constant, 1.0, sd)
        X = np.where(constant[None, :], mu[None, :], X)
        Z = (X - mu) / sd
        ym = y.mean()
        U, s, Vt = np.linalg.svd(Z, full_matrices=False)
        denom = s[None, :] ** 2 + alphas[:, None]
        # (alphas, rank); a zero singular value (a constant column) with alpha 0 gives 0, not NaN
        d = np.divide(s[None, :], denom, out=np.zeros_like(denom), where=denom > 0)
        W = (d * (U.T @ (y - ym))[None, :]) @ Vt  # (alphas, domains) in standardised units
        coef = W / sd[None, :]
        return coef, ym - coef @ mu

    def fit(self, X: np.ndarray, y: np.ndarray) -> RidgePredictor:
        X, y = _check_xy(X, y, self.min_runs(np.shape(X)[-1]), self.name)
        with single_threaded():
            return self._fit(X, y)

    def _fit(self, X: np.ndarray, y: np.ndarray) -> RidgePredictor:
        e = _exponent(y)
        y = np.ldexp(y, -e)  # squared errors of 1e160 overflowed: every alpha scored inf
        err = np.zeros(self.alphas.size)
        for val in _folds(len(y), self.folds, self.seed):
            tr = np.setdiff1d(np.arange(len(y)), val)
            coef, b = self._solve(X[tr], y[tr], self.alphas)
            err += ((X[val] @ coef.T + b[None, :] - y[val, None]) ** 2).sum(0)
        best = int(np.argmin(err))  # first (smallest α) on ties
        self.alpha_ = float(self.alphas[best])
        coef, b = self._solve(X, y, self.alphas[best : best + 1])
        self.coef_, self.intercept_ = np.ldexp(coef[0], e), float(np.ldexp(b[0], e))
        self._k = X.shape[1]
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = _check_x(X, self._k, self.name)
        return X @ self.coef_ + self.intercept_

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "alpha": self.alpha_}


class MixingLawPredictor(Predictor):
    """The mixing law ``y = c + k·exp(tᵀr)`` fitted with a Huber loss by L-BFGS from many starts.

    Because mixture rows sum to 1, ``k`` and a shift of ``t`` are one degree of freedom; the
    fit uses ``y = c + s·exp(uᵀr)`` (``s = ±1``) and reports ``t = u - mean(u)``,
    ``k = s·exp(mean(u))``.

    Two stages: every start is fitted with a Huber threshold of one standard deviation of
    ``y``; the best fit is then refined with the threshold at ``delta`` robust standard
    deviations of its residuals (1.4826·MAD), so residuals beyond it count linearly and a few
    broken runs do not pull the fit.

    Args:
        starts: number of L-BFGS starts: a log-linear fit for each sign ``s``, then random
            starts with the sign that fitted better; the lowest loss wins.
        delta: Huber threshold in robust residual standard deviations (1.345 is the classic
            choice: 95% efficiency under Gaussian noise).
        sign: force ``s`` (+1 when ``y`` grows with ``exp``, e.g. losses) or ``None`` for both.
        seed: seeds the random starts.
        max_iter: most L-BFGS iterations per fit (each start, and the refit).
    """

    name = "law"

    def __init__(self, starts: int = 16, delta: float = 1.345, sign: int | None = None,
                 seed: int = 0, max_iter: int = 500) -> None:
        starts, max_iter = _integer(starts, "starts"), _integer(max_iter, "max_iter")
        if starts < 1:
            raise ValueError(f"starts must be >= 1, got {starts}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        delta = real_number(delta, "delta")
        if not (np.isfinite(delta) and delta > 0):
            raise ValueError(f"delta must be finite and > 0, got {delta}")
        if sign is not None and (isinstance(sign, (bool, np.bool_)) or sign not in (1, -1)):
            raise ValueError(f"sign must be None, 1 or -1, got {sign!r}")
        self.starts, self.delta, self.sign, self.seed = starts, delta, sign, _seed(seed)
        self.max_iter = max_iter
        self.c_: float | None = None
        self.k_: float | None = None
        self.t_: np.ndarray | None = None
        self.loss_: float | None = None
        self._k: int | None = None

    def min_runs(self, num_domains: int) -> int:
        return num_domains + 3  # K + 2 parameters, plus one to spare

    @staticmethod
    def _objective(p: np.ndarray, X: np.ndarray, y: np.ndarray, s: float,
                   delta: float) -> tuple[float, np.ndarray]:
        c, u = p[0], p[1:]
        # A wild line-search step can overflow; inf tells L-BFGS to step back.
        with np.errstate(over="ignore", invalid="ignore"):
            e = s * np.exp(np.clip(X @ u, -700, 700))
            r = c + e - y  # y is standardised (see _fit)
            a = np.abs(r)
            quad = a <= delta
            loss = np.where(quad, 0.5 * r * r, delta * (a - 0.5 * delta)).mean()
            g = np.where(quad, r, delta * np.sign(r)) / len(y)
            return float(loss), np.concatenate([[g.sum()], X.T @ (g * e)])

    def fit(self, X: np.ndarray, y: np.ndarray) -> MixingLawPredictor:
        X, y = _check_xy(X, y, self.min_runs(np.shape(X)[-1]), self.name)
        with single_threaded():
            return self._fit(X, y)

    def _fit(self, X: np.ndarray, y: np.ndarray) -> MixingLawPredictor:
        K = X.shape[1]
        # Fit the standardised target, then map c and k back: in raw units c's gradient shrinks
        # with the target's scale and L-BFGS stopped early (losses x1000, accuracies with a
        # spread of 0.002: errors of 1-10% of the range instead of ~1e-6).  Scaled by a power
        # of two first: y.std() of raw targets overflows (1e160) or underflows (1e-200).
        e = _exponent(y)
        y = np.ldexp(y, -e)
        mean, spread = float(y.mean()), float(y.std()) or 1.0
        y = (y - mean) / spread
        rng = np.random.default_rng(self.seed)
        signs = [self.sign] if self.sign is not None else [1, -1]

        def run(s: float, p0: np.ndarray, delta: float) -> tuple[float, float, np.ndarray]:
            res = optimize.minimize(self._objective, p0, args=(X, y, s, delta),
                                    jac=True, method="L-BFGS-B",
                                    options={"maxiter": self.max_iter})
            return float(res.fun), float(s), res.x

        fits = []
        for s in signs:
            # Log-linear start: pick c beyond the data, regress log(s·(y - c)) on r.
            c0 = y.min() - 0.5 if s > 0 else y.max() + 0.5
            z = np.log(np.maximum(s * (y - c0), 1e-12))
            u0 = np.linalg.lstsq(X, z, rcond=None)[0]
            fits.append(run(s, np.concatenate([[c0], u0]), 1.0))
        fits = [f for f in fits if np.isfinite(f[0])]
        s_best = min(fits, key=lambda f: f[0])[1] if fits else signs[0]
        for _ in range(max(0, self.starts - len(signs))):
            c0 = (y.min() if s_best > 0 else y.max()) - s_best * rng.uniform(0.05, 3.0)
            u0 = np.log(rng.uniform(0.2, 3.0)) + rng.normal(0.0, 1.0, K)
            f = run(s_best, np.concatenate([[c0], u0]), 1.0)
            if np.isfinite(f[0]):
                fits.append(f)
        if not fits:
            raise ValueError(f"{self.name}: every start diverged; the target may not follow "
                             "c + k·exp(tᵀr)")
        _, s, p = min(fits, key=lambda f: f[0])
        # Stage 2: Huber threshold from the robust scale of the best fit's residuals.
        resid = p[0] + s * np.exp(np.clip(X @ p[1:], -700, 700)) - y
        robust = 1.4826 * np.median(np.abs(resid - np.median(resid)))
        refined = run(s, p, max(self.delta * robust, 1e-4))
        best = refined if np.isfinite(refined[0]) else (float("nan"), s, p)
        self.loss_, s, p = best
        u = p[1:]
        self.c_ = float(np.ldexp(mean + spread * float(p[0]), e))
        self.t_ = u - u.mean()
        self.k_ = float(np.ldexp(spread * float(s * np.exp(u.mean())), e))
        self._k = K
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = _check_x(X, self._k, self.name)
        return self.c_ + self.k_ * np.exp(np.clip(X @ self.t_, -700, 700))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "c": self.c_, "k": self.k_,
                "t": None if self.t_ is None else [float(v) for v in self.t_],
                "huber_loss": self.loss_}


def _installed(module: str) -> bool:
    # find_spec, not import: scikit-learn takes a second to import, and this runs per predictor.
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken package, or one set to None in sys.modules
        return False


def _have_lightgbm() -> bool:
    return _installed("lightgbm")


def _have_sklearn() -> bool:
    return _installed("sklearn")


# Bounds of the integer tree settings: LightGBM's (its counts are C ints, num_leaves at most
# 131072), which scikit-learn's equivalents also accept.
_INT32_MAX = 2**31 - 1
_TREE_BOUNDS = {"n_estimators": (1, _INT32_MAX), "num_leaves": (2, 131072),
                "min_child_samples": (1, _INT32_MAX)}


def _tree_setting(value: Any, name: str, what: str | None = None) -> int:
    """Setting ``name`` as an integer within its bounds; errors say ``what`` (default name)."""
    what = name if what is None else what
    low, high = _TREE_BOUNDS[name]
    v = _integer(value, what)
    if not low <= v <= high:
        raise ValueError(f"{what} must lie in [{low}, {high}], got {v}")
    return v


# What to do when neither tree library is installed (they are the "trees" extra).
_TREES_MISSING = ('needs LightGBM or scikit-learn and neither is installed: pip install '
                 '"fastmix[trees]", or choose the predictor "law" or "linear" '
                 '(fastmix optimize --predictor law|linear)')


class TreePredictor(Predictor):
    """Gradient-boosted trees on the mixture weights (RegMix's regressor).

    Defaults are RegMix's published LightGBM settings (1000 rounds, learning rate 0.01, seed
    42) without their early stopping on the evaluation rows: the number of rounds is fixed, or
    chosen together with the tree size by K-fold CV on the training rows when ``tune=True``.

    Args:
        n_estimators, learning_rate, num_leaves, min_child_samples: boosting settings.
        base: ``"law"`` boosts from a :class:`MixingLawPredictor` fitted first (the trees model
            its residuals), which extrapolates better to mixtures the sweep covers sparsely;
            ``None`` boosts from the mean.
        tune: choose ``(n_estimators, num_leaves, min_child_samples)`` from ``grid`` by
            ``folds``-fold CV Spearman ρ on the training rows.
        backend: ``"lightgbm"``, ``"sklearn"`` or ``"auto"`` (LightGBM when installed).
        seed: seeds the trees, the folds and the law's starts.
    """

    DEFAULT_GRID = {"n_estimators": (500, 1000, 2000), "num_leaves": (7, 15, 31),
                    "min_child_samples": (5, 20)}

    def __init__(self, n_estimators: int = 1000, learning_rate: float = 0.01,
                 num_leaves: int = 31, min_child_samples: int = 20, base: str | None = None,
                 tune: bool = False, grid: dict[str, Sequence[int]] | None = None,
                 folds: int = 5, backend: str = "auto", seed: int = 42) -> None:
        if backend not in ("auto", "lightgbm", "sklearn"):
            raise ValueError(f"backend must be 'auto', 'lightgbm' or 'sklearn', got {backend!r}")
        # ImportError for either missing library, as for "auto" (a ValueError for this one
        # alone escaped an `except ImportError` fallback).
        if backend == "lightgbm" and not _have_lightgbm():
            raise ImportError("backend='lightgbm' but lightgbm is not installed: pip install "
                              '"fastmix[trees]"', name="lightgbm")
        if backend == "sklearn" and not _have_sklearn():
            raise ImportError("backend='sklearn' but scikit-learn is not installed: pip "
                              'install "fastmix[trees]"', name="sklearn")
        if backend == "auto" and not (_have_lightgbm() or _have_sklearn()):
            # Said here, not as a ModuleNotFoundError halfway through fitting.
            label = "law+trees" if base == "law" else "trees"
            raise ImportError(f"predictor {label!r} {_TREES_MISSING}", name="sklearn")
        if base not in (None, "law"):
            raise ValueError(f"base must be None or 'law', got {base!r}")
        lr = real_number(learning_rate, "learning_rate")
        # A step above 1 overshoots every round: inf or 1e308 gave predictions of ±1e307.
        if not 0 < lr <= 1:
            raise ValueError(f"learning_rate must lie in (0, 1], got {learning_rate}")
        self.backend = ("lightgbm" if _have_lightgbm() else "sklearn") if backend == "auto" \
            else backend
        self.params = {"n_estimators": _tree_setting(n_estimators, "n_estimators"),
                       "learning_rate": lr, "num_leaves": _tree_setting(num_leaves, "num_leaves"),
                       "min_child_samples": _tree_setting(min_child_samples,
                                                          "min_child_samples")}
        folds = _integer(folds, "folds")
        if folds < 2:
            raise ValueError(f"folds must be >= 2, got {folds}")
        # bool("no") is True: tuning (minutes of CV) ran on any value
        self.base, self.tune, self.folds = base, flag(tune, "tune"), folds
        self.seed = _seed(seed)
        if grid is not None and not isinstance(grid, Mapping):
            raise TypeError(f"grid must be a mapping {{setting: values}}, got "
                            f"{type(grid).__name__}")
        self.grid = dict(self.DEFAULT_GRID if grid is None else grid)
        unknown = set(self.grid) - set(_TREE_BOUNDS)
        if unknown:
            raise ValueError(f"grid: unknown settings {sorted(unknown)}")
        # Checked here: an empty list failed after fitting every fold (best stayed None) and
        # a value out of range as a bare LightGBMError.
        for name, values in self.grid.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
                raise TypeError(f"grid[{name!r}] must be a list of integers, got {values!r}")
            if len(values) == 0:
                raise ValueError(f"grid[{name!r}] is empty; give at least one value")
            self.grid[name] = tuple(_tree_setting(v, name, f"grid[{name!r}]") for v in values)
        self.name = "law+trees" if base == "law" else "trees"
        self.cv_scores_: dict[str, float] | None = None
        self._model: Any = None
        self._law: MixingLawPredictor | None = None
        self._k: int | None = None

    def min_runs(self, num_domains: int) -> int:
        need = 10  # below ~10 runs a boosted tree cannot split meaningfully
        if self.base == "law":
            need = max(need, MixingLawPredictor().min_runs(num_domains))
        if self.tune:
            # every CV training part (a (folds-1)/folds share) must be fittable too
            need = max(4 * self.folds, -(-need * self.folds // (self.folds - 1)) + 1)
        return need

    def _new_model(self, params: dict[str, Any], n: int) -> Any:
        # Leaves need min_child_samples rows; shrink it on tiny sweeps rather than never split.
        mcs = max(1, min(params["min_child_samples"], n // 4))
        if self.backend == "lightgbm":
            import lightgbm

            return lightgbm.LGBMRegressor(
                objective="regression", n_estimators=params["n_estimators"],
                learning_rate=params["learning_rate"], num_leaves=params["num_leaves"],
                min_child_samples=mcs, random_state=self.seed, deterministic=True,
                force_row_wise=True, n_jobs=1, verbose=-1)
        from sklearn.ensemble import HistGradientBoostingRegressor

        return HistGradientBoostingRegressor(
            max_iter=params["n_estimators"], learning_rate=params["learning_rate"],
            max_leaf_nodes=params["num_leaves"], min_samples_leaf=mcs, early_stopping=False,
            # scikit-learn takes seeds below 2**32 only; smaller seeds are unchanged.
            l2_regularization=0.0, random_state=self.seed % 2**32)

    def _fit_law(self, X: np.ndarray, y: np.ndarray) -> MixingLawPredictor | None:
        return MixingLawPredictor(seed=self.seed).fit(X, y) if self.base == "law" else None

    def _fit_once(self, X: np.ndarray, y: np.ndarray, params: dict[str, Any],
                  law: MixingLawPredictor | None) -> Callable[[np.ndarray], np.ndarray]:
        resid = y if law is None else y - law.predict(X)
        e = _exponent(resid)  # LightGBM's float32 labels hold neither 1e39 nor 1e-38 * y
        model = self._new_model(params, len(y)).fit(X, np.ldexp(resid, -e))

        def predict(Z: np.ndarray) -> np.ndarray:
            out = np.ldexp(model.predict(Z), e)
            return out + law.predict(Z) if law is not None else out

        predict.model, predict.law = model, law  # type: ignore[attr-defined]
        return predict

    def fit(self, X: np.ndarray, y: np.ndarray) -> TreePredictor:
        X, y = _check_xy(X, y, self.min_runs(np.shape(X)[-1]), self.name)
        with single_threaded():
            return self._fit(X, y)

    def _fit(self, X: np.ndarray, y: np.ndarray) -> TreePredictor:
        params = dict(self.params)
        if self.tune:
            keys = sorted(self.grid)
            scores: dict[str, float] = {}
            folds = _folds(len(y), self.folds, self.seed)
            train_rows = [np.setdiff1d(np.arange(len(y)), val) for val in folds]
            # The law does not depend on the tree settings: fit it once per fold.
            laws = [self._fit_law(X[tr], y[tr]) for tr in train_rows]
            best, best_score = None, -np.inf
            for values in itertools.product(*(self.grid[k] for k in keys)):
                cand = dict(params, **dict(zip(keys, values, strict=True)))
                pred = np.empty_like(y)
                for val, tr, law in zip(folds, train_rows, laws, strict=True):
                    pred[val] = self._fit_once(X[tr], y[tr], cand, law)(X[val])
                # A constant prediction or target has no rank correlation (scipy warns, gives
                # nan): no setting ranks better then.
                ranked = np.ptp(pred) > 0 and np.ptp(y) > 0
                score = float(stats.spearmanr(pred, y)[0]) if ranked else -1.0
                scores[",".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))] = score
                if score > best_score:
                    best, best_score = cand, score
            params, self.cv_scores_ = best, scores
        self.params_ = params
        fitted = self._fit_once(X, y, params, self._fit_law(X, y))
        self._model, self._law, self._predict = fitted.model, fitted.law, fitted
        self._k = X.shape[1]
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = _check_x(X, self._k, self.name)
        with single_threaded():
            return self._predict(X)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "backend": self.backend,
                               "params": getattr(self, "params_", self.params)}
        if self.cv_scores_ is not None:
            out["cv_spearman_best"] = max(self.cv_scores_.values())
        if self._law is not None:
            out["law"] = self._law.describe()
        return out


PREDICTORS = ("linear", "trees", "law", "law+trees")


def make_predictor(name: str, *, seed: int = 0, tune: bool = False, **kwargs: Any) -> Predictor:
    """A predictor by name: ``linear``, ``trees``, ``law`` or ``law+trees``.

    ``tune`` chooses the tree settings by CV on the training rows (trees only); ``seed`` seeds
    the predictor (the trees get ``42 + seed``: RegMix's seed 42 at the default); other keyword
    arguments go to the constructor.
    """
    tune = flag(tune, "tune")  # (also for the predictors without trees, which ignore it)
    if name == "linear":
        return RidgePredictor(seed=seed, **kwargs)
    if name == "law":
        return MixingLawPredictor(seed=seed, **kwargs)
    if name in ("trees", "law+trees"):
        return TreePredictor(base="law" if name == "law+trees" else None, tune=tune,
                             seed=42 + seed, **kwargs)
    raise ValueError(f"unknown predictor {name!r}; choose one of {', '.join(PREDICTORS)}")


def cross_validate(factory: Callable[[], Predictor], X: np.ndarray, y: np.ndarray,
                   folds: int = 5, seed: int = 0) -> dict[str, float]:
    """Out-of-fold predictions for every run, scored with :func:`evaluate`."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    folds, seed = _integer(folds, "folds"), _seed(seed)
    if folds < 2 or folds > len(y):
        raise ValueError(f"folds must lie in [2, runs={len(y)}], got {folds}")
    pred = np.empty_like(y)
    for val in _folds(len(y), folds, seed):
        tr = np.setdiff1d(np.arange(len(y)), val)
        pred[val] = factory().fit(X[tr], y[tr]).predict(X[val])
    return evaluate(y, pred)
