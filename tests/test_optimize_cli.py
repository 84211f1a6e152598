"""``fastmix optimize`` end to end on a small synthetic sweep."""

from __future__ import annotations

import csv
import json
import os
import threading

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
        (["--target", "val/cod"], "no metric 'val/cod'; did you mean ['val/code']?"),
        # a part left out of the name: a look-alike, not a substring
        (["--target", "vl/code"], "no metric 'vl/code'; did you mean ['val/code']?"),
        ([], "name one or more"),
        (["--target", "val/loss", "--min-weight", "0.3"], "min weights sum to 1.2"),
        (["--target", "val/loss", "--token-counts", "web=1,code=1,books=1,math=1",
          "--total-tokens", "100", "--max-epochs", "4"], "infeasible budget"),
        (["--target", "val/loss", "--min-weight", "nope=0.1"], "unknown domain 'nope'"),
        # flags, not the library's argument names (min_weight, max_epochs, ...)
        (["--target", "val/loss", "--min-weight", "web=0.5", "--max-weight", "web=0.3"],
         "domain 'web': --min-weight 0.5 > --max-weight 0.3"),
        (["--target", "val/loss", "--max-epochs", "2"],
         "--max-epochs needs --token-counts and --total-tokens"),
        (["--target", "val/loss", "--token-counts", "web=1,code=1,books=1,math=1"],
         "--token-counts and --total-tokens must be given together"),
        (["--target", "val/loss", "--token-counts", "web=5,code=1", "--total-tokens", "1"],
         "--token-counts: no count for domains ['books', 'math']"),
        (["--target", "val/loss", "--token-counts", "100", "--total-tokens", "10"],
         "--token-counts: '100' is not NAME=COUNT"),
        (["--target", "val/loss=-1"], "--target: weight of 'val/loss' must be >= 0, got -1"),
        (["--target", "val/loss", "--maximize", "val/code"],
         "--maximize: ['val/code'] are not among the --target metrics ['val/loss']"),
        (["--target", "val/loss", "--seed", "-1"], "--seed must lie in [0, 2**32 - 1], got -1"),
        (["--target", "val/loss", "--samples", "0"], "--samples must be >= 1, got 0"),
        (["--target", "val/loss", "--samples", "-5"], "--samples must be >= 1, got -5"),
        (["--target", "val/loss", "--samples", "100000000"], "--samples must be at most 2,000,000"),
        # float() reads digit-grouping underscores: the typo 0_1 meant 1.0, silently
        (["--target", "val/loss", "--min-weight", "web=0_1"],
         "--min-weight: 'web=0_1' is not NAME=NUMBER or NUMBER"),
        (["--target", "val/loss", "--max-weight", "0_5"],
         "--max-weight: '0_5' is not NAME=NUMBER or NUMBER"),
        (["--target", "val/loss", "--token-counts", "web=1_0,code=1,books=1,math=1",
          "--total-tokens", "1"], "--token-counts: count of 'web' is '1_0', not a number"),
        (["--target", "val/loss=0_5"], "no metric 'val/loss=0_5'"),
        # the second replaced the first silently
        (["--target", "val/loss=2", "--target", "val/loss=1"],
         "--target: metric 'val/loss' is given twice ('val/loss=2' and 'val/loss=1'); give each "
         "metric once"),
        (["--target", "val/loss", "--target", "val/code", "--target", "val/loss"],
         "--target: metric 'val/loss' is given twice ('val/loss' and 'val/loss')"),
        (["--target", "val/loss", "--min-weight", "web=0.1", "--min-weight", "web=0.2"],
         "--min-weight: domain 'web' is given twice ('web=0.1' and 'web=0.2'); give it once"),
        (["--target", "val/loss", "--max-weight", "0.9,code=0.5", "--max-weight", "0.8"],
         "--max-weight: the value for every domain is given twice ('0.9' and '0.8')"),
        (["--target", "val/loss", "--token-counts", "web=5,code=1,books=1,math=1,web=1",
          "--total-tokens", "1"],
         "--token-counts: domain 'web' is given twice ('web=5' and 'web=1'); give it once"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, extra, message):
    files = _sweep(tmp_path, n=30)
    rc = main(["optimize", *files, "--predictor", "linear", "--samples", "200", "--top-k",
               "10", "--out", str(tmp_path / "o"), *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one line, no traceback
    assert not (tmp_path / "o" / "weights.json").exists()


@pytest.mark.parametrize(
    "prefix,extra,message",
    [
        # the prefix is stripped: the name as it stands in the CSV header is not a domain
        ("train_", ["--min-weight", "train_web=0.1"],
         "--min-weight: unknown domain 'train_web'; did you mean ['web']?"),
        ("", ["--max-weight", "web=0.5"],
         "--max-weight: unknown domain 'web'; did you mean ['train_web']?"),
        ("", ["--token-counts", "web=1,code=1,books=1,math=1", "--total-tokens", "1"],
         "--token-counts: unknown domains ['books', 'code', 'math', 'web']; did you mean "
         "['train_books', 'train_code', 'train_math', 'train_web']?"),
        ("train_", ["--max-weight", "nope=0.5"],
         "unknown domain 'nope'; the domains are ['web', 'code', 'books', 'math']"),
    ],
)
def test_unknown_domain_says_which_there_are(tmp_path, capsys, prefix, extra, message):
    # "unknown domain 'web'" alone left the user to guess the names (a prefix kept or stripped)
    files = _sweep(tmp_path, n=30, single=True)
    domains = ["--domain-prefix", prefix] if prefix else ["--domains", ",".join(
        f"train_{d}" for d in DOMAINS)]
    rc = main(["optimize", *files, *domains, "--target", "val/loss", "--predictor", "linear",
               "--samples", "200", "--top-k", "10", "--out", str(tmp_path / "o"), *extra])
    assert rc == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--total-tokens", "--max-epochs", "--holdout"])
def test_float_flags_refuse_digit_grouping(tmp_path, capsys, flag):
    files = _sweep(tmp_path, n=30)
    with pytest.raises(SystemExit) as exc:
        main(["optimize", *files, "--target", "val/loss", flag, "0_1"])
    assert exc.value.code == 2
    assert f"argument {flag}: invalid number: '0_1'" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--samples", "--top-k", "--seed"])
@pytest.mark.parametrize("text", ["1_000", "\u0661\u0662", "12.0"])
def test_integer_flags_take_plain_decimal_integers(tmp_path, capsys, flag, text):
    # int() read '1_000' as 1000 and Arabic-Indic digits as 12, which the float flags refuse.
    files = _sweep(tmp_path, n=30)
    with pytest.raises(SystemExit) as exc:
        main(["optimize", *files, "--target", "val/loss", flag, text])
    assert exc.value.code == 2
    assert f"argument {flag}: invalid integer: {text!r}" in capsys.readouterr().err


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


def _rewrite(path, edit):
    """Rewrite a CSV written by ``_sweep`` through ``edit(rows) -> rows``."""
    rows = list(csv.reader(path.open(newline="")))
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(edit(rows))


def _fast(files, out, *extra):
    return main(["optimize", *files, "--predictor", "linear", "--samples", "300", "--top-k",
                 "10", "--out", str(out), *extra])


def test_a_typo_in_a_numeric_column_is_an_error_naming_it(tmp_path, capsys):
    files = _sweep(tmp_path, n=30)
    mix, met = (tmp_path / "mix.csv", tmp_path / "met.csv")

    def typo(rows):
        rows[8][3] = "0.0O1"  # books of run007: the column used to vanish from weights.json
        return rows

    _rewrite(mix, typo)
    assert _fast(files, tmp_path / "o", "--target", "val/loss") == 2
    err = capsys.readouterr().err
    assert "column 'books'" in err and "run 'run007' (row 7)" in err and "'0.0O1'" in err
    assert not (tmp_path / "o" / "weights.json").exists()
    # in the target column: named too, not "no metric 'val/loss'"
    files = _sweep(tmp_path, n=30)
    _rewrite(met, lambda rows: [r if i != 5 else [r[0], "1.2x", r[2]]
                                for i, r in enumerate(rows)])
    assert _fast(files, tmp_path / "o", "--target", "val/loss") == 2
    err = capsys.readouterr().err
    assert "column 'val/loss'" in err and "'1.2x' is not a number" in err
    # ... but a typo in a metric that is not a target does not matter
    assert _fast(files, tmp_path / "o", "--target", "val/code") == 0
    # a column of text (run names) is still no domain
    _rewrite(mix, lambda rows: [r + (["label"] if i == 0 else [f"mix {i}"])
                                for i, r in enumerate(rows)])
    assert _fast(files, tmp_path / "o", "--target", "val/code") == 0
    w = json.loads((tmp_path / "o" / "weights.json").read_text())["weights"]
    assert list(w) == DOMAINS


def test_only_the_targets_are_checked_for_nan(tmp_path, capsys):
    files = _sweep(tmp_path, n=30)
    met = tmp_path / "met.csv"
    # an empty column and a metric with gaps, next to complete val/loss and val/code
    _rewrite(met, lambda rows: [r + (["empty", "val/gaps"] if i == 0 else
                                     ["", "" if i % 3 == 0 else f"{1.5 + i / 100}"])
                                for i, r in enumerate(rows)])
    out = tmp_path / "o"
    assert _fast(files, out, "--target", "val/loss", "--drop-nan") == 0
    meta = json.loads((out / "weights.json").read_text())
    assert meta["sweep"]["runs"] == 30  # no run dropped for the other columns' NaNs
    assert _fast(files, out, "--target", "val/loss") == 0
    assert _fast(files, out, "--target", "val/gaps") == 2
    err = capsys.readouterr().err
    assert "target 'val/gaps' is NaN/inf" in err and "pass --drop-nan" in err
    assert "missing=" not in err
    assert _fast(files, out, "--target", "val/gaps", "--drop-nan") == 0
    assert json.loads((out / "weights.json").read_text())["sweep"]["runs"] == 20


def test_a_domain_the_sweep_never_varied_keeps_its_weight(tmp_path, capsys):
    # Without variation no predictor knows what another weight would do (a law's coefficient
    # for it is its random start): the weight stays where every run had it, whatever the seed.
    files = _sweep(tmp_path, n=30)
    _rewrite(tmp_path / "mix.csv",
             lambda rows: [r + (["extra"] if i == 0 else ["0"]) for i, r in enumerate(rows)])
    for seed in ("0", "1", "5"):
        out = tmp_path / f"o{seed}"
        assert main(["optimize", *files, "--target", "val/loss", "--predictor", "law",
                     "--samples", "500", "--top-k", "10", "--seed", seed, "--out", str(out)]) == 0
        assert json.loads((out / "weights.json").read_text())["weights"]["extra"] == 0.0
    assert "Kept at the weight every run had" in (out / "summary.md").read_text()
    assert _fast(files, tmp_path / "o", "--target", "val/loss", "--min-weight", "extra=0.1") == 2
    assert "'extra' has weight 0 in every run" in capsys.readouterr().err


def test_constant_targets_and_holdout_messages(tmp_path, capsys):
    files = _sweep(tmp_path, n=30)
    _rewrite(tmp_path / "met.csv",
             lambda rows: [r + (["flat"] if i == 0 else ["3.0"]) for i, r in enumerate(rows)])
    assert _fast(files, tmp_path / "o", "--target", "flat") == 2
    assert "same value in every run" in capsys.readouterr().err
    assert _fast(files, tmp_path / "o", "--target", "val/loss", "--target", "flat") == 0
    assert _fast(files, tmp_path / "o", "--target", "val/loss", "--holdout", "0.999") == 2
    err = capsys.readouterr().err
    assert "error: --holdout=0.999 leaves" in err and "test_fraction" not in err
    assert _fast(files, tmp_path / "o", "--target", "val/loss", "--holdout", "0.05") == 2
    assert "error: --holdout=0.05 leaves 2 of 30 runs" in capsys.readouterr().err
    # A message that already names the flag keeps it as it is (it became '----holdout').
    assert _fast(files, tmp_path / "o", "--target", "val/loss", "--holdout", "1.5") == 2
    assert "error: --holdout must lie in [0, 1), got 1.5" in capsys.readouterr().err


def test_a_metric_name_with_an_equals_sign(tmp_path):
    files = _sweep(tmp_path, n=30)
    _rewrite(tmp_path / "met.csv",
             lambda rows: [["run", "pass@k=5", "val/code"]] + rows[1:])
    out = tmp_path / "o"
    assert _fast(files, out, "--target", "pass@k=5") == 0
    assert json.loads((out / "weights.json").read_text())["targets"] == {"pass@k=5": 1.0}
    assert _fast(files, out, "--target", "pass@k=5=2", "--target", "val/code") == 0
    targets = json.loads((out / "weights.json").read_text())["targets"]
    assert targets == {"pass@k=5": 2.0, "val/code": 1.0}


def test_csv_encodings_and_broken_quotes(tmp_path, capsys):
    files = _sweep(tmp_path, n=30)
    mix = tmp_path / "mix.csv"
    plain = main(["optimize", *files, "--predictor", "linear", "--samples", "300",
                  "--top-k", "10", "--target", "val/loss", "--out", str(tmp_path / "a")])
    # Excel's "CSV UTF-8": a byte-order mark before the header ('\ufeffrun' broke the id match)
    mix.write_bytes(b"\xef\xbb\xbf" + mix.read_bytes())
    assert plain == 0 and _fast(files, tmp_path / "b", "--target", "val/loss") == 0
    a, b = (json.loads((tmp_path / d / "weights.json").read_text()) for d in "ab")
    assert a["weights"] == b["weights"] and a["heldout"] == b["heldout"]
    # rows of empty cells at the end, as a spreadsheet exports them: no runs
    met = tmp_path / "met.csv"
    saved = mix.read_bytes(), met.read_bytes()
    mix.write_bytes(saved[0] + b",,,,\r\n,,,,\r\n")
    met.write_bytes(saved[1] + b",,\n")
    assert _fast(files, tmp_path / "c", "--target", "val/loss") == 0
    c = json.loads((tmp_path / "c" / "weights.json").read_text())
    assert c["weights"] == a["weights"] and c["sweep"]["runs"] == a["sweep"]["runs"]
    mix.write_bytes(saved[0])
    met.write_bytes(saved[1])
    # not UTF-8: the file and the line
    lines = mix.read_bytes()[3:].split(b"\n")
    lines[4] = lines[4].replace(b"run003", b"r\xe9sum\xe9")
    mix.write_bytes(b"\n".join(lines))
    assert _fast(files, tmp_path / "o", "--target", "val/loss") == 2
    err = capsys.readouterr().err
    assert f"{mix}: line 5 is not UTF-8" in err and err.count("\n") == 1
    # a quote left open swallows the rest of the file: csv's field limit, as a message
    rows = ["run,web,code,books,math", '"run000,0.25,0.25,0.25,0.25']
    rows += [f"run{i:03d},0.25,0.25,0.25,0.25" for i in range(1, 6000)]
    mix.write_text("\n".join(rows) + "\n")
    assert _fast(files, tmp_path / "o", "--target", "val/loss") == 2
    err = capsys.readouterr().err
    assert f"{mix}: line 2: field larger than field limit" in err and "quote" in err


def test_out_is_checked_before_fitting(tmp_path, capsys, monkeypatch):
    from fastmix.optimize import cli

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted before checking --out")

    monkeypatch.setattr(cli, "choose_weights", no_fit)
    files = _sweep(tmp_path, n=30)
    taken = tmp_path / "taken"
    taken.write_text("x")
    assert _fast(files, taken, "--target", "val/loss") == 2
    assert "--out" in capsys.readouterr().err and taken.read_text() == "x"
    assert _fast(files, taken / "sub", "--target", "val/loss") == 2
    err = capsys.readouterr().err
    assert "--out" in err and "cannot create" in err


def test_a_domain_twice_in_a_token_counts_json_is_an_error(tmp_path, capsys):
    # json kept the last count of a domain listed twice, without a word
    files = _sweep(tmp_path, n=30)
    counts = tmp_path / "counts.json"
    counts.write_text('{"web": 5, "code": 1, "books": 1, "math": 1, "web": 1}')
    assert _fast(files, tmp_path / "o", "--target", "val/loss", "--token-counts", str(counts),
                 "--total-tokens", "1") == 2
    err = capsys.readouterr().err
    assert "--token-counts: cannot read" in err and "the key 'web' appears twice" in err


def test_a_token_counts_file_may_count_domains_the_sweep_lacks(tmp_path, capsys):
    # A corpus-wide count file (more sources than the sweep's domains) was refused outright.
    files = _sweep(tmp_path, n=30)
    counts = {"web": 50, "code": 40, "books": 10, "math": 20}
    wide, narrow = tmp_path / "wide.json", tmp_path / "narrow.json"
    wide.write_text(json.dumps({**counts, "papers": 7, "forum": 3}))
    narrow.write_text(json.dumps(counts))
    args = ("--target", "val/loss", "--total-tokens", "100", "--max-epochs", "1")
    assert _fast(files, tmp_path / "w", *args, "--token-counts", str(wide)) == 0
    assert "ignoring 2 domain(s) the sweep does not have ('papers', 'forum')" in (
        capsys.readouterr().err)
    assert _fast(files, tmp_path / "n", *args, "--token-counts", str(narrow)) == 0
    assert (json.loads((tmp_path / "w" / "weights.json").read_text())["weights"]
            == json.loads((tmp_path / "n" / "weights.json").read_text())["weights"])
    # A sweep domain the file names otherwise still has no count; so on the command line,
    # extra names stay an error (typed by hand, they are more likely typos).
    del counts["math"]
    wide.write_text(json.dumps({**counts, "mathematics": 20}))
    assert _fast(files, tmp_path / "x", *args, "--token-counts", str(wide)) == 2
    assert "--token-counts: no count for domains ['math']" in capsys.readouterr().err
    assert _fast(files, tmp_path / "y", *args, "--token-counts",
                 "web=1,code=1,books=1,math=1,papers=1") == 2
    assert "unknown domains ['papers']" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_named_pipe_as_an_input_is_an_error_not_a_hang(tmp_path, capsys):
    # --token-counts counts.json named a FIFO: reading it waited for a writer forever.
    files = _sweep(tmp_path, n=30)
    fifo = tmp_path / "counts.json"
    os.mkfifo(fifo)
    result = []
    args = ("--target", "val/loss", "--token-counts", str(fifo), "--total-tokens", "1")
    worker = threading.Thread(target=lambda: result.append(_fast(files, tmp_path / "o", *args)))
    worker.start()
    worker.join(30)
    if worker.is_alive():  # release the reader (it gets an empty file), then fail
        with open(fifo, "w"):
            pass
        worker.join()
    assert result == [2]
    assert f"--token-counts: {fifo} is not a regular file" in capsys.readouterr().err
    # a sweep CSV that is one: named as such (it said 'no such CSV file')
    assert _fast([str(fifo), files[1]], tmp_path / "o", "--target", "val/loss") == 2
    assert f"{fifo} is not a regular file" in capsys.readouterr().err


def test_an_empty_out_is_an_error_not_the_current_folder(tmp_path, capsys, monkeypatch):
    # `--out "$OUT"` with OUT unset: Path("") is ".", and the results went to the cwd.
    files = _sweep(tmp_path, n=30)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert _fast(files, "", "--target", "val/loss") == 2
    assert "--out: empty path" in capsys.readouterr().err
    assert list(cwd.iterdir()) == []


def test_prior_errors_name_the_flag_and_the_sweep(tmp_path, capsys):
    files = _sweep(tmp_path, n=30)
    prior = tmp_path / "prior.json"
    for content, message in [
        ({"web": "0.5", "code": 0.5}, "weights['web'] must be a number, got '0.5'"),
        ({"web": 0.5, "wiki": 0.5}, "the sweep has ['web', 'code', 'books', 'math']"),
        ([0.5, 0.5], "weights has 2 entries, the sweep has 4 domains"),
    ]:
        prior.write_text(json.dumps(content))
        assert _fast(files, tmp_path / "o", "--target", "val/loss", "--prior", str(prior)) == 2
        err = capsys.readouterr().err
        assert f"--prior: {prior}: " in err and message in err and "corpus" not in err
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"web": "lots", "code": 1, "books": 1, "math": 1}))
    assert _fast(files, tmp_path / "o", "--target", "val/loss", "--token-counts", str(tokens),
                 "--total-tokens", "1") == 2
    assert f"--token-counts: {tokens}: count of 'web' is 'lots', not a number" in \
        capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--prior", "--token-counts"])
