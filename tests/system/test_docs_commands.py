"""Every flag of an `edge-runtime SUBCOMMAND ...` command the docs show (fenced blocks, their
`#  [--flag ...]` continuation lines, and inline code) is a flag of that subcommand's parser,
so a renamed or dropped flag fails here before a user copies the command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edge_runtime.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")), "systemd/README.md",
        "docs/config.example.toml"]
COMMAND = re.compile(r"edge-runtime (?:--log-level \w+ )?([a-z][a-z-]+)((?:[^`\n]|\\\n)*)")


def subcommand_flags() -> dict[str, set[str]]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    return {name: {s for a in p._actions for s in a.option_strings} | {s for a in parser._actions
                                                                          for s in a.option_strings}
            for name, p in subparsers.choices.items()}


def doc_commands(text: str) -> list[tuple[str, str]]:
    """(subcommand, the rest of its command) for each command the text shows; a fenced block's
    comment lines that start with `#  [` continue the command before them."""
    text = re.sub(r"\n#  (\[)", r" \1", text)
    return [(m.group(1), m.group(2)) for m in COMMAND.finditer(text)]


@pytest.mark.parametrize("doc", DOCS)
def test_doc_commands_use_existing_flags(doc):
    flags = subcommand_flags()
    problems = []
    for sub, rest in doc_commands((ROOT / doc).read_text(encoding="utf-8")):
        if sub not in flags:
            continue  # prose ("edge-runtime serves ..."), not a command
        rest = rest.split(" --peers")[0].split("  #")[0]  # bench --peers passes the rest to benchmarks/peers.py
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
            if flag not in flags[sub]:
                problems.append(f"edge-runtime {sub} ... {flag}")
    assert not problems, f"{doc}: flags these subcommands do not have: {problems}"
