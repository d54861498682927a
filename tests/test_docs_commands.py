"""Every `edgellm ...` command the README and docs/ show parses with the CLI as it is: a renamed flag or
subcommand fails here, not in a reader's terminal."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from edgellm.daemon.cli import build_parser, parse_args

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`(edgellm [a-z][^`]*)`")
ENV = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+")  # VAR=value prefixes


def commands(page: Path) -> list[tuple[int, str, bool]]:
    """(line, command, whole) for each edgellm command of a page: whole lines of fenced blocks, and the
    inline code of prose (`edgellm request --timeout`), which names a subcommand and flags but no values."""
    text = page.read_text()
    found = []
    for block in FENCE.finditer(text):
        first_line = text[: block.start(1)].count("\n") + 1
        lines = block.group(1).replace("\\\n", " ").split("\n")
        for offset, line in enumerate(lines):
            line = ENV.sub("", line.strip().removeprefix("$ "))
            if line.startswith("edgellm "):
                found.append((first_line + offset, line, True))
    for span in INLINE.finditer(text):
        found.append((text[: span.start()].count("\n") + 1, span.group(1), False))
    return found


def argv_of(command: str) -> list[str]:
    """The words edgellm gets: up to a pipe, a redirection, `&&`, `;` or a comment; the `...` of prose dropped."""
    words = []
    for word in shlex.split(command, comments=True):
        if word in ("|", "||", "&&", ";", "&") or word.startswith((">", "2>", "<")):
            break
        words.append(word)
    return [w for w in words[1:] if w not in ("...", "…")]


def subcommand(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The (sub)parser the leading words of argv name, and those words."""
    path = []
    for word in argv:
        choices = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if not choices or word not in choices:
            break
        parser, path = choices[word], [*path, word]
    return parser, path


CASES = [(page, line, command, whole) for page in PAGES for line, command, whole in commands(page)]


def test_the_docs_show_commands():
    assert sum(whole for *_, whole in CASES) > 40, CASES


@pytest.mark.parametrize(("page", "line", "command", "whole"), CASES,
                         ids=[f"{p.name}:{line}" for p, line, *_ in CASES])
def test_each_command_parses(page, line, command, whole):
    parser = build_parser()
    argv = argv_of(command)
    sub, path = subcommand(parser, argv)
    where = f"{page.name}:{line}: `{command}`"
    assert path, f"{where}: names no subcommand of edgellm"
    options = {o for action in sub._actions for o in action.option_strings}
    for word in argv[len(path):]:
        if word.startswith("--"):
            assert word.split("=")[0] in options, f"{where}: `edgellm {' '.join(path)}` has no option {word}"
    if not whole:
        return
    try:
        parse_args(parser, argv)  # as `edgellm` itself parses: unknown words are an error (exit 2)
    except SystemExit as e:
        pytest.fail(f"{where}: does not parse (exit {e.code})")
