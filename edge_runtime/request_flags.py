"""The prompt and sampling flags shared by `edge-runtime generate` (local) and
`edge-runtime ask` (over MQTT): one definition, so the two commands never drift."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_request_arguments(p: argparse.ArgumentParser) -> None:
    """Prompt and sampling flags shared by `generate` and `ask`."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="completion prompt")
    src.add_argument("--prefix", help="infill: the code before the hole (with --suffix)")
    src.add_argument("--messages", help="chat: a JSON file with [{\"role\": ..., \"content\": ...}, ...], - for stdin")
    p.add_argument("--suffix", help="infill: the code after the hole")
    p.add_argument("--suffix-first", action="store_true", help="infill in suffix-prefix-middle order")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="most tokens to generate (default: 256 here; over MQTT the device's default, at most 256 "
                        "and within its limits)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 0.6)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default 0.9)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default off)")
    p.add_argument("--seed", type=int, default=None, help="makes a sampled answer reproducible")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def request_source(args: argparse.Namespace) -> dict[str, Any]:
    """The request's mode and text from the flags: ``{"mode": "complete", "prompt"}``,
    ``{"mode": "infill", "prefix", "suffix", "suffix_first"}`` or ``{"mode": "chat",
    "messages"}``. ValueError, naming the flags, for a combination that is none of them."""
    if args.prompt is not None:
        if args.suffix is not None or args.suffix_first:
            raise ValueError("--suffix and --suffix-first go with --prefix, not --prompt")
        return {"mode": "complete", "prompt": args.prompt}
    if args.prefix is not None:
        if args.suffix is None:
            raise ValueError("--prefix needs --suffix (an empty one is --suffix '')")
        return {"mode": "infill", "prefix": args.prefix, "suffix": args.suffix, "suffix_first": args.suffix_first}
    if args.suffix is not None or args.suffix_first:
        raise ValueError("--suffix and --suffix-first go with --prefix")
    return {"mode": "chat", "messages": read_messages(args.messages)}


def read_messages(source: str) -> list[dict[str, str]]:
    """``--messages``: a JSON file, or ``-`` for standard input, holding
    ``[{"role": ..., "content": ...}, ...]``."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
        messages = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--messages {source}: {exc}") from None
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in messages):
        raise ValueError(f"--messages {source}: expected a list of {{\"role\", \"content\"}} objects")
    return messages
