"""``fastmix optimize``: choose mixture weights from a sweep of small runs.

Reads the sweep (one CSV with both mixtures and metrics, or a mixtures CSV and a metrics CSV),
fits a predictor per target, scores it on held-out runs, searches the weights under the
constraints and writes, into ``--out``:

- ``weights.json``: ``{"weights": {domain: weight}, ...metadata}`` (what ``MixtureDataset``
  reads);
- ``summary.md`` and ``summary.csv``: held-out scores, the chosen weights next to the bounds and
  the prior, the Pareto trade-offs with several targets (also printed);
- ``plot.png``: predicted vs observed on the held-out runs, plus the Pareto front of the first
  two targets when there are several.

Every file is written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastmix._checks import float_flag, int_flag, parse_float, unique_keys
from fastmix._io import atomic_write_files, json_text, path_arg, writable_dir

from .choose import Choice, choose_weights
from .predictors import PREDICTORS, _exponent
from .search import Constraints, domain_hint
from .sweep import (
    Sweep,
    data_columns,
    load_sweep,
    read_csv_columns,
    shared_id_column,
    value_columns,
)

# Upper bound of --samples: every sample is a row of K float64 weights, copied a few times while
# projecting and predicting.  Sampling 2,000,000 mixtures of 24 domains peaks at 3.6 GB and
# takes 45 s on one core (measured); a larger number would more likely be a typo that ends in
# a MemoryError than a wish.
MAX_SAMPLES = 2_000_000
# Largest --seed: the common 32-bit seed range, which every predictor backend accepts.
MAX_SEED = 2**32 - 1
# Python argument names in library messages -> the flags a command-line user typed.
_FLAGS = {"min_weight": "--min-weight", "max_weight": "--max-weight",
          "token_counts": "--token-counts", "total_tokens": "--total-tokens",
          "max_epochs": "--max-epochs", "id_column": "--id-column",
          "test_fraction": "--holdout", "holdout": "--holdout"}
# The files written into --out.
_OUTPUTS = ("weights.json", "summary.md", "summary.csv", "plot.png")


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``optimize`` arguments to ``parser``."""
    parser.add_argument("sweep", nargs="+", metavar="CSV",
                        help="one CSV holding mixtures and metrics (with --domains or "
                             "--domain-prefix), or a mixtures CSV followed by a metrics CSV")
    parser.add_argument("--target", action="append", default=[], metavar="NAME[=WEIGHT]",
                        help="metric to minimise (repeat for a weighted sum of standardised "
                             "targets; default: the only metric); a metric whose name "
                             "contains '=' is taken whole")
    parser.add_argument("--maximize", action="append", default=[], metavar="NAME",
                        help="a target where higher is better (accuracy)")
    parser.add_argument("--predictor", choices=PREDICTORS, default="law+trees",
                        help="model of a metric given the mixture (default: law+trees; trees "
                             'need pip install "fastmix[trees]")')
    parser.add_argument("--tune", action="store_true",
                        help="choose the tree settings by 5-fold CV on the training runs")
    parser.add_argument("--domains", help="comma-separated mixture columns (single-CSV sweeps)")
    parser.add_argument("--domain-prefix",
                        help="mixture columns are those starting with this (single-CSV sweeps); "
                             "it is stripped from the domain names")
    parser.add_argument("--strip-prefix", help="remove this prefix from domain names")
    parser.add_argument("--id-column", help="column matching runs across the two CSVs")
    parser.add_argument("--drop-nan", action="store_true",
                        help="drop runs with a NaN target instead of failing")
    parser.add_argument("--min-weight", action="append", default=[], metavar="[NAME=]W",
                        help="lower bound for every domain, or for NAME (repeatable)")
    parser.add_argument("--max-weight", action="append", default=[], metavar="[NAME=]W",
                        help="upper bound for every domain, or for NAME (repeatable)")
    parser.add_argument("--token-counts", metavar="JSON|NAME=N,...",
                        help="tokens available per domain: a JSON file {domain: count} "
                             "(domains the sweep lacks are ignored, with a note) or "
                             "comma-separated NAME=COUNT")
    parser.add_argument("--total-tokens", type=float_flag, help="tokens the target run trains on")
    parser.add_argument("--max-epochs", type=float_flag,
                        help="passes allowed over each domain's tokens (default 1 with token "
                             "counts: no token is seen twice)")
    parser.add_argument("--prior", metavar="JSON",
                        help="centre of the search: a weights JSON (default: the mean sweep "
                             "mixture, or each domain's share of the tokens, count / total of "
                             "--token-counts over the sweep's domains, when token counts are "
                             "given)")
    parser.add_argument("--holdout", type=float_flag, default=0.2,
                        help="fraction of runs held out to score the predictor "
                             "(default 0.2; 0 to skip)")
    parser.add_argument("--samples", type=int_flag, default=50_000,
                        help=f"mixtures sampled (default 50,000; at most {MAX_SAMPLES:,})")
    parser.add_argument("--top-k", type=int_flag, default=100,
                        help="best samples averaged (default 100)")
    parser.add_argument("--seed", type=int_flag, default=0, help="0 to 2**32 - 1 (default 0)")
    parser.add_argument("--out", default="fastmix-optimize",
                        help="output directory (default fastmix-optimize)")


