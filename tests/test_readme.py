"""The README's commands and imports against the code: a renamed flag or name fails here."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from fastmix.cli import SUBCOMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

pytestmark = pytest.mark.skipif(not README.is_file(), reason="needs the source tree")


def _blocks(language: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def _fastmix_commands() -> list[list[str]]:
    """Each ``fastmix ...`` / ``python -m fastmix ...`` command of the bash blocks, as argv."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                argv = shlex.split(part, comments=True)
                if argv[:3] == ["python", "-m", "fastmix"]:
                    argv = argv[2:]
                if argv[:1] == ["fastmix"]:
                    commands.append(argv[1:])
    return commands


def _options(command: str) -> set[str]:
    parser = build_parser(command)
    (sub,) = (a for a in parser._actions if a.dest == "command")
    return {o for a in sub.choices[command]._actions for o in a.option_strings}


def test_readme_shows_every_subcommand() -> None:
    shown = {argv[0] for argv in _fastmix_commands()}
    assert shown == set(SUBCOMMANDS), shown


@pytest.mark.parametrize("argv", _fastmix_commands(), ids=" ".join)
def test_readme_fastmix_command_parses(argv: list[str]) -> None:
    if "--help" in argv:  # (parsing it prints the help and exits 0)
        assert set(argv) - {"--help"} <= set(SUBCOMMANDS)
        return
    build_parser(argv[0]).parse_args(argv)  # a flag the command lacks: SystemExit(2)
    flags = {a.split("=", 1)[0] for a in argv[1:] if a.startswith("-")}
    assert flags <= _options(argv[0]), flags - _options(argv[0])  # (argparse takes prefixes)


def test_readme_lists_every_demo_flag() -> None:
    text = README.read_text(encoding="utf-8")
    listed = text.split("Flags: ", 1)[1].split("\n\n", 1)[0]
    assert set(re.findall(r"--[a-z][a-z0-9-]*", listed)) == _options("demo") - {"-h", "--help"}


def test_readme_python_imports_resolve() -> None:
    imports = [
        line.strip()
        for block in _blocks("python")
        for line in block.splitlines()
        if re.match(r"\s*(from fastmix[\w.]* import |import fastmix)", line)
    ]
    assert imports
    for statement in imports:
        exec(statement, {})  # noqa: S102 - the README's own import lines
