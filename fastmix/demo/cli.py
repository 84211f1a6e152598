"""``fastmix demo`` command line: flags, checks of the output folder, the run, a summary."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from fastmix._checks import float_flag, int_flag
from fastmix._io import path_arg, writable_dir

# Flag destination -> DemoOptions field, for the flags that override a preset.
_OVERRIDES = (
    "seed", "steps", "main_steps", "d_model", "n_layers", "n_heads", "main_d_model",
    "main_layers", "main_heads", "seq_len", "batch_size", "lr", "step_size", "smoothing",
    "proxy_loss", "sampler", "train_bytes", "heldout_bytes", "eval_windows", "device", "threads",
)


def _default(name: str, unit: str = "") -> str:
    """``(default X; --quick Y)`` from the option defaults and the --quick preset."""
    from fastmix.demo.options import QUICK, DemoOptions

    text = f"default {getattr(DemoOptions, name)}{unit}"
    if name in QUICK:
        text += f"; --quick {QUICK[name]}{unit}"
    return f"({text})"


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the demo's flags to ``parser``."""
    parser.description = (
        "Build a five-domain byte-level corpus (stdlib code, Python docs prose, generated math, "
        "generated JSON/CSV records, random noise), train a tiny reference GPT on uniform "
        "weights, a DoReMi proxy, then two main models (uniform vs DoReMi weights), and report "
        "their held-out loss per domain: a table, weights.json, a PNG figure and report.md "
        "under --out.  Under 10 minutes on two CPU cores (9 on a Zen 3 EPYC); --quick under 2."
    )
    g = parser.add_argument_group("run")
    # str, not Path: Path("") is ".", so `--out "$OUT"` with OUT unset wrote into the cwd.
    g.add_argument("--out", default="fastmix-demo",
                   help="output folder; the corpus is cached there between runs "
                   "(default ./fastmix-demo)")
    g.add_argument("--quick", action="store_true",
                   help="a smaller, shorter run (under 2 minutes on two CPU cores)")
    g.add_argument("--seed", type=int_flag, default=None,
                   help=f"seed of everything {_default('seed')}")
    g.add_argument("--device", default=None,
                   help="torch device, e.g. cpu or cuda:0 (default: cuda when available)")
    g.add_argument("--threads", type=int_flag, default=None,
                   help="CPU threads for torch, at most the cores this process may use "
                   "(default: all of them)")
    g.add_argument("--weights", type=Path, default=None,
                   help="read the main models' weights from this JSON file (e.g. a previous "
                   "weights.json) and skip the reference and proxy runs")
    g.add_argument("--rebuild", action="store_true", help="rebuild the corpus even if cached")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars")
    m = parser.add_argument_group("model and training")
    m.add_argument("--steps", type=int_flag, default=None,
                   help=f"steps of the reference and proxy runs {_default('steps')}")
    m.add_argument("--main-steps", type=int_flag, default=None,
                   help="steps of each main model (default: --steps)")
    m.add_argument("--d-model", dest="d_model", type=int_flag, default=None,
                   help=f"model width {_default('d_model')}")
    m.add_argument("--layers", dest="n_layers", type=int_flag, default=None,
                   help=f"transformer layers {_default('n_layers')}")
    m.add_argument("--heads", dest="n_heads", type=int_flag, default=None,
                   help=f"attention heads {_default('n_heads')}")
    m.add_argument("--main-d-model", type=int_flag, default=None,
                   help="main models' width (default: --d-model)")
    m.add_argument("--main-layers", type=int_flag, default=None,
                   help="main models' layers (default: --layers)")
    m.add_argument("--main-heads", type=int_flag, default=None,
                   help="main models' heads (default: --heads)")
    m.add_argument("--seq-len", type=int_flag, default=None,
                   help=f"bytes per training window {_default('seq_len')}")
    m.add_argument("--batch-size", type=int_flag, default=None,
                   help=f"windows per step {_default('batch_size')}")
    m.add_argument("--lr", type=float_flag, default=None,
                   help=f"peak AdamW learning rate {_default('lr')}")
    d = parser.add_argument_group("DoReMi and data")
    d.add_argument("--step-size", type=float_flag, default=None,
                   help=f"DoReMi step size η {_default('step_size')}")
    d.add_argument("--smoothing", type=float_flag, default=None,
                   help=f"DoReMi smoothing c {_default('smoothing')}")
    d.add_argument("--proxy-loss", choices=("dro", "reweighted"), default=None,
                   help="proxy objective: the paper's (dro) or the released code's (reweighted) "
                   f"{_default('proxy_loss')}")
    d.add_argument("--resample", action="store_true",
                   help="feed α to the sampler as it changes instead of reweighting the loss")
    d.add_argument("--sampler", choices=("alias", "stratified", "greedy"), default=None,
                   help=f"how MixtureDataset draws domains {_default('sampler')}")
    d.add_argument("--train-bytes", type=int_flag, default=None,
                   help=f"cap on each domain's train part {_default('train_bytes', ' bytes')}")
    d.add_argument("--heldout-bytes", type=int_flag, default=None,
                   help=f"each domain's held-out part {_default('heldout_bytes', ' bytes')}")
    d.add_argument("--eval-windows", type=int_flag, default=None,
                   help=f"held-out windows evaluated per domain {_default('eval_windows')}")