def run(args: argparse.Namespace) -> int:
    """Run ``fastmix optimize``; returns the exit status (2 on bad input, 1 if writing fails)."""
    try:
        # path_arg before Path(): Path("") is ".", and `--out "$OUT"` with OUT unset wrote into
        # the cwd (the check in writable_dir saw ".")
        out = path_arg(args.out, "--out")
        _check_settings(args)
        _check_outputs(args, out)  # before any work, not after it
        sweep, targets = _load(args)
        unknown = [m for m in args.maximize if m not in targets]
        if unknown:
            raise ValueError(f"--maximize: {unknown} are not among the --target metrics "
                             f"{list(targets)}")
        flat = [t for t in targets if np.ptp(sweep.target(t)) == 0]
        if len(flat) == len(targets):
            raise ValueError(f"--target: {flat} has the same value in every run: there is "
                             "nothing to optimise")
        constraints = _constraints(args, sweep)
        prior = _prior(args, sweep, constraints)
        writable_dir(out, "--out")  # before the fitting, not after it
        choice = choose_weights(sweep, targets, predictor=args.predictor, tune=args.tune,
                                constraints=constraints, maximize=args.maximize, prior=prior,
                                holdout=args.holdout, samples=args.samples, top_k=args.top_k,
                                seed=args.seed)
    except ValueError as exc:  # library messages name Python arguments: say the flags
        return _error(_as_flags(exc), 2)
    except ImportError as exc:  # the trees extra is missing
        return _error(exc, 2)
    md, rows = _summary(choice, sweep, constraints, prior)
    meta = json_text(_metadata(choice, sweep, constraints, args))
    try:
        png, plot_error = _render_plot(choice), None
    except Exception as exc:  # noqa: BLE001 - any plotting failure: the weights still count
        png, plot_error = None, exc
    files = [(out / "summary.md", md.encode()), (out / "summary.csv", _csv(rows).encode())]
    if png is not None:
        files.append((out / "plot.png", png))
    try:
        # As one set, weights.json renamed last: a run that fails while writing leaves the
        # earlier run's outputs as they were, not new weights beside an old summary.
        atomic_write_files([*files, (out / "weights.json", meta.encode())])
        if png is None:  # a plot of an earlier run must not sit beside these results
            (out / "plot.png").unlink(missing_ok=True)
    except OSError as exc:
        return _error(f"cannot write to {out}: {exc.strerror or exc}", 1)
    print(md)
    if plot_error is not None:
        return _error(f"wrote {out / 'weights.json'}, {out / 'summary.md'} and "
                      f"{out / 'summary.csv'}, but drawing plot.png failed: "
                      f"{type(plot_error).__name__}: {plot_error}", 1)
    print(f"wrote {out / 'weights.json'}, {out / 'summary.md'}, {out / 'summary.csv'}, "
          f"{out / 'plot.png'}")
    return 0


