"""fastmix.optimize: sweeps, predictors on planted laws, scaling laws, search, Pareto, ablations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import optimize as sopt

from fastmix.optimize import (
    Constraints,
    MixingLawPredictor,
    RidgePredictor,
    TreePredictor,
    choose_weights,
    cross_validate,
    evaluate,
    fit_domain_laws,
    fit_scaling_law,
    load_sweep,
    make_predictor,
    pareto_front,
    pareto_search,
    project,
    sample_mixtures,
    search,
    weights_from_affinity,
)


def _mixtures(n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(k, 0.7), size=n)


class FakeFrame:
    """Duck-typed DataFrame: ``columns`` and ``to_numpy()`` are all the loader uses."""

    def __init__(self, columns, data):
        self.columns = list(columns)
        self._data = np.asarray(data, dtype=object)

    def to_numpy(self):
        return self._data


# ----------------------------------------------------------------------------------- sweeps
def _write(path, header, rows):
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")


def test_load_sweep_aligns_by_id_and_renormalises(tmp_path):
    mix = tmp_path / "mix.csv"
    met = tmp_path / "met.csv"
    _write(mix, ["index", "a", "b", "c"], [[1, 0.5, 0.3, 0.2], [2, 0.334, 0.333, 0.333],
                                           [3, 0.0, 0.999, 0.0]])
    # metrics in a different order, plus a free-text column that is not a metric
    _write(met, ["index", "name", "loss"], [[3, "x", 3.0], [1, "y", 1.0], [2, "z", 2.0]])
    s = load_sweep(mix, met)
    assert s.domains == ["a", "b", "c"] and s.targets == ["loss"]
    assert s.run_ids == ["1", "2", "3"]
    np.testing.assert_allclose(s.target("loss"), [1.0, 2.0, 3.0])
    np.testing.assert_allclose(s.mixtures.sum(1), 1.0)
    np.testing.assert_allclose(s.mixtures[2], [0.0, 1.0, 0.0])
    rep = s.renormalization_report()
    assert rep["max_row_offset"] == pytest.approx(0.001)
    assert rep["rows_renormalized"] == 1


def test_load_sweep_from_frames_mappings_and_arrays():
    X = _mixtures(8, 3, 0)
    y = np.arange(8.0)
    frame = FakeFrame(["run", "p", "q", "r"], [[f"r{i}", *X[i]] for i in range(8)])
    metrics = {"run": [f"r{i}" for i in reversed(range(8))], "acc": y[::-1]}
    s = load_sweep(frame, metrics)
    np.testing.assert_allclose(s.target("acc"), y)
    s2 = load_sweep(X, y, domains=["p", "q", "r"], targets=["acc"])
    np.testing.assert_allclose(s2.mixtures, s.mixtures)
    train, test = s2.split(0.25, seed=1)
    assert train.num_runs == 6 and test.num_runs == 2
    assert sorted(np.concatenate([train.target("target_0") if False else train.target("acc"),
                                  test.target("acc")])) == list(y)


def test_load_sweep_bad_input(tmp_path):
    X = _mixtures(5, 3, 0)
    with pytest.raises(ValueError, match="misaligned rows: mixtures has 5 runs but metrics has 4"):
        load_sweep(X, np.ones(4))
    with pytest.raises(ValueError, match="misaligned rows: by id column 'run'"):
        load_sweep({"run": [1, 2], "a": [0.5, 1.0], "b": [0.5, 0.0]},
                   {"run": [1, 3], "m": [1.0, 2.0]})
    with pytest.raises(ValueError, match="repeats runs"):
        load_sweep({"run": [1, 1], "a": [0.5, 1.0], "b": [0.5, 0.0]},
                   {"run": [1, 1], "m": [1.0, 2.0]})
    bad = X.copy()
    bad[2, 1] = -0.01
    with pytest.raises(ValueError, match="negative entry .* domain 'domain_1' in run row 2"):
        load_sweep(bad, np.ones(5))
    with pytest.raises(ValueError, match="sums to 2"):
        load_sweep(X * 2, np.ones(5))
    y = np.ones(5)
    y[3] = np.nan
    with pytest.raises(ValueError, match="target 'target_0' is NaN/inf in run row 3"):
        load_sweep(X, y)
    s = load_sweep(X, y, missing="drop")
    assert s.num_runs == 4
    met = tmp_path / "m.csv"
    _write(met, ["run", "loss"], [[1, "abc"]])
    with pytest.raises(ValueError, match="no numeric columns"):
        load_sweep({"run": [1], "a": [1.0]}, met)
    with pytest.raises(ValueError, match="no such CSV"):
        load_sweep(tmp_path / "missing.csv", met)
    with pytest.raises(ValueError, match="targets: metrics has no column"):
        load_sweep(X, {"loss": np.ones(5)}, targets=["nope"])


def test_load_sweep_column_lists():
    mix = {"run": [0, 1], "a": [0.5, 0.25], "b": [0.5, 0.75]}
    met = {"run": [0, 1], "loss": [1.0, 2.0], "ppl": [3.0, 4.0]}
    # one name is one column, not one per character ('loss' was the columns l, o, s, s)
    s = load_sweep(mix, met, targets="loss")
    assert s.targets == ["loss"]
    np.testing.assert_array_equal(s.metrics, [[1.0], [2.0]])
    # a set's order changes with PYTHONHASHSEED: another process got other domain orders
    with pytest.raises(TypeError, match="domains must be a list of column names, got a set"):
        load_sweep(mix, met, domains={"a", "b"})
    with pytest.raises(TypeError, match="targets must be a list of column names, got int"):
        load_sweep(mix, met, targets=3)
    # a repeated domain was read twice and then failed the rows' sum check ("sums to 0.5")
    with pytest.raises(ValueError, match=r"domains: columns \['a'\] \(1\) are listed more"):
        load_sweep(mix, met, domains=["a", "b", "a"])


def test_load_sweep_does_not_read_bools_as_numbers():
    # float(True) is 1.0: a flag column became a domain of weight 1 ("run sums to 2"), one-hot
    # bools became weights, and bool metrics were fitted.
    met = {"run": [1, 2], "loss": [1.0, 2.0]}
    mix = {"run": [1, 2], "a": [0.5, 0.25], "b": [0.5, 0.75], "baseline": [True, False]}
    s = load_sweep(mix, met)
    assert s.domains == ["a", "b"]
    np.testing.assert_array_equal(s.mixtures, [[0.5, 0.5], [0.25, 0.75]])
    with pytest.raises(ValueError, match="column 'baseline' row 0: True is not a number"):
        load_sweep(mix, met, domains=["a", "baseline"])
    with pytest.raises(ValueError, match=r"mixtures: no numeric columns besides ids; columns "
                                         r"\['a', 'b'\] \(2\) hold bools"):
        load_sweep({"run": [1, 2], "a": [True, False], "b": [False, True]}, met)
    with pytest.raises(ValueError, match="metrics: no numeric columns besides ids; columns "
                                         r"\['ok'\] \(1\) hold bools"):
        load_sweep({"run": [1, 2], "a": [0.5, 0.5], "b": [0.5, 0.5]},
                   {"run": [1, 2], "ok": [np.True_, np.False_]})
    with pytest.raises(ValueError, match="column 'loss' holds numbers, but run '3' \\(row 2\\) "
                                         "is True"):
        load_sweep({"run": [1, 2, 3], "a": [1.0] * 3},
                   {"run": [1, 2, 3], "loss": [1.0, 2.0, True]})
    with pytest.raises(TypeError, match="mixtures: an array of bools holds no weights"):
        load_sweep(np.eye(2, dtype=bool), np.ones(2))
    with pytest.raises(TypeError, match="metrics: an array of bools holds no weights or metrics"):
        load_sweep(np.full((2, 2), 0.5), np.array([True, False]))


def test_evaluate_metrics():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    m = evaluate(y, np.array([1.1, 1.9, 3.5, 3.9]))
    assert m["spearman"] == pytest.approx(1.0)
    assert 0.95 < m["pearson"] < 1.0
    assert m["mae"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="at least 3"):
        evaluate([1.0, 2.0], [1.0, 2.0])


# ------------------------------------------------------------------------------- predictors
def test_load_sweep_matches_rows_by_exact_ids_and_stripped_names(tmp_path):
    mix, met = tmp_path / "mix.csv", tmp_path / "met.csv"
    base = 20240101120000000000  # ids beyond 2**53: float64 would merge neighbours
    ids = [base + i for i in range(4)]
    rows = [[0.5, 0.5], [0.25, 0.75], [0.75, 0.25], [0.1, 0.9]]
    _write(mix, ["run ", " a", " b"], [[r, *w] for r, w in zip(ids, rows, strict=True)])
    _write(met, [" run", "loss "], [[r, float(i)] for i, r in reversed(list(enumerate(ids)))])
    s = load_sweep(mix, met)
    assert s.domains == ["a", "b"] and s.targets == ["loss"]
    assert s.run_ids == [str(r) for r in ids]
    np.testing.assert_allclose(s.target("loss"), [0.0, 1.0, 2.0, 3.0])
    # ids that differ only past float64's precision are different runs
    _write(met, ["run", "loss"], [[r + 100_000 * (r - base) + 1, 1.0] for r in ids])
    with pytest.raises(ValueError, match="misaligned rows"):
        load_sweep(mix, met)


def test_load_sweep_refuses_to_pair_rows_named_differently(tmp_path):
    mix, met = tmp_path / "mix.csv", tmp_path / "met.csv"
    _write(mix, ["run", "a", "b"], [["r1", 0.5, 0.5], ["r2", 0.2, 0.8]])
    _write(met, ["run_id", "loss"], [["r2", 2.0], ["r1", 1.0]])
    with pytest.raises(ValueError, match="'run' and metrics by 'run_id'") as info:
        load_sweep(mix, met)
    # (it suggested passing id_column, which names one column that both tables must hold)
    assert "or pass id_column" not in str(info.value)
    with pytest.raises(ValueError, match="id_column 'run' is not a column of metrics"):
        load_sweep(mix, met, id_column="run")
    _write(met, ["loss"], [[1.0], [2.0]])  # no ids on one side: by position, as documented
    assert load_sweep(mix, met).run_ids is None


def test_ridge_gives_a_constant_domain_no_weight():
    # One domain at 0.2 in every run: after renormalisation it varies by ~1e-17, which
    # standardising used to blow up into coefficients of ~1e13.
    rng = np.random.default_rng(4)
    X = np.column_stack([rng.dirichlet([1, 1, 1], 40) * 0.8, np.full(40, 0.2)])
    X = X / X.sum(1, keepdims=True)
    y = 2.0 + X[:, 0] - X[:, 1] + rng.normal(0, 0.01, 40)
    for alphas in (None, (0.0, 0.1)):
        p = (RidgePredictor() if alphas is None else RidgePredictor(alphas=alphas)).fit(X, y)
        assert np.all(np.isfinite(p.coef_)) and abs(p.coef_[3]) < 1e-6
        assert np.abs(p.predict(X) - y).max() < 0.1


@pytest.mark.filterwarnings("error")  # no scipy/numpy warning leaks to the user
def test_tuning_on_a_constant_target_does_not_crash():
    X = _mixtures(40, 3, 5)
    p = TreePredictor(base="law", tune=True, n_estimators=50,
                      grid={"n_estimators": (20, 40), "num_leaves": (7,)}).fit(X, np.full(40, 3.0))
    np.testing.assert_allclose(p.predict(X[:5]), 3.0, atol=1e-6)


def test_tree_settings_and_grid_are_checked_up_front():
    # learning_rate=inf passed "> 0" and predicted ±1e307; an empty grid failed after every
    # fold as a TypeError about None, num_leaves=1 as a bare LightGBMError.
    for lr in (float("inf"), 1e308, 1.5, 0.0, float("nan")):
        with pytest.raises(ValueError, match=r"learning_rate must lie in \(0, 1\]"):
            TreePredictor(learning_rate=lr)
    with pytest.raises(TypeError, match="learning_rate must be a number"):
        TreePredictor(learning_rate="0.1")
    with pytest.raises(ValueError, match=r"grid\['num_leaves'\] is empty"):
        TreePredictor(tune=True, grid={"num_leaves": []})
    with pytest.raises(ValueError, match=r"grid\['num_leaves'\] must lie in \[2, 131072\], "
                                         r"got 1"):
        TreePredictor(tune=True, grid={"num_leaves": [7, 1]})
    with pytest.raises(ValueError, match=r"grid\['n_estimators'\] must lie in \[1, "):
        TreePredictor(tune=True, grid={"n_estimators": (0,)})
    with pytest.raises(TypeError, match=r"grid\['min_child_samples'\] must be an integer, "
                                        r"got 2.5"):
        TreePredictor(tune=True, grid={"min_child_samples": [2.5]})
    with pytest.raises(TypeError, match=r"grid\['num_leaves'\] must be a list of integers"):
        TreePredictor(tune=True, grid={"num_leaves": 7})
    with pytest.raises(TypeError, match="grid must be a mapping"):
        TreePredictor(tune=True, grid=[("num_leaves", [7])])
    with pytest.raises(ValueError, match=r"num_leaves must lie in \[2, 131072\], got 131073"):
        TreePredictor(num_leaves=131073)
    with pytest.raises(TypeError, match="n_estimators must be an integer, got '100'"):
        TreePredictor(n_estimators="100")
    with pytest.raises(TypeError, match="folds must be an integer"):
        TreePredictor(folds="5")
    X = _mixtures(40, 3, 5)
    p = TreePredictor(learning_rate=1.0, n_estimators=20, tune=True,
                      grid={"num_leaves": np.array([3, 7])}).fit(X, X[:, 0])
    assert p.grid["num_leaves"] == (3, 7) and p.params_["num_leaves"] in (3, 7)
    assert np.abs(p.predict(X) - X[:, 0]).max() < 0.2


def test_ridge_recovers_planted_linear_law():
    k = 6
    X = _mixtures(300, k, 1)
    w = np.array([0.8, -0.5, 0.3, 0.0, -0.9, 0.4])
    rng = np.random.default_rng(2)
    y = 3.0 + X @ w + rng.normal(0, 0.01, len(X))
    p = RidgePredictor().fit(X, y)
    # Rows sum to 1, so only w minus its mean (and b plus that mean) are identified.
    np.testing.assert_allclose(p.coef_ - p.coef_.mean(), w - w.mean(), atol=0.03)
    Xt = _mixtures(100, k, 3)
    np.testing.assert_allclose(p.predict(Xt), 3.0 + Xt @ w, atol=0.02)
    assert p.alpha_ < 1.0


def test_mixing_law_recovers_planted_parameters():
    k = 5
    t = np.array([1.2, -0.8, 0.5, -0.4, -0.5])  # centred
    c, kk = 2.0, 1.5
    X = _mixtures(200, k, 4)
    rng = np.random.default_rng(5)
    y = c + kk * np.exp(X @ t) + rng.normal(0, 0.005, len(X))
    y[:4] += 3.0  # a few broken runs: the Huber loss must not follow them
    p = MixingLawPredictor(seed=0).fit(X, y)
    assert p.c_ == pytest.approx(c, abs=0.1)
    assert p.k_ == pytest.approx(kk, rel=0.08)
    np.testing.assert_allclose(p.t_, t, atol=0.08)
    # a decreasing target (an accuracy): k < 0
    acc = 0.9 - 0.3 * np.exp(X @ t) + rng.normal(0, 0.003, len(X))
    q = MixingLawPredictor(seed=0).fit(X, acc)
    assert q.k_ == pytest.approx(-0.3, rel=0.1)
    np.testing.assert_allclose(q.t_, t, atol=0.15)


@pytest.mark.parametrize("backend", ["lightgbm", "sklearn"])
def test_trees_recover_planted_nonlinear_law(backend):
    k = 5
    X = _mixtures(400, k, 6)
    rng = np.random.default_rng(7)

    def law(Z):
        return 4.0 - np.log1p(8 * Z[:, 0]) + 2.0 * (Z[:, 1] - 0.3) ** 2 + np.sin(4 * Z[:, 2])

    y = law(X) + rng.normal(0, 0.01, len(X))
    p = TreePredictor(n_estimators=150, learning_rate=0.1, num_leaves=15,
                      backend=backend).fit(X, y)
    Xt = _mixtures(200, k, 8)
    m = evaluate(law(Xt), p.predict(Xt))
    assert m["spearman"] > 0.95
    assert m["mae"] < 0.1


def test_law_plus_trees_and_tuning():
    k = 4
    X = _mixtures(150, k, 9)
    t = np.array([1.0, -1.0, 0.6, -0.6])
    rng = np.random.default_rng(10)
    y = 1.0 + np.exp(X @ t) + 0.1 * (X[:, 0] > 0.5) + rng.normal(0, 0.005, len(X))
    p = TreePredictor(base="law", tune=True, n_estimators=200,
                      grid={"n_estimators": (100, 300), "num_leaves": (7,)}).fit(X, y)
    assert len(p.cv_scores_) == 2 and p.params_["n_estimators"] in (100, 300)
    Xt = _mixtures(100, k, 11)
    truth = 1.0 + np.exp(Xt @ t) + 0.1 * (Xt[:, 0] > 0.5)
    assert evaluate(truth, p.predict(Xt))["spearman"] > 0.97
    assert p.describe()["law"]["k"] == pytest.approx(1.0, rel=0.2)


def test_predictors_are_deterministic():
    X = _mixtures(60, 4, 12)
    y = X @ np.array([1.0, 2.0, 0.5, -1.0]) + np.random.default_rng(0).normal(0, 0.1, 60)
    for name in ("linear", "trees", "law", "law+trees"):
        a = make_predictor(name, seed=3).fit(X, y).predict(X)
        b = make_predictor(name, seed=3).fit(X, y).predict(X)
        assert np.array_equal(a, b), name
    m = cross_validate(lambda: RidgePredictor(), X, y, folds=5)
    assert m["spearman"] > 0.5


def test_too_few_runs_and_bad_arrays():
    X = _mixtures(6, 5, 13)
    y = np.arange(6.0)
    with pytest.raises(ValueError, match=r"law: too few runs \(6\) for 5 domains.*at least 8"):
        MixingLawPredictor().fit(X, y)
    with pytest.raises(ValueError, match="too few runs"):
        TreePredictor().fit(X, y)
    with pytest.raises(ValueError, match="too few runs"):
        RidgePredictor().fit(X, y)
    with pytest.raises(ValueError, match="finite"):
        RidgePredictor().fit(_mixtures(20, 3, 0), np.full(20, np.nan))
    with pytest.raises(ValueError, match="one value per run"):
        RidgePredictor().fit(_mixtures(20, 3, 0), np.ones(19))
    with pytest.raises(ValueError, match="unknown predictor"):
        make_predictor("forest")
    with pytest.raises(RuntimeError, match="fit"):
        RidgePredictor().predict(X)
    p = RidgePredictor().fit(_mixtures(20, 3, 0), np.arange(20.0))
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        p.predict(X)


# ------------------------------------------------------------------------------ scaling laws
def test_scaling_law_recovers_planted_parameters():
    n = np.geomspace(1e6, 1e9, 12)
    E, A, alpha = 1.7, 400.0, 0.35
    rng = np.random.default_rng(14)
    loss = (E + A * n ** -alpha) * np.exp(rng.normal(0, 0.001, n.size))
    law = fit_scaling_law(n, loss)
    assert law.E == pytest.approx(E, abs=0.05)
    assert law.alpha == pytest.approx(alpha, rel=0.05)
    # extrapolation to 10× the largest budget stays within 0.5%
    assert float(law(1e10)) == pytest.approx(E + A * 1e10 ** -alpha, rel=0.005)
    laws = fit_domain_laws({"web": (n, loss), "code": (n, 0.8 + 50 * n ** -0.25)})
    assert laws["code"].alpha == pytest.approx(0.25, rel=0.05)
    with pytest.raises(ValueError, match="domain 'bad'"):
        fit_domain_laws({"bad": ([1, 2, 3], [3.0, 2.0, 1.0])})
    with pytest.raises(ValueError, match="> 0"):
        fit_scaling_law([0, 1, 2, 3], [1.0, 1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------------- search
def test_projection_matches_a_generic_solver():
    rng = np.random.default_rng(15)
    k = 5
    lo = np.array([0.0, 0.1, 0.0, 0.05, 0.0])
    hi = np.array([0.5, 0.6, 0.3, 1.0, 0.2])
    V = rng.normal(0.2, 0.4, (20, k))
    W = project(V, lo, hi)
    for v, w in zip(V, W, strict=True):
        res = sopt.minimize(lambda x, v=v: ((x - v) ** 2).sum(), np.full(k, 0.2),
                            bounds=list(zip(lo, hi, strict=True)), method="SLSQP",
                            constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
                            options={"ftol": 1e-14, "maxiter": 500})
        np.testing.assert_allclose(w, res.x, atol=1e-6)
        assert abs(w.sum() - 1) < 1e-12


def test_search_respects_every_constraint_and_finds_planted_optimum():
    domains = ["a", "b", "c", "d", "e"]
    c = Constraints(domains, min_weight={"a": 0.05, "e": 0.1}, max_weight={"b": 0.3},
                    token_counts={"a": 10, "b": 100, "c": 15, "d": 100, "e": 100},
                    total_tokens=100, max_epochs=2)
    # availability: a ≤ 0.2, c ≤ 0.3
    np.testing.assert_allclose(c.hi, [0.2, 0.3, 0.3, 1.0, 1.0])
    W = sample_mixtures(5000, np.full(5, 0.2), c, seed=0)
    assert c.feasible(W).all()
    target = np.array([0.6, 0.0, 0.3, 0.1, 0.0])  # infeasible: a above availability, e below min

    def objective(W):
        return ((W - target) ** 2).sum(1)

    res = search(objective, c, samples=4000, top_k=50, seed=1)
    assert c.feasible(res.weights[None, :])[0]
    assert c.feasible(res.top_k).all()
    best = project(target[None, :], c.lo, c.hi)[0]  # the constrained optimum of a distance
    np.testing.assert_allclose(res.weights, best, atol=0.01)
    assert res.objective <= res.averaged_objective
    again = search(objective, c, samples=4000, top_k=50, seed=1)
    assert np.array_equal(res.weights, again.weights)


def test_describe_records_the_epoch_cap_in_effect():
    # Token counts without max_epochs cap every domain at one pass: the record said null.
    d = ["a", "b"]
    c = Constraints(d, token_counts=[60, 100], total_tokens=100)
    np.testing.assert_allclose(c.hi, [0.6, 1.0])
    assert c.describe()["max_epochs"] == 1.0
    assert Constraints(d, token_counts=[60, 100], total_tokens=100,
                       max_epochs=2).describe()["max_epochs"] == 2.0
    assert Constraints(d).describe()["max_epochs"] is None


def test_infeasible_constraints_say_which():
    d = ["a", "b", "c"]
    with pytest.raises(ValueError, match="min weights sum to 1.2"):
        Constraints(d, min_weight=0.4)
    with pytest.raises(ValueError, match="max weights .* sum to 0.6"):
        Constraints(d, max_weight=0.2)
    with pytest.raises(ValueError, match="domain 'b': min_weight 0.5 > max_weight 0.3"):
        Constraints(d, min_weight={"b": 0.5}, max_weight={"b": 0.3})
    with pytest.raises(ValueError, match="infeasible budget: total_tokens=1000 .* "
                                         "max_epochs=2"):
        Constraints(d, token_counts=[100, 100, 100], total_tokens=1000, max_epochs=2)
    with pytest.raises(ValueError, match="domain 'a': min_weight 0.5 needs"):
        Constraints(d, min_weight={"a": 0.5}, token_counts=[10, 1000, 1000], total_tokens=100)
    with pytest.raises(ValueError, match="token_counts: no count for domains"):
        Constraints(d, token_counts={"a": 1}, total_tokens=1)
    with pytest.raises(ValueError, match="together"):
        Constraints(d, total_tokens=10)
    with pytest.raises(ValueError, match="unknown domains"):
        Constraints(d, min_weight={"z": 0.1})
    with pytest.raises(ValueError, match="weights lie in"):
        Constraints(d, max_weight=1.5)


# ----------------------------------------------------------------------------------- Pareto
def _brute_front(V):
    n = len(V)
    keep = []
    for i in range(n):
        dominated = any((V[j] <= V[i]).all() and (V[j] < V[i]).any() for j in range(n) if j != i)
        if not dominated:
            keep.append(i)
    return np.array(keep)


@pytest.mark.parametrize("m,seed", [(1, 5), (2, 0), (2, 3), (2, 4), (3, 1), (4, 2)])
def test_pareto_front_matches_brute_force(m, seed):
    rng = np.random.default_rng(seed)
    V = rng.integers(0, 12, (300, m)).astype(float)  # integer values: ties and duplicates
    V = np.vstack([V, V[:5]])
    front = pareto_front(V)
    np.testing.assert_array_equal(front, _brute_front(V))
    F = V[front]
    for a, b in itertools.product(range(len(F)), repeat=2):
        assert not ((F[a] <= F[b]).all() and (F[a] < F[b]).any())
    flipped = pareto_front(-V, maximize=[True] * m)
    np.testing.assert_array_equal(flipped, front)


def test_pareto_front_takes_numbers_only():
    # asarray(float64) took text and booleans as values and dropped imaginary parts silently;
    # ragged rows and an int past float64 failed naming nothing.
    for bad in ([["1", "2"], ["0", "3"]], "ab", [[True, False], [False, True]],
                np.array([[1 + 1j, 2.0]]), [[2**70, True]], [[2**70, "1"]]):
        with pytest.raises(TypeError, match="values must be numbers"):
            pareto_front(bad)
    with pytest.raises(ValueError, match="values must be a rectangular array"):
        pareto_front([[1.0, 2.0], [3.0]])
    with pytest.raises(ValueError, match="values: a number is too large for float64"):
        pareto_front([[10**400, 1]])
    # Ints past int64 are numbers all the same (FLOPs: numpy holds them as objects).
    flops = [[6 * 7 * 10**9 * 2 * 10**12, 2.1], [12 * 10**21, 2.5], [18 * 10**21, 2.6]]
    assert list(pareto_front(flops)) == [0, 1]
    assert list(pareto_front(np.array([[1, 2], [2, 1], [2, 2]], dtype=np.int32))) == [0, 1]


def test_pareto_search_and_trade_offs():
    c = Constraints(["a", "b", "c"])
    f1 = lambda W: W[:, 0]  # noqa: E731 - want more of a
    f2 = lambda W: 1 - W[:, 0] + 0.1 * W[:, 2]  # noqa: E731 - want less of a, and no c
    pf = pareto_search([f1, f2], ["x", "y"], c, samples=3000, seed=0)
    assert np.diff(pf.values[:, 0]).min() >= 0
    assert c.feasible(pf.weights).all()
    assert np.diff(pf.values[:, 1]).max() <= 0  # along the front, better x costs y
    rows = pf.trade_offs()
    assert rows[0]["best_at"] == "x" and rows[0]["cost"]["y"] > 0.5
    np.testing.assert_allclose(pf.ideal(), [pf.values[:, 0].min(), pf.values[:, 1].min()])
    with pytest.raises(ValueError, match="two objectives"):
        pareto_search([f1], ["x"], c)


def test_pareto_search_checks_what_the_objectives_return():
    # Unchecked, a scalar broadcast into a one-point "front" and a short array paired values
    # with the wrong mixtures; search() already refused both.
    c = Constraints(["a", "b", "c"])
    with pytest.raises(ValueError, match="objective 'x' returned 1 values for 50 mixtures"):
        pareto_search([lambda W: 1.0, lambda W: 2.0], ["x", "y"], c, samples=50)
    with pytest.raises(ValueError, match="objective 'y' returned 40 values for 50 mixtures"):
        pareto_search([lambda W: W[:, 0], lambda W: -W[:-10, 0]], ["x", "y"], c, samples=50)
    with pytest.raises(ValueError, match="objective 'y' returned NaN/inf"):
        pareto_search([lambda W: W[:, 0], lambda W: np.full(len(W), np.nan)], ["x", "y"], c,
                      samples=50)


def test_search_refuses_objectives_returning_text_or_bools():
    # np.asarray(..., float64) read "0.25" as 0.25 and a comparison's True as 1.0, and the
    # search minimised them without a word.
    c = Constraints(["a", "b", "c"])
    strings = lambda W: np.array([f"{x:.3f}" for x in W[:, 0]])  # noqa: E731
    text_list = lambda W: [str(x) for x in W[:, 0]]  # noqa: E731
    flags = lambda W: W[:, 0] > 0.3  # noqa: E731
    mixed = lambda W: [0.5] * (len(W) - 1) + [True]  # noqa: E731
    with pytest.raises(TypeError, match="objective must return real numbers, got an array of "
                                        "dtype <U5"):
        search(strings, c, samples=20, top_k=2)
    with pytest.raises(TypeError, match="dtype <U"):
        search(text_list, c, samples=20, top_k=2)
    with pytest.raises(TypeError, match="dtype bool"):
        search(flags, c, samples=20, top_k=2)
    with pytest.raises(TypeError, match=r"got a bool \(True\) among its values"):
        search(lambda W: np.array(mixed(W), dtype=object), c, samples=20, top_k=2)
    with pytest.raises(TypeError, match="objective 'y' must return real numbers"):
        pareto_search([lambda W: W[:, 0], strings], ["x", "y"], c, samples=20)
    # What numbers come as still works: ints, float32, an object array of floats, a list
    ints = search(lambda W: (W[:, 0] * 1000).astype(np.int64), c, samples=50, top_k=5)
    floats = search(lambda W: np.array(list(W[:, 0]), dtype=object), c, samples=50, top_k=5)
    plain = search(lambda W: list(W[:, 0]), c, samples=50, top_k=5)
    assert floats.objective == plain.objective and ints.weights[0] < 0.1


def test_absurd_sizes_name_the_argument():
    # numpy's MemoryError ("Unable to allocate 7.11 PiB ...") named none of these.
    c = Constraints(["a", "b", "c"])
    with pytest.raises(ValueError, match=r"n=1,000,000,000,000,000,000 mixtures of 3 domains need "
                                         r"22,351,741,790.8 GiB"):
        sample_mixtures(10**18, np.full(3, 1 / 3), c)
    with pytest.raises(ValueError, match="samples=1,000,000,000,000,000,000 mixtures"):
        search(lambda W: W[:, 0], c, samples=10**18, top_k=1)
    with pytest.raises(ValueError, match="refine_batch=1,000,000,000,000,000,000 mixtures"):
        search(lambda W: W[:, 0], c, samples=10, top_k=1, refine_batch=10**18)
    with pytest.raises(ValueError, match="samples=1,000,000,000,000,000,000 mixtures"):
        pareto_search([lambda W: W[:, 0], lambda W: -W[:, 0]], ["x", "y"], c, samples=10**18)
    # refinement off: refine_batch is never allocated, so any size is fine
    assert search(lambda W: W[:, 0], c, samples=10, top_k=1, refine_steps=0,
                  refine_batch=10**18).evaluated == 11


# ---------------------------------------------------------------------------------- ablation
def test_fits_do_not_depend_on_the_targets_units():
    # Both curve fits in raw units stopped early once the target's scale moved away from 1
    # (L-BFGS's tolerances are absolute): the same data in other units must give the same fit.
    n = np.logspace(6, 9, 6)
    base = fit_scaling_law(n, 2 + 10 * n**-0.1)
    for unit in (1e-6, 1e3, 1e6):
        law = fit_scaling_law(n, unit * (2 + 10 * n**-0.1))
        np.testing.assert_allclose(law(1e12) / unit, base(1e12), rtol=1e-4)
        assert law.alpha == pytest.approx(base.alpha, rel=1e-3)
    X = _mixtures(60, 5, 21)
    t = np.array([0.8, -0.4, 0.3, -0.9, 0.2])
    curve = np.exp(X @ t)
    Xt = _mixtures(50, 5, 22)
    for c, k in ((2.0, 1.0), (2e3, 1e3), (2e-6, 1e-6), (0.45, -0.002)):  # losses, accuracies
        fit = MixingLawPredictor().fit(X, c + k * curve)
        truth = c + k * np.exp(Xt @ t)
        assert np.abs(fit.predict(Xt) - truth).max() < 1e-3 * np.ptp(truth)


@pytest.mark.filterwarnings("error")  # no overflow warning either
def test_fits_work_at_extreme_target_scales():
    # y.std() overflowed at 1e160 (NaN predictions) and underflowed at 1e-200 (the law's fit
    # unstandardised, predictions ~1e-16 absolute); LightGBM's float32 labels turned 1e39 into
    # inf and 1e-38 * y into zeros; ridge's squared errors overflowed; evaluate called every
    # target below 1e-12 constant.
    X = _mixtures(40, 3, 23)
    y = 2 + np.exp(X @ np.array([1.0, -1.0, 0.5])) + np.random.default_rng(24).normal(0, .01, 40)
    factories = {"linear": RidgePredictor, "law": MixingLawPredictor,
                 "lightgbm": lambda: TreePredictor(n_estimators=50, backend="lightgbm"),
                 "sklearn": lambda: TreePredictor(n_estimators=50, backend="sklearn"),
                 "law+trees": lambda: TreePredictor(n_estimators=50, base="law")}
    for name, factory in factories.items():
        base = factory().fit(X, y).predict(X)
        for scale in (1e-300, 1e-200, 1e-38, 1e39, 1e160, -1e300):
            pred = factory().fit(X, y * scale).predict(X)
            np.testing.assert_allclose(pred / scale, base, rtol=1e-6, err_msg=f"{name} {scale}")
            m = evaluate(y * scale, pred)
            assert m["spearman"] == pytest.approx(evaluate(y, base)["spearman"]), (name, scale)
    chosen = []
    for s1, s2 in ((1.0, 1.0), (1e160, 1e-200)):
        scaled = load_sweep(X, np.column_stack([y * s1, -y * s2]), domains=list("abc"),
                            targets=["l1", "l2"])
        ch = choose_weights(scaled, {"l1": 1.0, "l2": 2.0}, predictor="linear", samples=500,
                            top_k=10, pareto_samples=200)
        chosen.append(list(ch.weights.values()))
    np.testing.assert_allclose(chosen[0], chosen[1], atol=1e-9)


def test_near_constant_predictions_and_tiny_units():
    # a predictor fitted on a constant target varies by rounding only: no ranking to report
    y = np.array([1.0, 2.0, 3.0, 4.0])
    assert evaluate(y, np.array([0.1 + 0.2, 0.3, 0.3, 0.3]))["spearman"] == 0.0
    assert evaluate(y, y + 1e-9 * np.arange(4))["spearman"] == 1.0
    # refinement judges improvements against the objectives' own spread, not an absolute 1e-12
    target = np.array([0.1, 0.4, 0.3, 0.2])
    c = Constraints(list("abcd"), max_weight=0.6)
    for scale in (1.0, 1e-12):
        res = search(lambda W, s=scale: s * ((W - target) ** 2).sum(1), c, samples=2000, top_k=50)
        assert res.refined and np.abs(res.weights - target).max() < 0.02
    with pytest.raises(ValueError, match="folds must be >= 2"):
        TreePredictor(tune=True, folds=1)


@pytest.mark.filterwarnings("error")  # no scipy/numpy warning leaks to the user
def test_weights_from_affinity():
    # extreme but finite scores still give weights that sum to 1
    for w in (weights_from_affinity([1e308, 1e308], method="proportional"),
              weights_from_affinity([1e-320, 1.0], method="proportional", higher_is_better=False),
              weights_from_affinity([1.0, 2.0], temperature=1e-308),
              weights_from_affinity([1e10, 2e10], temperature=1e-300)):  # fmt: skip
        assert np.isfinite(w).all() and w.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(weights_from_affinity([1.0, 2.0], temperature=1e-308), [0, 1])
    w = weights_from_affinity({"a": 1.0, "b": 3.0}, method="proportional")
    assert w == pytest.approx({"a": 0.25, "b": 0.75})
    w = weights_from_affinity([2.0, 4.0], method="proportional", higher_is_better=False)
    np.testing.assert_allclose(w, [2 / 3, 1 / 3])
    s = np.array([1.0, 2.0, 3.0])
    w = weights_from_affinity(s, temperature=0.5)
    np.testing.assert_allclose(w, np.exp(s / 0.5) / np.exp(s / 0.5).sum())
    np.testing.assert_allclose(weights_from_affinity(s, temperature=1e6), 1 / 3, atol=1e-5)
    assert weights_from_affinity([1000.0, 0.0], temperature=1e-3)[0] == 1.0  # no overflow
    with pytest.raises(ValueError, match="scores > 0; domain 'b'"):
        weights_from_affinity({"a": 1.0, "b": 0.0}, method="proportional")
    with pytest.raises(ValueError, match="temperature"):
        weights_from_affinity(s, temperature=0)
    with pytest.raises(ValueError, match="method"):
        weights_from_affinity(s, method="rank")


# ------------------------------------------------------------------------------ whole recipe
def test_choose_weights_end_to_end():
    k = 4
    X = _mixtures(120, k, 16)
    t = np.array([-1.5, 0.5, 0.5, 0.5])  # loss falls with domain 0
    rng = np.random.default_rng(17)
    y1 = 2.0 + np.exp(X @ t) + rng.normal(0, 0.005, len(X))
    y2 = 1.0 + np.exp(-(X @ t)) + rng.normal(0, 0.005, len(X))  # the opposite preference
    s = load_sweep(X, np.column_stack([y1, y2]), domains=list("abcd"), targets=["l1", "l2"])
    c = Constraints(s.domains, max_weight={"a": 0.6})
    ch = choose_weights(s, ["l1"], predictor="law", constraints=c, samples=3000, top_k=30)
    assert ch.weights["a"] == pytest.approx(0.6, abs=0.02)  # as much of a as allowed
    assert sum(ch.weights.values()) == pytest.approx(1.0)
    assert ch.heldout["l1"]["spearman"] > 0.95 and ch.pareto is None
    both = choose_weights(s, {"l1": 1.0, "l2": 1.0}, predictor="law", samples=2000, top_k=20,
                          pareto_samples=2000)
    assert both.pareto is not None and len(both.pareto.values) >= 3
    with pytest.raises(ValueError, match="too few runs for predictor 'law'"):
        choose_weights(s.select(np.arange(6)), ["l1"], predictor="law", holdout=0)
    with pytest.raises(ValueError, match="not a metric"):
        choose_weights(s, ["l3"])
    # Errors about holdout name it (they named Sweep.split's test_fraction).
    for bad, error in ((1.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError),
                       ("0.2", TypeError), (True, TypeError)):
        with pytest.raises(error, match="^holdout must"):
            choose_weights(s, ["l1"], predictor="law", holdout=bad)
    with pytest.raises(ValueError, match=r"^holdout=0.001 leaves 0 held-out runs"):
        choose_weights(s, ["l1"], predictor="law", holdout=0.001)
    # None skips the evaluation as 0 does (it did before holdout was checked here).
    none = choose_weights(s, ["l1"], predictor="law", holdout=None, samples=500, top_k=5)
    zero = choose_weights(s, ["l1"], predictor="law", holdout=0, samples=500, top_k=5)
    assert none.heldout == {} and np.array_equal(none.weights, zero.weights)


# ------------------------------------------------------------------------------ regressions
def test_projection_stays_inside_the_bounds_exactly():
    # The even split of the last rounding gap pushed the 5e-18 entry to -1.7e-17, which
    # weights.json readers reject as a negative weight.
    row = [0.14338615194069437, 0.00933030057322569, 0.29322850533623096,
           4.9771608919960494e-18, 0.554055042149849]
    w = project([row], np.zeros(5), np.ones(5))[0]
    assert (w >= 0).all() and (w <= 1).all()
    assert abs(w.sum() - 1) <= 2.3e-16
    rng = np.random.default_rng(18)
    for k in (3, 8, 17, 30):
        V = rng.dirichlet(np.full(k, 0.1), size=2000)
        V[V < 1e-6] *= 1e-12  # many tiny entries: the case that went negative
        lo = np.where(rng.random(k) < 0.3, rng.uniform(0, 0.5 / k, k), 0.0)
        hi = np.where(rng.random(k) < 0.3, rng.uniform(0.5, 1, k), 1.0)
        W = project(V, lo, hi)
        assert (W >= lo).all() and (W <= hi).all()
        assert np.abs(W.sum(1) - 1).max() <= 1e-15


@pytest.mark.filterwarnings("error")  # no numpy warning either
def test_projection_iters_is_bounded_by_what_float64_can_resolve():
    # iters=10**30 ran (and hung) bisection long after the bracket had stopped changing.
    for iters in (2101, 10**30):
        with pytest.raises(ValueError, match=r"iters must lie in \[1, 2100\], got"):
            project([[0.3, 0.3, 0.4]], 0, 1, iters=iters)
    with pytest.raises(ValueError, match=r"iters must lie in \[1, 2100\], got 0"):
        project([[0.3, 0.3, 0.4]], 0, 1, iters=0)
    # A row spanning the float64 range needs the most halvings: the last ones change nothing.
    row = [[1.7976931348623157e308, 0.5]]
    assert np.array_equal(project(row, 0, 0.5, iters=2100), project(row, 0, 0.5, iters=2099))


def test_projection_and_sampling_check_their_input():
    # Unchecked: infeasible bounds gave rows summing to 1.5, NaN rows came back NaN,
    # concentrations=(inf,) gave NaN mixtures and () or (-1,) failed inside numpy.
    with pytest.raises(ValueError, match=r"infeasible bounds: .* sum\(lo\) = 1.5"):
        project([[0.3, 0.3, 0.4]], lo=[0.5, 0.5, 0.5], hi=[1, 1, 1])
    with pytest.raises(ValueError, match=r"infeasible bounds: .* sum\(hi\) = 0.6"):
        project([[0.3, 0.3, 0.4]], lo=0, hi=0.2)
    with pytest.raises(ValueError, match=r"lo\[1\] = 0.5 > hi\[1\] = 0.2"):
        project([[0.3, 0.3, 0.4]], lo=[0, 0.5, 0], hi=[1, 0.2, 1])
    with pytest.raises(ValueError, match="V must be finite"):
        project([[np.nan, 0.3, 0.4]], [0, 0, 0], [1, 1, 1])
    with pytest.raises(ValueError, match="lo must be finite"):
        project([[0.3, 0.3, 0.4]], [0, -np.inf, 0], [1, 1, 1])
    with pytest.raises(ValueError, match=r"hi must be 3 bounds .* got shape \(2,\)"):
        project([[0.3, 0.3, 0.4]], 0, [1, 1])
    with pytest.raises(TypeError, match="V must be numbers"):
        project([["0.3", "0.3", "0.4"]], 0, 1)
    with pytest.raises(ValueError, match="spans more than float64"):
        project([[1.7e308, -1.7e308, 0.0]], 0, 1)
    # rows near float64's limit: (a + b) / 2 overflowed and the wrong entry got the weight
    np.testing.assert_array_equal(project([[1e308, 1.5e308, 1.7e308]], 0, 1), [[0, 0, 1]])
    c = Constraints(["a", "b", "c"])
    prior = np.ones(3) / 3
    for conc in [(np.inf,), (-1.0,), (0.0,), (1.0, np.nan), (1e13,)]:
        with pytest.raises(ValueError, match=r"concentrations must lie in \(0, 1e\+12\]"):
            sample_mixtures(2, prior, c, concentrations=conc)
    with pytest.raises(ValueError, match="concentrations must be a non-empty list"):
        sample_mixtures(2, prior, c, concentrations=())
    with pytest.raises(TypeError, match="concentrations must be numbers"):
        sample_mixtures(2, prior, c, concentrations=("1",))
    W = sample_mixtures(4, prior, c, concentrations=(1e12, 1e-300))
    assert c.feasible(W).all()
    np.testing.assert_allclose(W[0], prior, atol=1e-5)
    # A prior whose sum overflows: it was divided by inf, all zeros, and sampled as uniform.
    W = sample_mixtures(2, [1.5e308, 1e308, 1e308], c, concentrations=(1e12,))
    np.testing.assert_allclose(W[0], [3 / 7, 2 / 7, 2 / 7], atol=1e-5)
    with pytest.raises(TypeError, match="domains must be a list of names, got 'web'"):
        Constraints("web")
    with pytest.raises(TypeError, match="domains must be a list of names, got None"):
        Constraints(None)
    with pytest.raises(TypeError, match="domains must be a list of names, got a set"):
        Constraints({"web", "code"})


@pytest.mark.filterwarnings("error")
def test_load_sweep_refuses_rows_without_a_positive_sum():
    # tolerance >= 1 let an all-zero row through, and renormalising it gave NaN weights
    mix = np.array([[0.5, 0.5], [0.2, 0.8], [0.0, 0.0]])
    with pytest.raises(ValueError, match=r"run row 2 sums to 0: not a weight vector"):
        load_sweep(mix, np.array([1.0, 2.0, 3.0]), tolerance=1.0)
    with pytest.raises(ValueError, match=r"run 'r1' \(row 0\) sums to inf"):
        load_sweep({"run": ["r1"], "a": [1e308], "b": [1e308]}, {"run": ["r1"], "m": [1.0]},
                   tolerance=np.inf)
    with pytest.raises(TypeError, match="tolerance must be a number"):
        load_sweep(mix[:2], np.array([1.0, 2.0]), tolerance="1")
    s = load_sweep(mix[:2] * 1.5, np.array([1.0, 2.0]), tolerance=1.0)
    np.testing.assert_allclose(s.mixtures, mix[:2])


def test_non_numeric_cells_and_colliding_names_are_named(tmp_path):
    mix = {"run": ["r0", "r1", "r2"], "a": ["0.5", "0.0O1", "0.2"], "b": ["0.5", "1", "0.8"]}
    met = {"run": ["r0", "r1", "r2"], "loss": [1.0, 2.0, 3.0]}
    with pytest.raises(ValueError, match=r"mixtures: column 'a' holds numbers, but run 'r1' "
                                         r"\(row 1\) is '0.0O1', not a number"):
        load_sweep(mix, met)
    # empty cells keep their meaning: a NaN metric, dropped on request
    s = load_sweep({"a": [0.5, 1.0, 0.2], "b": [0.5, 0.0, 0.8]},
                   {"loss": ["1", "", "3"], "note": ["", "", ""]}, targets=["loss"],
                   missing="drop")
    assert s.num_runs == 2
    with pytest.raises(ValueError, match=r"strip_prefix 'x_' makes domain names collide: "
                                         r"\['x_a', 'a'\] all become 'a'"):
        load_sweep({"x_a": [0.5], "a": [0.5]}, {"loss": [1.0]}, strip_prefix="x_")
    with pytest.raises(ValueError, match=r"strip_prefix 'x_' leaves domain 'x_' without a name"):
        load_sweep({"x_": [0.5], "x_a": [0.5]}, {"loss": [1.0]}, strip_prefix="x_")
    with pytest.raises(ValueError, match=r"names must be unique; \['a'\] repeat"):
        Constraints(["a", "b", "a"])
    with pytest.raises(ValueError, match="no numeric columns"):
        load_sweep({"a": [1.0]}, {"note": ["x"]})


def test_cells_and_ids_are_parsed_strictly():
    # float() takes digit-grouping underscores: '0_5' was 5.0 and run '1_0' was run 10.
    mix = {"a": ["0.5", "0_5", "0.2"], "b": ["0.5", "0.5", "0.8"]}
    with pytest.raises(ValueError, match=r"column 'a' holds numbers, but row 1 is '0_5'"):
        load_sweep(mix, {"loss": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match=r"column 'loss' row 2: '3_0' is not a number"):
        load_sweep({"a": [0.5, 0.5, 0.2], "b": [0.5, 0.5, 0.8]},
                   {"loss": ["1", "2", "3_0"]}, targets=["loss"])
    mix = {"run": ["10", "1_0"], "a": [0.5, 0.2], "b": [0.5, 0.8]}  # two runs, not one repeated
    s = load_sweep(mix, {"run": ["1_0", "10.0"], "loss": [1.0, 2.0]})
    assert s.run_ids == ["10", "1_0"] and s.target("loss").tolist() == [2.0, 1.0]
    # what CSV files hold still reads
    s = load_sweep({"a": [" .5", "1e-1", "+0.9"], "b": ["5E-1", "0.9", ".1"]},
                   {"loss": ["-1", "INF", "2."]}, missing="drop")
    assert s.num_runs == 2


def test_read_csv_columns_reports_the_file_and_line(tmp_path):
    from fastmix.optimize.sweep import read_csv_columns

    p = tmp_path / "s.csv"
    p.write_bytes(b"\xef\xbb\xbfindex,a\n1,0.5\n")
    assert read_csv_columns(p) == {"index": ["1"], "a": ["0.5"]}
    p.write_bytes(b"index,a\n1,0.5\n2,caf\xe9\n")
    with pytest.raises(ValueError, match=r"s\.csv: line 3 is not UTF-8"):
        read_csv_columns(p)
    p.write_text('index,a\n1,"x\ny"\n2\n')  # a quoted cell spans lines 2-3
    with pytest.raises(ValueError, match=r"s\.csv: line 4 has 1 fields, header has 2"):
        read_csv_columns(p)
    # Rows of empty cells are rows here; load_sweep decides which are runs.
    p.write_bytes(b"index,a\r\n1,0.5\r\n,\r\n\r\n , \r\n")
    assert read_csv_columns(p) == {"index": ["1", "", " "], "a": ["0.5", "", " "]}


def test_trailing_rows_of_empty_cells_are_no_runs(tmp_path):
    # A spreadsheet's trailing rows of empty cells were a run '' with NaN weights, or an id ''
    # repeated; one inside the table stays a row, as it was.
    mix, met = tmp_path / "mix.csv", tmp_path / "met.csv"
    mix.write_bytes(b"index,a,b\r\n1,0.5,0.5\r\n2,0.2,0.8\r\n,,\r\n\r\n , ,\r\n")
    met.write_text("index,loss\n1,1.0\n2,2.0\n,\n")
    assert load_sweep(mix, met).run_ids == ["1", "2"]
    met.write_text("index,loss\n1,1.0\n,\n2,2.0\n")
    with pytest.raises(ValueError, match=r"runs \[''\] \(1\) have metrics but no mixture"):
        load_sweep(mix, met)
    # Matched by position, a row of empty metrics where the mixtures have a run is that run,
    # its metrics missing (dropping it misaligned the tables); past the other table's last
    # run it is none.
    mix.write_text("a,b\n0.5,0.5\n0.2,0.8\n0.4,0.6\n,\n")
    met.write_text("loss,acc\n1.0,0.1\n2.0,0.2\n,\n,\n,\n")
    assert load_sweep(mix, met, missing="drop").num_runs == 2
    with pytest.raises(ValueError, match="'loss' is NaN/inf in run row 2"):
        load_sweep(mix, met)
    met.write_text("loss,acc\n1.0,0.1\n2.0,0.2\n")
    with pytest.raises(ValueError, match="mixtures has 3 runs but metrics has 2"):
        load_sweep(mix, met, missing="drop")


def test_library_arguments_of_the_wrong_type_are_named():
    d = ["a", "b", "c"]
    with pytest.raises(TypeError, match="total_tokens must be a number, got '2'"):
        Constraints(d, token_counts=[1, 1, 1], total_tokens="2")
    with pytest.raises(TypeError, match="max_epochs must be a number"):
        Constraints(d, token_counts=[1, 1, 1], total_tokens=2, max_epochs="2")
    with pytest.raises(TypeError, match=r"token_counts\['a'\] must be a number"):
        Constraints(d, token_counts={"a": "many", "b": 1, "c": 1}, total_tokens=2)
    with pytest.raises(TypeError, match="min_weight must be a number"):
        Constraints(d, min_weight=["0.1", "0", "0"])
    # a bool among numbers was taken as 0 or 1, as a mapping's bool is not
    with pytest.raises(TypeError, match="token_counts must hold real numbers, got a bool"):
        Constraints(d, token_counts=[True, 1, 1], total_tokens=2)
    with pytest.raises(TypeError, match="min_weight must hold real numbers, got a bool"):
        Constraints(d, min_weight=(True, 0, 0))
    with pytest.raises(TypeError, match="max_weight has masked entries"):
        Constraints(d, max_weight=np.ma.array([1.0, 1.0, 0.0], mask=[0, 0, 1]))
    with pytest.raises(TypeError, match="scores must hold real numbers, got a bool"):
        weights_from_affinity([True, 2.0, 3.0])
    with pytest.raises(TypeError, match="scores must hold real numbers, got a bool"):
        weights_from_affinity({"a": False, "b": 2.0})
    c = Constraints(d)
    with pytest.raises(TypeError, match="prior must hold real numbers, got a bool"):
        search(lambda W: W[:, 0], c, prior=[True, 1, 1], samples=50, top_k=5)

    def objective(W):
        return W[:, 0]

    with pytest.raises(TypeError, match="samples must be an integer, got 100.5"):
        search(objective, c, samples=100.5, top_k=10)
    with pytest.raises(TypeError, match="top_k must be an integer"):
        search(objective, c, samples=100, top_k=1.5)
    with pytest.raises(ValueError, match=r"prior must be 3 weights \(one per domain\), got "
                                         r"shape \(2,\)"):
        pareto_search([objective, objective], ["x", "y"], c, prior=[0.5, 0.5], samples=50)
    with pytest.raises(ValueError, match="prior must be 3 non-negative"):
        search(objective, c, prior=[-1.0, 1.0, 1.0], samples=50, top_k=5)
    with pytest.raises(ValueError, match="maximize needs 2 flags"):
        pareto_search([objective, objective], ["x", "y"], c, maximize=[True], samples=50)


def test_flags_must_be_bools():
    # Taken by their truth: higher_is_better="no" ranked as higher-is-better, tune="no" tuned
    # (minutes of CV), and maximize=["no", "yes"] maximised both.
    d = ["a", "b", "c"]
    c = Constraints(d)

    def objective(W):
        return W[:, 0]

    for bad in ("no", 1, None, np.array([True])):
        with pytest.raises(TypeError, match="higher_is_better must be True or False"):
            weights_from_affinity([1.0, 2.0], higher_is_better=bad)
        with pytest.raises(TypeError, match="keep_candidates must be True or False"):
            search(objective, c, samples=50, top_k=5, keep_candidates=bad)
        with pytest.raises(TypeError, match="tune must be True or False"):
            make_predictor("linear", tune=bad)
        with pytest.raises(TypeError, match="tune must be True or False"):
            TreePredictor(tune=bad)
        with pytest.raises(TypeError, match=r"maximize\[1\] must be True or False"):
            pareto_front(np.ones((3, 2)), maximize=[False, bad])
        with pytest.raises(TypeError, match=r"maximize\[0\] must be True or False"):
            pareto_search([objective, objective], ["x", "y"], c, maximize=[bad, True],
                          samples=50)
    with pytest.raises(TypeError, match="maximize must be a list of bools, got str"):
        pareto_front(np.ones((3, 2)), maximize="no")
    with pytest.raises(TypeError, match="maximize must be a list of bools, got str"):
        pareto_search([objective, objective], ["x", "y"], c, maximize="ny", samples=50)
    # NumPy's bools are bools
    low = weights_from_affinity([1.0, 2.0], higher_is_better=np.bool_(False))
    assert low[0] > low[1]
    assert list(pareto_front([[0, 1], [1, 0]], maximize=np.array([True, False]))) == [1]


def test_seeds_and_small_settings_are_checked_with_their_names():
    # numpy said "expected non-negative integer" naming no argument; '<' failed on a string;
    # alphas=[nan] fitted a constant; text, complex scores and a list of curves failed deep
    # inside numpy or as AttributeError; string token counts were accepted.
    X = _mixtures(20, 3, 0)
    y = X @ np.array([1.0, 2.0, 3.0])
    n, loss = [1, 2, 3, 4], [4, 3, 2.5, 2.2]
    c = Constraints(["a", "b", "c"])
    prior = np.ones(3) / 3
    for call in (lambda: fit_scaling_law(n, loss, seed=-1),
                 lambda: sample_mixtures(4, prior, c, seed=-1),
                 lambda: search(lambda W: W[:, 0], c, samples=10, top_k=2, seed=-1),
                 lambda: pareto_search([lambda W: W[:, 0]] * 2, ["x", "y"], c, seed=-1),
                 lambda: cross_validate(RidgePredictor, X, y, seed=-1),
                 lambda: RidgePredictor(seed=-1), lambda: MixingLawPredictor(seed=-1),
                 lambda: TreePredictor(seed=-1),
                 lambda: load_sweep(X, y).split(0.25, seed=-1),
                 lambda: choose_weights(load_sweep(X, y), ["target_0"], seed=-1)):
        with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
            call()
    with pytest.raises(TypeError, match="seed must be an integer"):
        sample_mixtures(4, prior, c, seed=1.5)
    # what np.random.default_rng takes still works where the seed goes straight to it
    for seed in (None, np.random.default_rng(0), np.random.SeedSequence(1), [1, 2]):
        assert sample_mixtures(4, prior, c, seed=seed).shape == (4, 3)
        assert load_sweep(X, y).split(0.25, seed=seed)[1].num_runs == 5
    assert pareto_search([lambda W: W[:, 0]] * 2, ["x", "y"], c, samples=20, seed=None).weights.size
    with pytest.raises(TypeError, match="folds must be an integer, got '5'"):
        RidgePredictor(folds="5")
    with pytest.raises(TypeError, match="folds must be an integer"):
        cross_validate(RidgePredictor, X, y, folds=5.0)
    for alphas in ([np.nan], [1.0, np.inf], [-1.0]):
        with pytest.raises(ValueError, match="alphas must be a non-empty list of finite"):
            RidgePredictor(alphas=alphas)
    with pytest.raises(TypeError, match="alphas must be numbers"):
        RidgePredictor(alphas=["0.1"])
    with pytest.raises(TypeError, match="starts must be an integer"):
        MixingLawPredictor(starts="16")
    with pytest.raises(TypeError, match="delta must be a number"):
        MixingLawPredictor(delta="1")
    with pytest.raises(TypeError, match="temperature must be a number, got '1'"):
        weights_from_affinity([1, 2], temperature="1")
    for scores in ("ab", [1 + 1j, 2], [True, False], {"a": "1", "b": 2}):
        with pytest.raises(TypeError, match="scores must be real numbers"):
            weights_from_affinity(scores)
    with pytest.raises(TypeError, match=r"curves must be a mapping \{domain: \(tokens, loss\)\}"):
        fit_domain_laws([(n, loss)])
    with pytest.raises(TypeError, match="domain 'web': expected a pair"):
        fit_domain_laws({"web": (n, loss, loss)})
    with pytest.raises(TypeError, match="domain 'web': tokens must be numbers"):
        fit_domain_laws({"web": (["1", "2", "3", "4"], loss)})
    assert fit_domain_laws({"web": np.array([n, loss])})["web"].alpha > 0
    with pytest.raises(TypeError, match="tokens must be numbers"):
        fit_scaling_law(["1", "2", "3", "4"], [4, 3, 2, 1])
    with pytest.raises(TypeError, match="loss must be numbers"):
        fit_scaling_law(n, [True, True, True, True])
    with pytest.raises(TypeError, match="delta must be a number"):
        fit_scaling_law(n, loss, delta="0.001")


def test_load_sweep_keeps_run_ids_exact():
    # Columns went through numpy's str dtype, which drops trailing NULs: 'r2' and 'r2\x00'
    # were paired as one run.
    mix = {"run": ["r1", "r2", "r3"], "a": [0.5, 0.2, 0.9], "b": [0.5, 0.8, 0.1]}
    with pytest.raises(ValueError, match="misaligned rows"):
        load_sweep(mix, {"run": ["r1", "r2\x00", "r3"], "loss": [1.0, 2.0, 3.0]})
    s = load_sweep(mix, {"run": ("r3", "r1", "r2"), "loss": [np.float64(3), 1, 2.0]})
    assert s.run_ids == ["r1", "r2", "r3"] and s.target("loss").tolist() == [1.0, 2.0, 3.0]


def test_tree_predictor_without_tree_libraries(monkeypatch):
    import sys

    # None in sys.modules makes the import fail, as when neither is installed.
    monkeypatch.setitem(sys.modules, "lightgbm", None)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ImportError, match=r'law\+trees.*pip install "fastmix\[trees\]"'):
        make_predictor("law+trees")
    with pytest.raises(ImportError, match="scikit-learn is not installed"):
        TreePredictor(backend="sklearn")
    with pytest.raises(ImportError, match=r'lightgbm is not installed.*"fastmix\[trees\]"'):
        TreePredictor(backend="lightgbm")
    make_predictor("law")  # the others need neither
    make_predictor("linear")


def test_choose_weights_checks_settings_before_fitting(monkeypatch):
    import fastmix.optimize.choose as choose_module

    X = _mixtures(40, 3, 19)
    s = load_sweep(X, X[:, 0] + 1.0, domains=list("abc"), targets=["l"])
    real = choose_module.make_predictor

    def no_fitting(*args, **kwargs):
        raise AssertionError("a predictor was made before the settings were checked")

    monkeypatch.setattr(choose_module, "make_predictor", no_fitting)
    with pytest.raises(ValueError, match="prior must be 3 weights"):
        choose_weights(s, ["l"], predictor="linear", prior=[0.5, 0.5])
    with pytest.raises(TypeError, match=r"prior\['a'\] must be a number"):
        choose_weights(s, ["l"], predictor="linear", prior={"a": "x", "b": 1, "c": 1})
    with pytest.raises(TypeError, match="samples must be an integer"):
        choose_weights(s, ["l"], predictor="linear", samples=1e3)
    with pytest.raises(TypeError, match=r"targets\['l'\] must be a number, got '2'"):
        choose_weights(s, {"l": "2"}, predictor="linear")  # float("2") was taken
    with pytest.raises(TypeError, match=r"targets\['l'\] must be a number, got True"):
        choose_weights(s, {"l": True}, predictor="linear")
    with pytest.raises(TypeError, match="targets must be a list .*got a set"):
        choose_weights(s, {"l"}, predictor="linear")
    monkeypatch.setattr(choose_module, "make_predictor", real)
    ch = choose_weights(s, ["l"], predictor="linear", samples=500, top_k=10,
                        prior={"a": 1, "b": 1, "c": 2})
    w = np.array(list(ch.weights.values()))
    assert (w >= 0).all() and abs(w.sum() - 1) < 1e-12


def test_choose_weights_takes_one_target_name_as_one_target():
    # 'loss' was the targets l, o, s (an error naming 'l'; with metrics so named, the wrong
    # objective), and maximize='loss' the same
    X = _mixtures(40, 3, 19)
    s = load_sweep(X, X[:, 0] + 1.0, domains=list("abc"), targets=["loss"])
    kw = dict(predictor="linear", samples=300, top_k=10)
    assert choose_weights(s, "loss", **kw).weights == choose_weights(s, ["loss"], **kw).weights
    up = choose_weights(s, "loss", maximize="loss", **kw)
    assert up.maximize == {"loss": True}
    assert up.weights == choose_weights(s, ["loss"], maximize=["loss"], **kw).weights


def test_project_and_sample_mixtures_memory_stays_near_the_output_size():
    # Whole-array temporaries held ~8 copies of the mixtures (project) and ~9 (sample_mixtures):
    # 50,000 samples of 10,000 domains needed ~36 GB.  They now work a block of rows at a time.
    import tracemalloc

    from fastmix.optimize import Constraints
    from fastmix.optimize.search import project, sample_mixtures

    rng = np.random.default_rng(0)
    n, K = 4000, 500
    V = rng.dirichlet(np.full(K, 0.3), size=n)
    tracemalloc.start()
    try:
        W = project(V, 0.0, 0.01)
        _, peak_project = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        S = sample_mixtures(n, np.full(K, 1 / K), Constraints([f"d{i}" for i in range(K)]))
        _, peak_sample = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.all(W <= 0.01) and np.allclose(W.sum(1), 1)
    assert S.shape == (n, K) and np.allclose(S.sum(1), 1)
    assert peak_project < 2.5 * V.nbytes, peak_project / V.nbytes  # output + a few blocks
    assert peak_sample < 3.5 * S.nbytes, peak_sample / S.nbytes
