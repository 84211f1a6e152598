"""``fastmix optimize`` end to end on a small synthetic sweep."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from fastmix.cli import main

DOMAINS = ["web", "code", "books", "math"]


def _sweep(tmp_path, n=60, seed=0, single=False):
    rng = np.random.default_rng(seed)
    X = rng.dirichlet(np.full(len(DOMAINS), 0.8), size=n)
    t = np.array([-1.0, 0.4, 0.3, 0.3])
    loss = 2.0 + np.exp(X @ t) + rng.normal(0, 0.01, n)
    code = 1.5 + np.exp(-2.0 * X[:, 1]) + rng.normal(0, 0.01, n)
    ids = [f"run{i:03d}" for i in range(n)]
    if single:
        path = tmp_path / "sweep.csv"
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["run"] + [f"train_{d}" for d in DOMAINS] + ["val/loss", "val/code"])
            for i in range(n):
                w.writerow([ids[i], *np.round(X[i], 3), loss[i], code[i]])
        return [str(path)]
    mix, met = tmp_path / "mix.csv", tmp_path / "met.csv"
    with mix.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run"] + DOMAINS)
        for i in range(n):
            w.writerow([ids[i], *np.round(X[i], 3)])  # rounded like real sweeps
    order = rng.permutation(n)  # metrics in another order: aligned by the run column
    with met.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run", "val/loss", "val/code"])
        for i in order:
            w.writerow([ids[i], loss[i], code[i]])
    return [str(mix), str(met)]


def test_end_to_end_two_targets(tmp_path, capsys):
    out = tmp_path / "out"
    files = _sweep(tmp_path)
    rc = main(["optimize", *files, "--target", "val/loss", "--target", "val/code=0.5",
               "--predictor", "law", "--max-weight", "0.7", "--min-weight", "math=0.05",
               "--samples", "3000", "--top-k", "30", "--out", str(out)])
    assert rc == 0
    meta = json.loads((out / "weights.json").read_text())
    w = meta["weights"]
    assert list(w) == DOMAINS
    assert sum(w.values()) == pytest.approx(1.0, abs=1e-9)
    assert max(w.values()) <= 0.7 + 1e-9 and w["math"] >= 0.05 - 1e-9
    assert meta["targets"] == {"val/loss": 1.0, "val/code": 0.5}
    assert meta["heldout"]["val/loss"]["spearman"] > 0.9
    assert meta["sweep"]["runs"] == 60 and meta["sweep"]["max_row_offset"] > 0
    assert meta["pareto_front_size"] >= 2
    png = (out / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(out / "plot.png")
    assert img.shape[0] > 100 and img.shape[1] > 3 * img.shape[0]  # 3 panels side by side
    md = (out / "summary.md").read_text()
    assert "| web |" in md and "Pareto front" in md and "Spearman" in md
    rows = list(csv.reader((out / "summary.csv").open()))
    weights = {r[1]: float(r[2]) for r in rows if r[0] == "weight"}
    assert weights == pytest.approx(w)
    assert "| web |" in capsys.readouterr().out
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # temporaries renamed
    # readable by the data engineer's loader
    from fastmix.data import load_weights

    np.testing.assert_allclose(load_weights(out / "weights.json", DOMAINS).sum(), 1.0)


def test_single_csv_with_prefix_and_token_budget(tmp_path):
    out = tmp_path / "o"
    files = _sweep(tmp_path, single=True)
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"web": 50, "code": 40, "books": 10, "math": 20}))
    rc = main(["optimize", *files, "--domain-prefix", "train_", "--target", "val/loss",
               "--predictor", "linear", "--token-counts", str(tokens), "--total-tokens", "100",
               "--max-epochs", "1", "--samples", "2000", "--top-k", "20", "--out", str(out)])
    assert rc == 0
    w = json.loads((out / "weights.json").read_text())["weights"]
    assert sorted(w) == sorted(DOMAINS)
    # availability: books ≤ 10/100, math ≤ 20/100, code ≤ 0.4
    assert w["books"] <= 0.1 + 1e-9 and w["math"] <= 0.2 + 1e-9 and w["code"] <= 0.4 + 1e-9
    assert sum(w.values()) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--target", "val/nope"], "no metric 'val/nope'"),
        ([], "name one or more"),
        (["--target", "val/loss", "--min-weight", "0.3"], "min weights sum to 1.2"),
        (["--target", "val/loss", "--token-counts", "web=1,code=1,books=1,math=1",
          "--total-tokens", "100", "--max-epochs", "4"], "infeasible budget"),
        (["--target", "val/loss", "--min-weight", "nope=0.1"], "unknown domain 'nope'"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, extra, message):
    files = _sweep(tmp_path, n=30)
    rc = main(["optimize", *files, "--predictor", "linear", "--samples", "200", "--top-k",
               "10", "--out", str(tmp_path / "o"), *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "weights.json").exists()


def test_too_few_runs_and_misaligned(tmp_path, capsys):
    files = _sweep(tmp_path, n=8)
    rc = main(["optimize", *files, "--target", "val/loss", "--predictor", "law+trees",
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "too few runs for predictor 'law+trees'" in capsys.readouterr().err
    files = _sweep(tmp_path, n=12)
    rc = main(["optimize", *files, "--target", "val/loss", "--predictor", "linear",
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "leaves 2 of 12 runs to evaluate" in capsys.readouterr().err
    met = tmp_path / "met.csv"
    lines = met.read_text().splitlines()
    met.write_text("\n".join(lines[:-1]) + "\n")  # one run's metrics missing
    rc = main(["optimize", *files, "--target", "val/loss", "--out", str(tmp_path / "o")])
    assert rc == 2 and "misaligned rows" in capsys.readouterr().err


def test_same_seed_same_weights(tmp_path):
    files = _sweep(tmp_path, n=40)
    outs = []
    for name in ("a", "b"):
        rc = main(["optimize", *files, "--target", "val/loss", "--predictor", "trees",
                   "--samples", "1000", "--top-k", "10", "--seed", "3",
                   "--out", str(tmp_path / name)])
        assert rc == 0
        outs.append(json.loads((tmp_path / name / "weights.json").read_text()))
    assert outs[0]["weights"] == outs[1]["weights"]
    assert outs[0]["heldout"] == outs[1]["heldout"]
