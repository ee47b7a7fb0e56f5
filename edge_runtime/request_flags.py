"""The prompt and sampling flags shared by `edge-runtime generate` (local) and
`edge-runtime ask` (over MQTT): one definition, so the two commands never drift."""

from __future__ import annotations

import argparse


def add_request_arguments(p: argparse.ArgumentParser) -> None:
    """Prompt and sampling flags shared by `generate` and `ask`."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="completion prompt")
    src.add_argument("--prefix", help="infill: the code before the hole (with --suffix)")
    src.add_argument("--messages", help="chat: a JSON file with [{\"role\": ..., \"content\": ...}, ...] (ask: - for stdin)")
    p.add_argument("--suffix", help="infill: the code after the hole")
    p.add_argument("--suffix-first", action="store_true", help="infill in suffix-prefix-middle order")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 0.6)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default 0.9)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default off)")
    p.add_argument("--seed", type=int, default=None, help="makes a sampled answer reproducible")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