def _error(exc: BaseException | str, status: int) -> int:
    message = " ".join(str(exc).split())  # one line, whatever the message held
    print(f"fastmix optimize: error: {message}", file=sys.stderr)
    return status


def _as_flags(exc: Exception, flags: dict[str, str] | None = None) -> ValueError:
    """The message of ``exc`` with Python argument names replaced by command-line flags.

    Quoted text (domain and metric names) is left alone, so a domain called ``min_weight``
    keeps its name.
    """
    flags = _FLAGS if flags is None else {**_FLAGS, **flags}
    # Not after a '-': a flag already in the message ('--holdout must ...') stays as it is.
    pattern = re.compile(r"'[^']*'|(?<![\w-])(" + "|".join(map(re.escape, flags)) + r")\b")
    text = pattern.sub(lambda m: flags[m.group(1)] if m.group(1) else m.group(0), str(exc))
    return ValueError(text)


# ------------------------------------------------------------------------------------ inputs
def _check_settings(args: argparse.Namespace) -> None:
    """The numeric flags, checked before any file is read."""
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must lie in [0, 2**32 - 1], got {args.seed}")
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if args.samples > MAX_SAMPLES:
        raise ValueError(f"--samples must be at most {MAX_SAMPLES:,} (every sample is held in "
                         f"memory), got {args.samples:,}")
    if not 1 <= args.top_k <= args.samples:
        raise ValueError(f"--top-k must lie in [1, --samples={args.samples}], got {args.top_k}")
    if not 0 <= args.holdout < 1:
        raise ValueError(f"--holdout must lie in [0, 1), got {args.holdout}")


def _check_outputs(args: argparse.Namespace, out: Path) -> None:
    """No output name in --out is taken by a folder, and no output would replace an input.

    A sweep saved as ``<out>/summary.csv`` was silently replaced by the summary.
    """
    inputs = [("the sweep CSV", s) for s in args.sweep]
    if args.prior:
        inputs.append(("--prior", args.prior))
    if args.token_counts and Path(args.token_counts).is_file():
        inputs.append(("--token-counts", args.token_counts))
    for name in _OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            raise ValueError(f"--out: {path} is a directory; {name} cannot be written there")
        for what, src in inputs:
            try:
                same = os.path.samefile(src, path)
            except (OSError, ValueError):  # either missing, or a name the OS refuses
                same = False
            if same:
                raise ValueError(f"--out: {path} is {what} {src}; writing {name} would "
                                 "overwrite it: choose another --out or move the input")


def _load(args: argparse.Namespace) -> tuple[Sweep, dict[str, float]]:
    """The sweep, holding only the chosen targets, and ``{target: weight}``.

    Targets are chosen before loading so that only they are checked for NaN: a sweep's other
    metric columns (an unrelated, empty or broken one) neither fail the command nor, with
    --drop-nan, drop runs.
    """
    id_column = None
    domains = None
    strip_flag = "--strip-prefix"
    if len(args.sweep) == 2:
        if args.domains or args.domain_prefix:
            raise ValueError("--domains/--domain-prefix apply to a single-CSV sweep")
        mix = read_csv_columns(args.sweep[0])
        met = read_csv_columns(args.sweep[1])
        id_column = args.id_column
        strip = args.strip_prefix
    elif len(args.sweep) == 1:
        cols = read_csv_columns(args.sweep[0])
        if args.domains:
            domains = [d.strip() for d in args.domains.split(",") if d.strip()]
            unknown = [d for d in domains if d not in cols]
            if unknown:
                raise ValueError(f"--domains: {args.sweep[0]} has no column {unknown}")
        elif args.domain_prefix:
            domains = [c for c in cols if c.startswith(args.domain_prefix)]
            if not domains:
                raise ValueError(f"--domain-prefix: no column of {args.sweep[0]} starts with "
                                 f"{args.domain_prefix!r}")
        else:
            raise ValueError("a single-CSV sweep needs --domains or --domain-prefix to tell "
                             "the mixture columns from the metrics")
        mix = {d: cols[d] for d in domains}
        met = {c: v for c, v in cols.items() if c not in mix}
        strip = args.strip_prefix or args.domain_prefix
        if not args.strip_prefix:
            strip_flag = "--domain-prefix"
    else:
        raise ValueError(f"give one or two CSV files, got {len(args.sweep)}")

    key = id_column or shared_id_column(mix, met)
    if args.target:
        targets = _targets(args.target, data_columns(met, key or args.id_column))
    else:
        numeric = value_columns(met, "metrics", key)
        if len(numeric) != 1:
            hint = f", e.g. --target {numeric[0]!r}" if numeric else ""
            raise ValueError(f"--target: the sweep has {len(numeric)} numeric metrics; name one "
                             f"or more{hint}")
        targets = {numeric[0]: 1.0}
    try:
        sweep = load_sweep(mix, met, id_column=id_column, domains=domains, targets=list(targets),
                           strip_prefix=strip, missing="drop" if args.drop_nan else "raise")
    except ValueError as exc:
        text = str(exc).replace("pass missing='drop'", "pass --drop-nan")
        raise _as_flags(ValueError(text), {"strip_prefix": strip_flag}) from None
    return sweep, targets


