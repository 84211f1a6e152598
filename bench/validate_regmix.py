"""Validate fastmix.optimize's predictors on real sweeps (RegMix, olmix); write a Markdown report.

RegMix (Liu et al. 2024), their Table 2 protocol: fit on the 512 1M-parameter runs with the
Pile-CC validation loss as target; Spearman ρ / Pearson r on the 256 held-out 1M runs, the same
256 mixtures trained at 60M, and the 64 held-out 1B runs.  Nothing is tuned on held-out rows:
``trees`` uses RegMix's published LightGBM settings (1000 rounds, learning rate 0.01, seed 42)
without their early stopping on the evaluation rows; ``law+trees (CV)`` chooses its tree size
by 5-fold CV on the 512 training runs only.

olmix (allenai): one model per metric (110 bits-per-byte metrics) on each swarm, 20% of runs
held out by a fixed seed; reports the median held-out ρ over metrics.

Usage: ``python bench/validate_regmix.py [--data ../shared/data] [--out
bench/results/optimize-validation.md] [--skip-olmix]``.  The data folder is reference data next
to the project and is never copied in; the script exits 0 with a note when it is absent.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# run as a script: import the checkout this file lives in, not an installed fastmix
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import cpu_model  # noqa: E402  (bench/_machine.py)

from fastmix._io import atomic_write_text  # noqa: E402
from fastmix.optimize import evaluate, load_sweep, make_predictor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET = "metric/the_pile_pile_cc_val_loss"
PAPER = {  # Table 2 of the RegMix paper, Spearman ρ / Pearson r in %
    "linear": {"1M": (90.08, 87.78), "60M": (89.26, 86.79), "1B": (88.01, 72.57)},
    "trees": {"1M": (98.45, 98.57), "60M": (98.64, 98.28), "1B": (97.12, 94.36)},
}
PREDICTORS = [("linear", {}), ("law", {}), ("trees", {}), ("trees", {"backend": "sklearn"}),
              ("law+trees", {}), ("law+trees", {"tune": True})]


def label(name: str, kw: dict) -> str:
    if kw.get("backend") == "sklearn":
        return name + " (scikit-learn HistGradientBoosting, no LightGBM)"
    return name + (" (CV)" if kw.get("tune") else "")


def regmix(data: Path, repeats: int) -> list[str]:
    d = data / "regmix"
    train = load_sweep(d / "train_mixture_1m.csv", d / "train_pile_loss_1m.csv")
    tests = {
        "1M": load_sweep(d / "test_mixture_1m.csv", d / "test_pile_loss_1m.csv"),
        "60M": load_sweep(d / "test_mixture_1m.csv", d / "test_pile_loss_60m.csv"),
        "1B": load_sweep(d / "test_mixture_1B.csv", d / "test_pile_loss_1B.csv"),
    }
    for s in tests.values():
        assert s.domains == train.domains
    X, y = train.mixtures, train.target(TARGET)
    rep = train.renormalization_report()
    lines = [
        "## RegMix: target Pile-CC validation loss, fit on the 512 1M runs",
        "",
        f"Training mixtures renormalised: {rep['rows_renormalized']} of {train.num_runs} rows "
        f"(largest offset from 1: {rep['max_row_offset']:.3g}).  Held out: "
        + ", ".join(f"{k} {v.num_runs} runs" for k, v in tests.items()) + ".",
        "",
        "Spearman ρ / Pearson r in %, fastmix next to the paper's Table 2.",
        "",
        "| predictor | 1M ρ / r | 60M ρ / r | 1B ρ / r | paper 1M | paper 60M | paper 1B "
        "| fit s (median) |",
        "|---|---|---|---|---|---|---|---:|",
    ]
    per_target: dict[str, list[float]] = {}
    for name, kw in PREDICTORS:
        times = []
        model = None
        n_rep = 1 if kw.get("tune") else repeats
        for _ in range(n_rep):
            t0 = time.perf_counter()
            model = make_predictor(name, **kw).fit(X, y)
            times.append(time.perf_counter() - t0)
        cells = []
        for s in tests.values():
            m = evaluate(s.target(TARGET), model.predict(s.mixtures))
            cells.append(f"{100 * m['spearman']:.2f} / {100 * m['pearson']:.2f}")
        paper = PAPER.get(name if not kw else "", {})
        pcells = [f"{paper[k][0]:.2f} / {paper[k][1]:.2f}" if k in paper else "–"
                  for k in tests]
        extra = ""
        if kw.get("tune"):
            chosen = model.params_
            extra = (f" (chose {chosen['n_estimators']} rounds, {chosen['num_leaves']} leaves, "
                     f"min {chosen['min_child_samples']} per leaf; CV ρ "
                     f"{100 * max(model.cv_scores_.values()):.2f})")
        lines.append(f"| {label(name, kw)}{extra} | " + " | ".join(cells) + " | "
                     + " | ".join(pcells) + f" | {statistics.median(times):.2f} (n={n_rep}) |")
        print(lines[-1], flush=True)
        if not kw:
            rhos = []
            for t in train.targets:
                p = make_predictor(name).fit(X, train.target(t))
                rhos.append(evaluate(tests["1M"].target(t), p.predict(tests["1M"].mixtures))
                            ["spearman"])
            per_target[name] = rhos
    lines += ["", f"Every one of the {len(train.targets)} validation losses as target, 1M held-out "
              "runs: median (min) Spearman ρ in %.", "",
              "| predictor | median ρ | min ρ |", "|---|---:|---:|"]
    for name, rhos in per_target.items():
        lines.append(f"| {name} | {100 * statistics.median(rhos):.2f} | {100 * min(rhos):.2f} |")
    return lines


def olmix(data: Path, seed: int) -> list[str]:
    d = data / "olmix"
    lines = ["", "## olmix swarms: one model per metric, 20% of runs held out (seed "
             f"{seed})", "",
             "Median (10th percentile) held-out Spearman ρ over the 110 metrics, in %; "
             "fit s is the total for all metrics.", "",
             "| swarm | runs × domains | held out | predictor | median ρ | p10 ρ | fit s |",
             "|---|---|---:|---|---:|---:|---:|"]
    for swarm in ("dclm", "full_recomputation", "full_reuse_update_5_seed_0"):
        s = load_sweep(d / f"{swarm}_ratios.csv", d / f"{swarm}_metrics.csv")
        train, test = s.split(0.2, seed)
        for name in ("linear", "trees", "law", "law+trees"):
            need = make_predictor(name).min_runs(s.num_domains)
            if train.num_runs < need:
                lines.append(f"| {swarm} | {s.num_runs} × {s.num_domains} | {test.num_runs} | "
                             f"{name} | – | – | needs {need} runs |")
                continue
            t0 = time.perf_counter()
            rhos = []
            for t in s.targets:
                p = make_predictor(name, seed=seed).fit(train.mixtures, train.target(t))
                rhos.append(evaluate(test.target(t), p.predict(test.mixtures))["spearman"])
            dt = time.perf_counter() - t0
            lines.append(f"| {swarm} | {s.num_runs} × {s.num_domains} | {test.num_runs} | "
                         f"{name} | {100 * np.median(rhos):.2f} | "
                         f"{100 * np.percentile(rhos, 10):.2f} | {dt:.1f} |")
            print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                    help="the public sweeps (regmix/, olmix/); default ../shared/data beside the "
                         "checkout; without them the script says so and exits")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" /
                    "optimize-validation.md",
                    help="Markdown report (default: the committed "
                         "bench/results/optimize-validation.md)")
    ap.add_argument("--repeats", type=int, default=3, help="fits timed per predictor")
    ap.add_argument("--skip-olmix", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not (args.data / "regmix").is_dir():
        print(f"no sweep data at {args.data}; nothing to validate")
        return 0
    import lightgbm

    head = ["# fastmix.optimize on real sweeps", "",
            f"Machine: {cpu_model()}, {os.cpu_count()} CPUs (shared); Python "
            f"{platform.python_version()}, numpy {np.__version__}, LightGBM "
            f"{lightgbm.__version__}.  Command: `python bench/validate_regmix.py`.", ""]
    lines = head + regmix(args.data, args.repeats)
    if not args.skip_olmix and (args.data / "olmix").is_dir():
        lines += olmix(args.data, args.seed)
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
