"""The README's command reference is the parser's: every command and option, both ways.

`python -m tests.cli.test_readme_cli` rewrites the reference from the parser.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from station.cli import build_parser, cli_reference

README = Path(__file__).resolve().parents[2] / "README.md"
BEGIN = "<!-- station CLI reference: generated from station/cli.py's parser; do not edit by hand -->\n"
END = "<!-- end of the station CLI reference -->\n"


def readme_reference(text: str) -> str:
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def parser_options() -> dict[str, set[str]]:
    """Each command's prog and its option strings and positionals, walked from the parser itself."""
    found: dict[str, set[str]] = {}

    def walk(p: argparse.ArgumentParser, top: bool) -> None:
        names = set()
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    walk(sub, False)
            elif not isinstance(a, argparse._HelpAction) and (top or a.dest != "verbosity"):
                names |= set(a.option_strings) or {a.metavar or a.dest}
        found[p.prog] = names

    walk(build_parser(), True)
    return found


def documented_options(reference: str) -> dict[str, set[str]]:
    """Each command's options and positionals as the README's tables name them."""
    found: dict[str, set[str]] = {}
    command = None
    for line in reference.splitlines():
        if m := re.match(r"\*\*`(station[^`]*)`\*\*", line):
            command = m.group(1)
            found[command] = set()
        elif line.startswith("| `") and command:
            first_cell = line.split(" | ")[0]
            found[command] |= {name.split(" ")[0] for name in re.findall(r"`([^`]+)`", first_cell)}
    return found


def test_every_option_of_the_parser_is_in_the_readme_and_back():
    assert documented_options(readme_reference(README.read_text())) == parser_options()


def test_the_readme_reference_is_the_generated_one():
    assert readme_reference(README.read_text()) == cli_reference(), \
        "the parser changed: run `python -m tests.cli.test_readme_cli` and commit README.md"


def test_the_documented_shell_habits_are_options():
    section = README.read_text().split("### Shell habits", 1)[1].split("### Command reference", 1)[0]
    options = set().union(*parser_options().values())
    said = set(re.findall(r"`(-{1,2}[a-z][-a-z]*)`", section))
    assert said and said <= options, said - options


if __name__ == "__main__":
    text = README.read_text()
    head, rest = text.split(BEGIN, 1)
    README.write_text(head + BEGIN + "\n" + cli_reference() + "\n" + END + rest.split(END, 1)[1])
    print(f"wrote the command reference into {README}")