def _targets(specs: Sequence[str], metrics: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    given: dict[str, str] = {}  # metric -> the --target that named it
    for spec in specs:
        name, weight = spec, 1.0
        head, sep, tail = spec.rpartition("=")
        # 'pass@k=5' may be a metric's name: the whole string wins over NAME=WEIGHT.
        if sep and head and spec not in metrics:
            try:
                name, weight = head, parse_float(tail)
            except ValueError:
                name = spec
        if name not in metrics:
            # Names holding the one typed, then look-alikes ('metric/pile_cc_val_loss' for
            # 'metric/the_pile_pile_cc_val_loss': a part left out, not a part typed).
            close = [t for t in metrics if name.lower() in t.lower()]
            close += difflib.get_close_matches(name, metrics, n=5, cutoff=0.75)
            close = list(dict.fromkeys(close))[:5]
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(f"--target: no metric {name!r}{hint}")
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"--target: weight of {name!r} must be >= 0, got {weight:g}")
        # A second --target of a metric replaced the first without a word.
        if name in given:
            raise ValueError(f"--target: metric {name!r} is given twice ({given[name]!r} and "
                             f"{spec!r}); give each metric once")
        given[name] = spec
        out[name] = weight
    if not sum(out.values()) > 0:
        raise ValueError("--target: the weights sum to 0")
    return out


def _pairs(specs: Sequence[str], what: str, domains: Sequence[str]) -> Any:
    """``["0.01", "arxiv=0.2"]`` -> a per-domain array (global value, then per-name values)."""
    if not specs:
        return None
    default = None
    named: dict[str, float] = {}
    # A second value for a domain (or for every domain) replaced the first without a word.
    given: dict[str | None, str] = {}  # domain (None: every domain) -> the part that set it
    for spec in specs:
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, value = part.rpartition("=")
            try:
                v = parse_float(value)  # float() reads the typo 0_1 as 1.0
            except ValueError:
                raise ValueError(f"{what}: {part!r} is not NAME=NUMBER or NUMBER") from None
            if sep and name not in domains:
                raise ValueError(f"{what}: unknown domain {name!r}{domain_hint([name], domains)}")
            key = name if sep else None
            if key in given:
                which = f"domain {name!r}" if sep else "the value for every domain"
                raise ValueError(f"{what}: {which} is given twice ({given[key]!r} and "
                                 f"{part!r}); give it once")
            given[key] = part
            if sep:
                named[name] = v
            else:
                default = v
    base = 0.0 if what == "--min-weight" else 1.0
    return np.array([named.get(d, base if default is None else default) for d in domains])


def _is_counts_file(spec: str) -> bool:
    """Whether ``--token-counts`` names a JSON file (else it is ``NAME=COUNT,...``)."""
    p = Path(spec)
    return p.suffix.lower() == ".json" or p.is_file()


