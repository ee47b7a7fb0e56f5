"""The prompt and sampling flags shared by `edge-runtime generate` (local) and
`edge-runtime ask` (over MQTT): one definition, so the two commands never drift."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .protocol import MAX_STOP_CHARS, MAX_STOP_SEQUENCES, MORE_SAMPLING_DEFAULTS
from .types import DEFAULT_REPEAT_LAST_N, MAX_PENALTY, MAX_SEED


# argparse types: a value out of range stops at the command line (exit 2, the flag named),
# before a bundle is loaded or a broker is called
def integer_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            wanted = f">= {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"expected an integer {wanted}, got {text}")
        return value
    parse.__name__ = "integer"
    return parse


def number_in(low: float, high: float = math.inf, *, low_open: bool = False) -> Callable[[str], float]:
    """A finite number in [low, high] (or (low, high] with `low_open`)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            if math.isfinite(high):
                wanted = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
            else:
                wanted = f"{'>' if low_open else '>='} {low:g}"
            raise argparse.ArgumentTypeError(f"expected a finite number {wanted}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


def empty_flag(args: argparse.Namespace, what_by_flag: dict[str, str]) -> str | None:
    """The error for the first of `what_by_flag`'s flags given as an empty (or blank) value,
    ``"--output is empty: give the bundle folder"``, or None: Path("") is the current folder,
    never what an empty argument meant. Flags left out (None) are fine."""
    for flag, what in what_by_flag.items():
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None and not str(value).strip():
            return f"{flag} is empty: give the {what}"
    return None


# Python hands command-line bytes that are not UTF-8 over as lone surrogates U+DC80-U+DCFF
# (PEP 383); JSON can spell any lone surrogate ("\\ud800"). Neither is text a model can take.
_UNDECODED_BYTE = re.compile("[\udc80-\udcff]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def utf8_text(text: str) -> str:
    """A --prompt/--prefix/--suffix value: the text as given, refused when its bytes are not UTF-8.

    Under an ASCII locale with Python's UTF-8 mode off (``LC_ALL=C PYTHONUTF8=0``, ``python -X
    utf8=0``) every byte above 0x7f, valid UTF-8 or not, reaches Python as a surrogate escape: the
    bytes are recovered (``os.fsencode``, the same codec Python decoded them with) and taken when
    they are UTF-8, so ``--prompt 'def grüße():'`` is the same text in any locale."""
    bad = _UNDECODED_BYTE.search(text)
    if bad:
        try:
            return os.fsencode(text).decode("utf-8")
        except UnicodeError:  # not UTF-8 (or not bytes the locale's codec gave): refused below
            pass
        raise argparse.ArgumentTypeError(f"not valid UTF-8: byte 0x{ord(bad.group()) - 0xDC00:02x} at character "
                                         f"{bad.start()} (convert the text to UTF-8, e.g. with iconv)")
    return text


def stop_string(text: str) -> str:
    """A --stop value: 1 to MAX_STOP_CHARS characters (the protocol's rule)."""
    text = utf8_text(text)
    if not text or len(text) > MAX_STOP_CHARS:
        raise argparse.ArgumentTypeError(f"expected 1-{MAX_STOP_CHARS} characters, got {len(text)}")
    return text


def add_request_arguments(p: argparse.ArgumentParser) -> None:
    """Prompt and sampling flags shared by `generate` and `ask`."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", type=utf8_text, help="completion prompt")
    src.add_argument("--prefix", type=utf8_text, help="infill: the code before the hole (with --suffix)")
    src.add_argument("--messages", help="chat: a JSON file with [{\"role\": ..., \"content\": ...}, ...], - for stdin")
    p.add_argument("--suffix", type=utf8_text, help="infill: the code after the hole")
    p.add_argument("--suffix-first", action="store_true", help="infill in suffix-prefix-middle order")
    p.add_argument("--max-tokens", type=integer_at_least(1), default=None,
                   help="most tokens to generate (default: 256 here; over MQTT the device's default, at most 256 "
                        "and within its limits; a default is lowered to what the context leaves after the prompt)")
    p.add_argument("--temperature", type=number_in(0.0), default=None, help="0 = greedy (default 0.6)")
    p.add_argument("--top-p", type=number_in(0.0, 1.0, low_open=True), default=None,
                   help="nucleus sampling mass, in (0, 1] (default 0.9)")
    p.add_argument("--top-k", type=integer_at_least(0), default=None,
                   help="keep the k most likely tokens (default 0: off)")
    p.add_argument("--min-p", type=number_in(0.0, 1.0), default=None,
                   help="drop tokens less likely than this times the most likely one, in [0, 1] (default 0: off; "
                        "llama.cpp's and Ollama's min_p, after temperature, top-k and top-p)")
    p.add_argument("--seed", type=integer_at_least(0, MAX_SEED), default=None,
                   help="makes a sampled answer reproducible")
    p.add_argument("--repeat-penalty", type=number_in(0.0, low_open=True), default=None,
                   help="divide a repeated token's logit by this (multiply a negative one), as llama.cpp and "
                        "Ollama do; over the last --repeat-last-n tokens (default 1: off; 1.1 is Ollama's)")
    p.add_argument("--presence-penalty", type=number_in(-MAX_PENALTY, MAX_PENALTY), default=None,
                   help=f"subtract this from the logit of a token in the window, in [-{MAX_PENALTY:g}, "
                        f"{MAX_PENALTY:g}] (default 0: off)")
    p.add_argument("--frequency-penalty", type=number_in(-MAX_PENALTY, MAX_PENALTY), default=None,
                   help=f"subtract this times its count in the window from a token's logit, in "
                        f"[-{MAX_PENALTY:g}, {MAX_PENALTY:g}] (default 0: off)")
    p.add_argument("--repeat-last-n", type=integer_at_least(-1), default=None,
                   help=f"the penalties' window: the last N tokens of prompt and output (default "
                        f"{DEFAULT_REPEAT_LAST_N}; 0: no penalty; -1: the whole context)")
    p.add_argument("--stop", action="append", default=[], type=stop_string,
                   help=f"stop string (repeatable, at most {MAX_STOP_SEQUENCES})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


MORE_SAMPLING_FLAGS = tuple(MORE_SAMPLING_DEFAULTS)  # the request fields, named as the flags' dests


def more_sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The --min-p and penalty flags given (the request's fields of the same names); the rest take
    the defaults."""
    return {name: getattr(args, name) for name in MORE_SAMPLING_FLAGS if getattr(args, name, None) is not None}


def request_source(args: argparse.Namespace) -> dict[str, Any]:
    """The request's mode and text from the flags: ``{"mode": "complete", "prompt"}``,
    ``{"mode": "infill", "prefix", "suffix", "suffix_first"}`` or ``{"mode": "chat",
    "messages"}``. ValueError, naming the flags, for a combination that is none of them (or more
    --stop strings than the protocol takes)."""
    stops = getattr(args, "stop", None) or ()
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValueError(f"--stop may be given at most {MAX_STOP_SEQUENCES} times, got {len(stops)}")
    if args.prompt is not None:
        if args.suffix is not None or args.suffix_first:
            raise ValueError("--suffix and --suffix-first go with --prefix, not --prompt")
        if not args.prompt:  # the protocol refuses it too ("prompt must not be empty")
            raise ValueError("--prompt is empty: give the text to complete")
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
    if source == "-" and sys.stdin is None:  # started with `<&-`
        raise ValueError("--messages -: standard input is closed: give the messages on it, or a file")
    try:
        # bytes, decoded here: stdin's own decoding depends on the locale (strict, or surrogates for
        # bytes that are not UTF-8 under the C locale)
        stdin = getattr(sys.stdin, "buffer", None)
        data = (stdin.read() if stdin is not None else sys.stdin.read().encode("utf-8", "surrogateescape")) \
            if source == "-" else Path(source).read_bytes()
        text = data.decode("utf-8-sig")  # a BOM (Windows editors write one) is not JSON
    except UnicodeDecodeError as exc:  # (its offsets count from after a BOM)
        raise ValueError(f"--messages {source}: not valid UTF-8: byte 0x{exc.object[exc.start]:02x} at offset "
                         f"{exc.start + len(data) - len(exc.object)}") from None
    except OSError as exc:
        raise ValueError(f"--messages {source}: {exc}") from None
    if not text.strip():  # `</dev/null` in CI, an empty file
        raise ValueError(f"--messages {source}: empty: expected a JSON list of {{\"role\", \"content\"}} objects")
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--messages {source}: {exc}") from None
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in messages):
        raise ValueError(f"--messages {source}: expected a list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(messages):
        for key in ("role", "content"):
            bad = _LONE_SURROGATE.search(m[key])
            if bad:
                raise ValueError(f"--messages {source}: messages[{i}].{key} holds a lone surrogate "
                                 f"(U+{ord(bad.group()):04X}) at character {bad.start()}: not valid Unicode")
    return messages
