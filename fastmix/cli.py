"""The ``fastmix`` command: one subcommand per job.

Each subcommand lives beside the code it drives and exposes ``configure(parser)`` (add its
arguments) and ``run(args) -> int`` (do the work, return the exit status).  Modules are imported
only when their subcommand is chosen, so ``fastmix --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Sequence
from typing import Any

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "demo": (
        "fastmix.demo.cli",
        "train tiny models on a multi-domain corpus and show what DoReMi does",
    ),
    "prepare": ("fastmix.prepare", "tokenise text or JSONL files into one token file per domain"),
    "optimize": ("fastmix.optimize.cli", "choose mixture weights from a sweep of small runs"),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastmix", description="fastmix: fast, exact and reproducible data-mixture weights"
    )
    from fastmix import __version__

    parser.add_argument("--version", action="version", version=f"fastmix {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # only the chosen one pays for its imports
            importlib.import_module(module).configure(p)
    return parser


class _Terminated(BaseException):
    """SIGTERM (timeout, Slurm, docker stop): unwinds like Ctrl-C, so temporary files go."""


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        # Parsing imports the subcommand's module (torch for the demo): Ctrl-C there too.
        command = next((a for a in argv if not a.startswith("-")), None)
        args = build_parser(command if command in SUBCOMMANDS else None).parse_args(argv)
        module = importlib.import_module(SUBCOMMANDS[args.command][0])
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("fastmix: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("fastmix: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