def _token_counts(spec: str) -> dict[str, float]:
    """``--token-counts``: a JSON file ``{domain: count}`` or ``NAME=COUNT,...``."""
    p = Path(spec)
    if _is_counts_file(spec):
        if p.exists() and not p.is_file():  # reading a FIFO waited for a writer forever
            raise ValueError(f"--token-counts: {p} is not a regular file")
        try:
            data = json.loads(p.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
        except FileNotFoundError:
            raise ValueError(f"--token-counts: no such file {p}") from None
        except UnicodeDecodeError:
            raise ValueError(f"--token-counts: {p} is not UTF-8 text") from None
        except RecursionError:  # json's decoder recurses once per level of nesting
            raise ValueError(f"--token-counts: cannot read {p}: JSON nested too deeply") from None
        except (OSError, ValueError) as exc:  # (a JSONDecodeError or a key given twice)
            raise ValueError(f"--token-counts: cannot read {p}: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"--token-counts: {p} must hold {{domain: count}}, not a "
                             f"{type(data).__name__}")
        items = list(data.items())
        where = f"{p}: "
    else:
        items = []
        named: dict[str, str] = {}  # domain -> the part that gave its count
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, value = part.rpartition("=")
            if not sep or not name.strip():
                raise ValueError(f"--token-counts: {part!r} is not NAME=COUNT; give "
                                 "comma-separated NAME=COUNT pairs or a JSON file "
                                 "{domain: count}")
            name = name.strip()
            if name in named:  # (a second count of a domain replaced the first without a word)
                raise ValueError(f"--token-counts: domain {name!r} is given twice ({named[name]!r} "
                                 f"and {part!r}); give it once")
            named[name] = part
            items.append((name, value.strip()))
        where = ""
    counts: dict[str, float] = {}
    for name, value in items:
        try:
            if where and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TypeError  # JSON text such as "1e9", true or null is not a count
            count = parse_float(value)
        except OverflowError:  # a JSON integer beyond float64
            raise ValueError(f"--token-counts: {where}count of {name!r} is too large for "
                             "float64") from None
        except (TypeError, ValueError):
            raise ValueError(f"--token-counts: {where}count of {name!r} is {value!r}, not a "
                             "number") from None
        if not (math.isfinite(count) and count >= 0):
            raise ValueError(f"--token-counts: {where}count of {name!r} is {value!r}; counts "
                             "are finite and >= 0")
        counts[str(name)] = count
    if not counts:
        raise ValueError("--token-counts: no counts given")
    return counts


def _fixed_domains(sweep: Sweep) -> list[int]:
    """Domains at the same weight in every run (up to renormalisation rounding)."""
    if sweep.num_runs < 2:
        return []
    return [int(j) for j in np.flatnonzero(np.ptp(sweep.mixtures, axis=0) <= 1e-9)]


def _constraints(args: argparse.Namespace, sweep: Sweep) -> Constraints:
    lo = _pairs(args.min_weight, "--min-weight", sweep.domains)
    hi = _pairs(args.max_weight, "--max-weight", sweep.domains)
    fixed = _fixed_domains(sweep)
    if fixed:
        # The sweep never changed these domains' weights, so no predictor can know what another
        # weight would do (a law's coefficient for them is whatever its random start was): keep
        # each at the weight every run had.
        lo = np.zeros(sweep.num_domains) if lo is None else lo
        hi = np.ones(sweep.num_domains) if hi is None else hi
        for j in fixed:
            v = float(np.clip(sweep.mixtures[0, j], 0.0, 1.0))
            if not lo[j] - 1e-12 <= v <= hi[j] + 1e-12:
                raise ValueError(
                    f"domain {sweep.domains[j]!r} has weight {v:g} in every run of the sweep, "
                    f"so it is kept there, but --min-weight/--max-weight exclude {v:g}")
            lo[j] = hi[j] = v
    tokens = _token_counts(args.token_counts) if args.token_counts else None
    if tokens is not None and _is_counts_file(args.token_counts):
        # A file of counts is often the whole corpus's (olmix's lists 116 sources beside a
        # 64-domain sweep): the domains the sweep lacks are no weight to choose.  A name the
        # sweep has and the file misspells is still an error (that domain has no count).
        known = set(sweep.domains)
        extra = [name for name in tokens if name not in known]
        if extra:
            tokens = {name: n for name, n in tokens.items() if name in known}
            shown = ", ".join(map(repr, extra[:5])) + (", ..." if len(extra) > 5 else "")
            print(f"fastmix optimize: --token-counts: {args.token_counts}: ignoring "
                  f"{len(extra)} domain(s) the sweep does not have ({shown})", file=sys.stderr)
    try:
        return Constraints(sweep.domains, min_weight=lo, max_weight=hi, token_counts=tokens,
                           total_tokens=args.total_tokens, max_epochs=args.max_epochs)
    except (ValueError, TypeError) as exc:
        raise _as_flags(exc) from None


def _prior(args: argparse.Namespace, sweep: Sweep, constraints: Constraints) -> np.ndarray:
    if args.prior:
        from fastmix.data import load_weights

        try:
            w = np.asarray(load_weights(args.prior, sweep.domains), dtype=np.float64)
        except (ValueError, TypeError) as exc:  # TypeError: a value that is not a number
            # load_weights speaks of the training corpus; here the names come from the sweep.
            text = str(exc).replace("the corpus has", "the sweep has")
            raise ValueError(f"--prior: {args.prior}: {text}") from None
    elif constraints.tokens is not None:
        # RegMix's prior: each domain's share of the available tokens (count / total).  Scaled
        # by a power of two below the largest count first: counts near 1e308 summed to inf and
        # the shares to 0.
        w = np.ldexp(constraints.tokens, -_exponent(constraints.tokens))
    else:
        w = sweep.mixtures.mean(0)
    if not w.sum() > 0:
        raise ValueError("--prior: weights sum to 0")
    return w / w.sum()


# ----------------------------------------------------------------------------------- outputs
def _metadata(choice: Choice, sweep: Sweep, constraints: Constraints,
              args: argparse.Namespace) -> dict[str, Any]:
    from fastmix import __version__

    return {
        "weights": choice.weights,
        "predicted": choice.predicted,
        "targets": choice.objective_weights,
        "maximize": [t for t, m in choice.maximize.items() if m],
        "predictor": {t: p.describe() for t, p in choice.predictors.items()},
        "heldout": choice.heldout,
        "constraints": constraints.describe(),
        "sweep": {"files": [str(s) for s in args.sweep], "runs": sweep.num_runs,
                  "domains": sweep.num_domains, **sweep.renormalization_report()},
        "search": {"samples": args.samples, "top_k": args.top_k,
                   "objective": choice.search.objective,
                   "averaged_objective": choice.search.averaged_objective,
                   "refined": choice.search.refined, "evaluated": choice.search.evaluated},
        "pareto_front_size": None if choice.pareto is None else len(choice.pareto.values),
        "seed": args.seed,
        "fastmix_version": __version__,
    }


def _summary(choice: Choice, sweep: Sweep, constraints: Constraints, prior: np.ndarray
             ) -> tuple[str, list[list[Any]]]:
    lines = [f"# fastmix optimize: {sweep.num_runs} runs, {sweep.num_domains} domains", ""]
    rep = sweep.renormalization_report()
    lines += [f"Rows renormalised: {rep['rows_renormalized']} (largest offset from 1: "
              f"{rep['max_row_offset']:.3g}).", ""]
    fixed = _fixed_domains(sweep)
    if fixed:
        kept = ", ".join(f"{sweep.domains[j]} ({sweep.mixtures[0, j]:.4g})" for j in fixed)
        lines += [f"Kept at the weight every run had (the sweep never varied them, so it says "
                  f"nothing about other weights): {kept}.", ""]
    rows: list[list[Any]] = [["section", "name", "value", "min", "max", "prior"]]
    if choice.heldout:
        lines += [f"## Held-out runs ({choice.info['predictor']})", "",
                  "| target | Spearman ρ | Pearson r | MAE | predicted at weights |",
                  "|---|---:|---:|---:|---:|"]
        for t, m in choice.heldout.items():
            lines.append(f"| {t} | {m['spearman']:.4f} | {m['pearson']:.4f} | {m['mae']:.4g} "
                         f"| {choice.predicted[t]:.4g} |")
            rows += [["heldout_spearman", t, m["spearman"], "", "", ""],
                     ["heldout_pearson", t, m["pearson"], "", "", ""],
                     ["heldout_mae", t, m["mae"], "", "", ""]]
        lines.append("")
    for t, v in choice.predicted.items():
        rows.append(["predicted", t, v, "", "", ""])
    lines += ["## Weights", "", "| domain | weight | min | max | prior |",
              "|---|---:|---:|---:|---:|"]
    order = np.argsort([-choice.weights[d] for d in sweep.domains], kind="stable")
    for i in order:
        d = sweep.domains[i]
        lo, hi, w = constraints.lo[i], constraints.hi[i], choice.weights[d]
        lines.append(f"| {d} | {w:.4f} | {lo:.4g} | {hi:.4g} | {prior[i]:.4f} |")
        rows.append(["weight", d, w, lo, hi, prior[i]])
    lines.append("")
    if choice.pareto is not None:
        pf = choice.pareto
        lines += [f"## Pareto front ({len(pf.values)} non-dominated sampled mixtures)", "",
                  "| best at | " + " | ".join(pf.objectives) + " | cost elsewhere |",
                  "|---|" + "---:|" * len(pf.objectives) + "---|"]
        for row in pf.trade_offs():
            vals = " | ".join(f"{row['values'][o]:.4g}" for o in pf.objectives)
            cost = ", ".join(f"{o} +{c:.3g}" for o, c in row["cost"].items())
            lines.append(f"| {row['best_at']} | {vals} | {cost} |")
            rows.append(["pareto_best_at", row["best_at"], json.dumps(row["values"]), "", "", ""])
        lines.append("")
    return "\n".join(lines), rows


def _csv(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _render_plot(choice: Choice) -> bytes:
    """``plot.png`` as bytes: drawn whole before anything is written."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    # Metric names are shown as typed: with mathtext a '$' in a name would be parsed as LaTeX
    # (and fail on names like 'acc$5').
    literal = {"parse_math": False}
    panels = list(choice.heldout_pred.items())
    n = len(panels) + (choice.pareto is not None)
    n = max(n, 1)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.0), squeeze=False)
    try:
        axes = axes[0]
        for ax, (t, (obs, pred)) in zip(axes, panels, strict=False):
            ax.scatter(obs, pred, s=12, alpha=0.7)
            lo, hi = float(min(obs.min(), pred.min())), float(max(obs.max(), pred.max()))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            m = choice.heldout[t]
            ax.set_title(f"{t[-40:]}\nheld-out ρ={m['spearman']:.3f}", fontsize=9, **literal)
            ax.set_xlabel("observed")
            ax.set_ylabel("predicted")
        if choice.pareto is not None:
            ax = axes[-1]
            pf = choice.pareto
            ax.plot(pf.values[:, 0], pf.values[:, 1], "o-", ms=3, lw=0.8, label="Pareto front")
            ax.scatter([choice.predicted[pf.objectives[0]]],
                       [choice.predicted[pf.objectives[1]]],
                       marker="*", s=150, c="C3", label="chosen weights", zorder=3)
            ax.set_xlabel(pf.objectives[0][-40:], **literal)
            ax.set_ylabel(pf.objectives[1][-40:], **literal)
            ax.set_title("predicted trade-off", fontsize=9)
            ax.legend(fontsize=8)
        if not panels and choice.pareto is None:
            axes[0].text(0.5, 0.5, "no held-out runs (--holdout 0)", ha="center", va="center")
            axes[0].set_axis_off()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    return buf.getvalue()