def test_unreadable_json_is_a_one_line_error_naming_the_file(tmp_path, capsys, flag):
    # JSON nested past the recursion limit raised a RecursionError traceback.
    files = _sweep(tmp_path, n=30)
    path = tmp_path / "w.json"
    for content, reason in [
        (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
        (b"[" * 100_000, "JSON nested too deeply"),
        (b"\xff\xfe{}", "is not UTF-8 text"),
    ]:
        path.write_bytes(content)
        extra = ["--total-tokens", "1"] if flag == "--token-counts" else []
        assert _fast(files, tmp_path / "o", "--target", "val/loss", flag, str(path), *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fastmix optimize: error: {flag}: ") and err.count("\n") == 1
        assert str(path) in err and reason in err


def test_token_shares_are_the_default_prior(tmp_path):
    files = _sweep(tmp_path, n=30)
    out = tmp_path / "o"
    # web alone could fill the run: its share of the tokens is still 0.91, not 1/1.3
    assert _fast(files, out, "--target", "val/loss", "--token-counts",
                 "web=1000,code=40,books=30,math=30", "--total-tokens", "100") == 0
    rows = list(csv.reader((out / "summary.csv").open()))
    prior = {r[1]: float(r[5]) for r in rows if r[0] == "weight"}
    assert prior == pytest.approx({"web": 1000 / 1100, "code": 40 / 1100, "books": 30 / 1100,
                                   "math": 30 / 1100})


@pytest.mark.filterwarnings("error")  # the overflow warning leaked too
def test_token_counts_near_the_float64_limit(tmp_path, capsys):
    # The counts summed to inf, the shares to 0, and the error blamed a --prior never given.
    files = _sweep(tmp_path, n=30)
    out = tmp_path / "o"
    assert _fast(files, out, "--target", "val/loss", "--token-counts",
                 "web=1e308,code=1e308,books=1e308,math=5e307", "--total-tokens", "1e9") == 0
    rows = list(csv.reader((out / "summary.csv").read_text().splitlines()))
    prior = {r[1]: float(r[5]) for r in rows if r[0] == "weight"}
    assert prior == pytest.approx({"web": 2 / 7, "code": 2 / 7, "books": 2 / 7, "math": 1 / 7})
    tokens = tmp_path / "tokens.json"
    tokens.write_text('{"web": 1' + "0" * 400 + ', "code": 1, "books": 1, "math": 1}')
    assert _fast(files, out, "--target", "val/loss", "--token-counts", str(tokens),
                 "--total-tokens", "1") == 2
    err = capsys.readouterr().err
    assert f"--token-counts: {tokens}: count of 'web' is too large for float64" in err
    assert err.count("\n") == 1


def test_missing_tree_libraries_are_a_one_line_error(tmp_path, capsys, monkeypatch):
    import sys

    # None in sys.modules makes `import lightgbm` fail, as when it is not installed.
    monkeypatch.setitem(sys.modules, "lightgbm", None)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    files = _sweep(tmp_path, n=30)
    rc = main(["optimize", *files, "--target", "val/loss", "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert 'pip install "fastmix[trees]"' in err and "--predictor law|linear" in err
    assert err.count("\n") == 1 and "law+trees" in err
    assert _fast(files, tmp_path / "o", "--target", "val/loss") == 0  # linear needs neither


def test_dollar_signs_in_metric_names_are_plotted_literally(tmp_path):
    files = _sweep(tmp_path, n=30)
    # mathtext would parse '$_$' and fail after weights.json was written
    _rewrite(tmp_path / "met.csv",
             lambda rows: [["run", "val$_$loss", "val/$^$code"]] + rows[1:])
    out = tmp_path / "o"
    assert main(["optimize", *files, "--target", "val$_$loss", "--target", "val/$^$code",
                 "--predictor", "linear", "--samples", "300", "--top-k", "10",
                 "--out", str(out)]) == 0
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_plot_leaves_no_stale_plot(tmp_path, capsys, monkeypatch):
    from fastmix.optimize import cli

    files = _sweep(tmp_path, n=30)
    out = tmp_path / "o"
    assert _fast(files, out, "--target", "val/loss") == 0
    assert (out / "plot.png").exists()
    capsys.readouterr()

    def broken(choice):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(cli, "_render_plot", broken)
    assert _fast(files, out, "--target", "val/code") == 1
    err = capsys.readouterr().err
    assert "drawing plot.png failed: RuntimeError: no fonts" in err and err.count("\n") == 1
    assert not (out / "plot.png").exists()  # the old plot showed another target
    assert json.loads((out / "weights.json").read_text())["targets"] == {"val/code": 1.0}
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv", "summary.md",
                                                     "weights.json"]



def test_a_run_that_fails_while_writing_leaves_the_last_runs_outputs(
    tmp_path, capsys, full_disk_at
):
    # The outputs were written one by one: a full disk at summary.csv left the new weights.json
    # and summary.md beside the old summary.csv and plot.png.
    files = _sweep(tmp_path, n=30)
    out = tmp_path / "o"
    assert _fast(files, out, "--target", "val/loss") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["plot.png", "summary.csv", "summary.md", "weights.json"]
    full_disk_at("summary.csv")
    assert _fast(files, out, "--target", "val/code") == 1
    assert "No space left on device" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

@pytest.mark.parametrize("name", ["summary.csv", "weights.json", "summary.md", "plot.png"])
def test_an_input_inside_out_under_an_output_name_is_refused(tmp_path, capsys, name):
    _sweep(tmp_path, n=30, single=True)
    out = tmp_path / "ow"
    out.mkdir()
    inside = out / name
    (tmp_path / "sweep.csv").rename(inside)
    before = inside.read_bytes()
    rc = main(["optimize", str(inside), "--domain-prefix", "train_", "--target", "val/loss",
               "--predictor", "linear", "--samples", "300", "--top-k", "10", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--out" in err and str(inside) in err and "Traceback" not in err
    assert inside.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [name]


def test_prior_and_token_counts_inside_out_are_refused(tmp_path, capsys):
    files = _sweep(tmp_path, n=30)
    out = tmp_path / "o"
    out.mkdir()
    prior = out / "weights.json"
    prior.write_text(json.dumps({d: 0.25 for d in DOMAINS}))
    assert _fast(files, out, "--target", "val/loss", "--prior", str(prior)) == 2
    assert "--prior" in capsys.readouterr().err
    prior.rename(out / "summary.md")
    hard = tmp_path / "link.json"  # the same file under another name
    hard.hardlink_to(out / "summary.md")
    assert _fast(files, out, "--target", "val/loss", "--token-counts", str(hard)) == 2
    assert "--token-counts" in capsys.readouterr().err
    assert json.loads(hard.read_text()) == {d: 0.25 for d in DOMAINS}


def test_an_output_name_taken_by_a_folder_fails_before_the_work(tmp_path, capsys):
    files = _sweep(tmp_path, n=30)
    out = tmp_path / "o"
    (out / "summary.csv").mkdir(parents=True)
    assert _fast(files, out, "--target", "val/loss") == 2
    err = capsys.readouterr().err
    assert str(out / "summary.csv") in err and "directory" in err
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv"]
