"""The ``fastmix`` command: one subcommand per job.

Each subcommand lives beside the code it drives and exposes ``configure(parser)`` (add its
arguments) and ``run(args) -> int`` (do the work, return the exit status).  Modules are imported
only when their subcommand is chosen, so ``fastmix --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in SUBCOMMANDS else None).parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("fastmix: interrupted", file=sys.stderr)
        return 130