def options_from_args(args: argparse.Namespace) -> Any:
    """The :class:`DemoOptions` the flags ask for: defaults, then --quick, then explicit flags."""
    from dataclasses import fields

    from fastmix.demo.options import QUICK, DemoOptions

    values: dict[str, Any] = {}
    if getattr(args, "quick", False):
        values.update(QUICK)
    for name in _OVERRIDES:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    out = path_arg(args.out, "--out")  # before anything is built
    known = {f.name for f in fields(DemoOptions)}
    assert set(values) <= known, set(values) - known
    return DemoOptions(
        out=out,
        weights=args.weights,
        resample=bool(args.resample),
        progress=bool(args.progress),
        rebuild=bool(args.rebuild),
        quick=bool(args.quick),
        **values,
    )


def _check_output_names(out: Path) -> None:
    """No name the demo writes into ``out`` is taken by a folder (os.replace cannot)."""
    from fastmix.demo.report import OUTPUT_FILES

    for name in OUTPUT_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            raise ValueError(f"--out: {path} is a directory; {name} cannot be written there")


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 on success, 2 on bad arguments or output folder, 1 on other I/O errors."""
    try:
        opts = options_from_args(args)
        if opts.weights is not None and not Path(opts.weights).is_file():
            raise ValueError(f"--weights: {opts.weights} is not a file")
        writable_dir(opts.out, "--out")
        _check_output_names(Path(opts.out))  # before minutes of training, not after
    except ValueError as exc:
        print(f"fastmix demo: error: {exc}", file=sys.stderr)
        return 2
    if "torch" not in sys.modules:
        # OpenMP threads that spin while waiting make a busy machine crawl.  A training step of
        # the default model on 2 cores (AMD EPYC): idle 45 ms spinning vs 55 ms passive; beside
        # two busy loops 158 vs 82 ms; beside other users' jobs 2-5 s vs 0.2 s.  Only read
        # before torch loads, and a user's own setting wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from fastmix.demo.pipeline import run_demo

    try:
        result = run_demo(opts)
    except ValueError as exc:
        print(f"fastmix demo: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fastmix demo: error: {exc}", file=sys.stderr)
        return 1
    print()
    print(result.files["table"].read_text(), end="")
    print("(held-out loss in bits per byte; lower is better)")
    print()
    for label, path in result.files.items():
        print(f"{label:>8}: {path}")
    print(f"   total: {result.timings['total']:.0f} s")
    return 0
