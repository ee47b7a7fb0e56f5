"""The operator's safety policy: rules over request text and generated text,
per-client limits, an optional external classifier and audit settings, read
from one TOML file and compiled once at start-up.

    [audit]
    record_text = false            # true: the audit log keeps the matched text too
    [limits]                       # every client (0: no limit of the policy's own)
    requests_per_minute = 30
    max_tokens = 512
    [limits.per_client."line-3-hmi"]
    requests_per_minute = 120
    [[rules]]
    name = "mass-file-encryption"
    action = "refuse"              # refuse | stop | flag
    on = ["input"]                 # input: prompt, prefix, suffix, messages; output: generated text
    modes = ["complete", "infill", "chat"]
    clients = []                   # client id globs; empty: every client
    phrases = ["encrypt all files"]
    patterns = ['encrypt\\w*\\s+(all|every)\\s+(the\\s+)?files']
    [classifier]                   # optional: a local command or a second bundle decides
    command = ["/usr/local/bin/classify"]

`refuse` applies to request text (the reply is the error `policy_violation`
naming the rule), `stop` to generated text (generation ends before the
matching text is sent, finish reason `policy`), `flag` to either (served, and
recorded in the audit log). A rule that does not compile is a start-up error
naming it. Matching is case-insensitive unless the rule says otherwise, on
text normalized with NFKC and without zero-width characters, and phrases match
across any run of whitespace. A `stop` rule's match is never sent: the stream
holds back the tail of the text that could still begin one (a phrase's, exactly;
a pattern's, `hold_back_chars` if the rule sets it, else one less than its longest
match, at most DEFAULT_PATTERN_HOLD_CHARS).
This module only decides; `guard.py` enforces.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
import signal
import sys
import threading
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Optional

from .errors import ConfigError
from .native_paths import text_path
from .typed_toml import InvalidField, at_least, between, from_mapping, non_empty, parse_toml
from .types import MODES, GenerationRequest

Action = Literal["refuse", "stop", "flag"]
Where = Literal["input", "output"]

# What matching drops: every format character (Unicode category Cf: zero-width spaces and
# joiners, soft hyphen, bidirectional marks, invisible operators, tag characters ...) and the
# other code points Unicode calls default-ignorable (DerivedCoreProperties.txt's
# Default_Ignorable_Code_Point, which a text shows as nothing): the combining grapheme joiner,
# Hangul fillers, Khmer inherent vowels, Mongolian and other variation selectors, and the
# code points kept for more of them. Format characters live in planes 0, 1 and 14 only.
_DEFAULT_IGNORABLE_NOT_CF = (0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, *range(0x180B, 0x180E), 0x180F, 0x2065, 0x3164,
                             *range(0xFE00, 0xFE10), 0xFFA0, *range(0xFFF0, 0xFFF9), *range(0xE0000, 0xE1000))
_INVISIBLE = dict.fromkeys([c for c in range(0x20000) if unicodedata.category(chr(c)) == "Cf"]
                           + list(_DEFAULT_IGNORABLE_NOT_CF))
DEFAULT_OUTPUT_WINDOW_CHARS = 2048
DEFAULT_PATTERN_HOLD_CHARS = 64


# --------------------------------------------------------------------------- the file, as written


@dataclass(frozen=True)
class RuleSpec:
    name: Annotated[str, non_empty()]
    action: Action
    on: tuple[Where, ...] = ("input",)
    modes: tuple[Literal["complete", "infill", "chat"], ...] = MODES  # type: ignore[assignment]
    clients: tuple[str, ...] = ()  # fnmatch globs over client ids; empty: every client
    phrases: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()  # Python regular expressions
    case_sensitive: bool = False
    description: str = ""
    # stop rules: trailing characters the stream holds back for the patterns (a match
    # at most this long is never sent in part); None: the patterns' longest match, at
    # most DEFAULT_PATTERN_HOLD_CHARS. Phrases always hold back exactly what could begin one.
    hold_back_chars: Optional[Annotated[int, between(0, 1 << 20)]] = None

    def __post_init__(self) -> None:
        if not self.phrases and not self.patterns:
            raise InvalidField("phrases", "a rule needs at least one phrase or pattern")
        if not self.on:
            raise InvalidField("on", "expected 'input', 'output' or both")
        if not self.modes:
            raise InvalidField("modes", "expected at least one of complete, infill, chat")
        if self.action == "stop" and "input" in self.on:
            raise InvalidField("action", "'stop' ends generation, so it applies to on = ['output'] only; "
                                         "use 'refuse' for request text")
        if self.action == "refuse" and "output" in self.on:
            raise InvalidField("action", "'refuse' applies to request text (on = ['input']); use 'stop' for "
                                         "generated text")
        for i, phrase in enumerate(self.phrases):
            if not normalize(phrase).split():  # zero-width characters alone normalize to nothing
                raise InvalidField(f"phrases[{i}]", "empty phrase (nothing left after whitespace and zero-width "
                                                    "characters)")
        if self.hold_back_chars is not None and self.action != "stop":
            raise InvalidField("hold_back_chars", "applies to 'stop' rules only (what the stream holds back)")


@dataclass(frozen=True)
class ClientLimitSpec:
    """One client's own limits; a key it does not set is [limits]' (None)."""

    requests_per_minute: Optional[Annotated[int, at_least(0)]] = None  # 0: no limit
    max_tokens: Optional[Annotated[int, at_least(0)]] = None  # 0: only the daemon's own [limits] max_tokens


@dataclass(frozen=True)
class LimitsSpec:
    requests_per_minute: Annotated[int, at_least(0)] = 0
    max_tokens: Annotated[int, at_least(0)] = 0
    per_client: dict[str, ClientLimitSpec] = field(default_factory=dict)


@dataclass(frozen=True)
class ClassifierSpec:
    """An external judge of request text. Exactly one of `command` (a local program
    given the text on stdin) and `bundle` (a second model bundle prompted with
    `prompt`, whose first generated word is the label)."""

    command: tuple[str, ...] = ()
    bundle: Path | None = None
    prompt: str = ("Classify the following request as SAFE or UNSAFE.\n\nRequest:\n{text}\n\nAnswer:")
    block_labels: tuple[str, ...] = ()  # command: its stdout's first word; bundle: required
    timeout_s: Annotated[float, between(0.01, 600.0)] = 5.0
    on_failure: Literal["closed", "open"] = "closed"  # closed: refuse when the classifier fails
    action: Literal["refuse", "flag"] = "refuse"
    modes: tuple[Literal["complete", "infill", "chat"], ...] = MODES  # type: ignore[assignment]
    clients: tuple[str, ...] = ()
    # a longer text is a failure (on_failure decides), never judged cut short; the default
    # holds the protocol's longest prompt with the newlines between a chat's messages
    max_text_chars: Annotated[int, at_least(1)] = 131072

    def __post_init__(self) -> None:
        if bool(self.command) == (self.bundle is not None):
            raise InvalidField("command", "set exactly one of 'command' and 'bundle'")
        if self.bundle is not None:
            if not self.block_labels:
                raise InvalidField("block_labels", "a bundle classifier needs the labels that block")
            if "{text}" not in self.prompt:
                raise InvalidField("prompt", "must contain {text}")


@dataclass(frozen=True)
class AuditSpec:
    record_text: bool = False  # false: only the SHA-256 of the text is logged
    max_bytes: Annotated[int, at_least(4096)] = 16 * 1024 * 1024  # then rotated to audit.jsonl.1


@dataclass(frozen=True)
class PolicySpec:
    version: Literal[1] = 1
    rules: tuple[RuleSpec, ...] = ()
    limits: LimitsSpec = field(default_factory=LimitsSpec)
    classifier: ClassifierSpec | None = None
    audit: AuditSpec = field(default_factory=AuditSpec)
    output_window_chars: Annotated[int, between(64, 1 << 20)] = DEFAULT_OUTPUT_WINDOW_CHARS

    def __post_init__(self) -> None:
        for i, rule in enumerate(self.rules):
            if rule.hold_back_chars is not None and rule.hold_back_chars > self.output_window_chars:
                raise InvalidField(f"rules[{i}].hold_back_chars", f"{rule.hold_back_chars} is more than "
                                   f"output_window_chars ({self.output_window_chars}), the text a rule looks at")


# --------------------------------------------------------------------------- compiled


def normalize(text: str) -> str:
    """What rules are matched against: NFKC (full-width letters, ligatures ... become
    plain ones) without invisible characters (zero-width ones, soft hyphens, bidirectional
    marks, every Unicode format character)."""
    return unicodedata.normalize("NFKC", text).translate(_INVISIBLE)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def _phrase_regex(phrase: str) -> str:
    return r"\s+".join(re.escape(word) for word in normalize(phrase).split())


def _phrase_beginnings_regex(phrase: str) -> str:
    """What a text can end with and still be the beginning, not the whole, of a match
    of the phrase: for "ab cd", a | ab | ab\\s+ | ab\\s+c."""
    words = normalize(phrase).split()
    beginnings = []
    for k, word in enumerate(words):
        head = "".join(re.escape(w) + r"\s+" for w in words[:k])
        last = k == len(words) - 1
        beginnings += [head + re.escape(word[:j]) for j in range(1, len(word) + (not last))]
        if not last:
            beginnings.append(head + re.escape(word) + r"\s+")
    return "|".join(beginnings)


def _sre_parser():
    """Python's regular-expression parser (a private module: callers stay safe if it changes)."""
    try:
        from re import _parser as sre_parse  # type: ignore[attr-defined]  # Python 3.11+
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse  # type: ignore[no-redef]
    return sre_parse


def _longest_match_chars(pattern: re.Pattern[str]) -> int | None:
    """How many characters a match of `pattern` can have at most; None when unbounded
    (or when this Python's regular-expression parser cannot tell)."""
    try:
        sre_parse = _sre_parser()
        longest = sre_parse.parse(pattern.pattern, pattern.flags).getwidth()[1]
    except Exception:  # pragma: no cover - a private module: stay safe if it changes
        return None
    return None if longest >= sre_parse.MAXREPEAT else int(longest)


def _start_literals(items: list, sre) -> list[str] | None:
    """The literal texts one of which a match of the parsed sequence `items` begins with
    (each at least one character); None when its start is not that simple."""
    prefix = []
    for op, av in items:
        if op == sre.LITERAL:
            prefix.append(chr(av))
            continue
        if prefix:
            break
        if op == sre.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            return None if add_flags or del_flags else _start_literals(list(sub), sre)
        if op == sre.BRANCH:
            starts: list[str] = []
            for branch in av[1]:
                branch_starts = _start_literals(list(branch), sre)
                if not branch_starts:
                    return None
                starts += branch_starts
            return starts
        return None
    return ["".join(prefix)] if prefix else None


# The characters re.IGNORECASE matches to an ASCII letter that str.lower() does not turn into
# that one letter (checked over every code point; tests/service/test_policy_rules.py pins it).
_TO_ASCII_FOLDS = (("\u0130", "i"), ("\u0131", "i"), ("\u017f", "s"), ("\u212a", "k"))


def fold_case(text: str) -> str:
    """`text` lowercased one character for one (positions kept), so that lower-case ASCII
    text occurs in it exactly where a pattern that ignores case could match that text."""
    if not text.isascii():
        for char, letter in _TO_ASCII_FOLDS:
            text = text.replace(char, letter)
    return text.lower()


@dataclass(frozen=True)
class Anchors:
    """ASCII texts one of which every match of a pattern begins with (lowercased, `fold`, where
    the pattern ignores case): a search need not start before the first of them, nor at all
    where none occurs."""

    texts: tuple[str, ...]
    fold: bool

    @classmethod
    def of(cls, pattern: re.Pattern[str]) -> Anchors | None:
        """None when the pattern's start is not such a text (a class, a repeat or an assertion
        first) or this Python's regular-expression parser cannot tell."""
        try:
            sre = _sre_parser()
            starts = _start_literals(list(sre.parse(pattern.pattern, pattern.flags)), sre)
        except Exception:  # pragma: no cover - a private module: stay safe if it changes
            return None
        if not starts or not all(text.isascii() for text in starts):
            return None
        fold = bool(pattern.flags & re.IGNORECASE)
        return cls(tuple(sorted({text.lower() if fold else text for text in starts})), fold)

    def first(self, text: str, pos: int, folded: str | None = None) -> int:
        """Where the earliest text occurs in `text` at or after `pos`, -1 where none does.
        `folded`: `fold_case(text)`, kept alongside it for all the patterns that ignore case."""
        haystack, offset = text, 0
        if self.fold:
            haystack, offset = (folded, 0) if folded is not None else (fold_case(text[pos:]), pos)
        found = [i for t in self.texts if (i := haystack.find(t, pos - offset)) >= 0]
        return offset + min(found) if found else -1


@dataclass(frozen=True)
class Rule:
    name: str
    action: str
    on: frozenset[str]
    modes: frozenset[str]
    clients: tuple[str, ...]
    phrases: re.Pattern[str] | None  # every phrase of the rule, as one alternation
    patterns: tuple[re.Pattern[str], ...]
    description: str = ""
    beginnings: re.Pattern[str] | None = None  # a tail of text that is the start of a phrase's match
    pattern_hold: int = 0  # stop rules: trailing characters held back for the patterns
    non_ascii: bool = False  # a phrase or pattern has a non-ASCII character (a combining mark may complete it)
    # per pattern: the longest match, when bounded and without lookahead (how far back a match
    # that reaches into new text can begin); None: the whole window
    pattern_lookbacks: tuple[int | None, ...] = ()
    # per pattern: the texts one of which each match begins with, or None; the search starts
    # at the first of them, and is skipped where none occurs (most tokens)
    pattern_anchors: tuple[Anchors | None, ...] = ()

    def applies(self, where: str, mode: str, client_id: str) -> bool:
        return (where in self.on and mode in self.modes
                and (not self.clients or any(fnmatch.fnmatchcase(client_id, g) for g in self.clients)))

    def first_match(self, text: str, phrases_from: int, patterns_from: int, new_from: int,
                    folded: str | None = None) -> int | None:
        """Where the earliest match begins (a phrase's at or after `phrases_from`, a
        pattern's at or after `patterns_from`), or None. `new_from`: where the text not yet
        searched begins; a pattern whose matches are at most n long is searched from n
        before it only, since a match found now must reach into that text. `folded`:
        `fold_case(text)`, where given."""
        def pattern_from(lookback: int | None, anchors: Anchors | None) -> int:
            pos = patterns_from if lookback is None else max(patterns_from, new_from - lookback)
            return pos if anchors is None else anchors.first(text, pos, folded)

        # a Rule made by hand without these searches each pattern over the whole window
        lookbacks = self.pattern_lookbacks or (None,) * len(self.patterns)
        anchors = self.pattern_anchors or (None,) * len(self.patterns)
        patterns = zip(self.patterns, lookbacks, anchors, strict=True)
        searches = [(self.phrases, phrases_from), *((rx, pattern_from(lb, a)) for rx, lb, a in patterns)]
        starts = [m.start() for rx, pos in searches if rx is not None and pos >= 0 and (m := rx.search(text, pos))]
        return min(starts, default=None)

    def phrase_opening(self, text: str, pos: int, endpos: int | None = None) -> int | None:
        """Where the longest tail of `text[:endpos]` (from `pos` on) that is the start, not
        the whole, of a phrase's match begins; None when no tail is."""
        if self.beginnings is None:
            return None
        m = self.beginnings.search(text, pos, len(text) if endpos is None else endpos)
        return None if m is None else m.start()


@dataclass(frozen=True)
class Violation:
    """A rule (or limit, or the classifier) that matched a request or its output."""

    rule: str
    action: str  # refuse | stop | flag
    where: str  # input | output | limit | classifier
    description: str = ""
    at: int | None = None  # output: where the match begins (OutputWatch.length counts the same)


@dataclass(frozen=True)
class ClientLimit:
    requests_per_minute: int
    max_tokens: int


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    limits: LimitsSpec
    classifier: ClassifierSpec | None
    audit: AuditSpec
    output_window_chars: int
    source: str  # the file it came from
    sha256: str  # of the file's bytes: which policy is live

    def limit_for(self, client_id: str) -> ClientLimit:
        own = self.limits.per_client.get(client_id)
        return ClientLimit(
            requests_per_minute=own.requests_per_minute if own and own.requests_per_minute is not None
            else self.limits.requests_per_minute,
            max_tokens=own.max_tokens if own and own.max_tokens is not None else self.limits.max_tokens)

    def rules_for(self, where: str, mode: str, client_id: str) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.applies(where, mode, client_id))

    def check_input(self, request: GenerationRequest, client_id: str) -> list[Violation]:
        """Every input rule that matches the request's text, in file order."""
        rules = self.rules_for("input", request.mode, client_id)
        if not rules:
            return []
        text = normalize(request_text(request))
        return [Violation(r.name, r.action, "input", r.description) for r in rules
                if r.first_match(text, 0, 0, 0) is not None]

    def classifier_applies(self, mode: str, client_id: str) -> bool:
        c = self.classifier
        return c is not None and mode in c.modes and (
            not c.clients or any(fnmatch.fnmatchcase(client_id, g) for g in c.clients))

    def summary(self) -> dict[str, object]:
        return {"sha256": self.sha256, "rules": len(self.rules),
                "classifier": (None if self.classifier is None
                               else "command" if self.classifier.command else "bundle")}


def request_text(request: GenerationRequest) -> str:
    """The user-supplied text of a request: prompt; prefix and suffix; every message."""
    if request.mode == "complete":
        return request.prompt or ""
    if request.mode == "infill":
        return f"{request.prefix or ''}\n{request.suffix or ''}"
    return "\n".join(m.content for m in request.messages)


class OutputWatch:
    """Feeds generated text through the output rules of one request. Each rule fires
    at most once; matches are looked for in the last `window` characters (a match
    longer than that is missed). Offsets count characters of the normalized text
    from the start of the output.

    A phrase's match can only begin where the text before the newest delta ended
    with the start of one (a rule's *opening*), or in the delta: so phrases are
    searched from there on, and the opening, found on the way, is what a `stop`
    rule holds back. Patterns are searched in the whole window.

    Each delta is normalized from the last starter before it (the character that
    combining marks attach to), so text split between chunks normalizes as the whole
    text does: "cafe" then U+0301 is "café". A match may end in that last part and be
    undone by marks to come; it is reported all the same (a stop that errs on the side
    of stopping), and where a rule has non-ASCII text that a mark could complete, the
    last part is held back too."""

    def __init__(self, rules: tuple[Rule, ...], window: int = DEFAULT_OUTPUT_WINDOW_CHARS) -> None:
        self._rules = list(rules)
        self._window = window
        self._text = ""  # the normalized output's last characters
        self._folded = ""  # the same, fold_case'd: where patterns that ignore case find their anchors
        self._dropped = 0  # characters trimmed off the front of _text
        self._opening: dict[str, int] = {}  # rule name -> absolute offset of its phrase opening
        self._resume: dict[str, int] = {}  # the same, in the text before the provisional part: where to search on
        # The output from its last starter (a character that combining marks attach to) on, as
        # generated, and its length in _text: the next delta may begin with marks that change it
        # ("e" then U+0301 is "é"), so it is normalized again with them.
        self._provisional_raw = ""
        self._provisional_len = 0

    @property
    def text(self) -> str:
        return self._text

    @property
    def length(self) -> int:
        """Characters of normalized output fed so far."""
        return self._dropped + len(self._text)

    def feed(self, delta: str) -> list[Violation]:
        if not self._rules or not delta:
            return []
        raw = self._provisional_raw + delta
        cut = _last_starter(raw) if len(raw) <= MAX_PROVISIONAL_CHARS else len(raw)
        before = len(self._text) - self._provisional_len  # where the text normalized now begins
        provisional = normalize(raw[cut:])
        fresh = normalize(raw[:cut]) + provisional
        self._text = self._text[:before] + fresh
        self._folded = self._folded[:before] + fold_case(fresh)
        self._provisional_raw, self._provisional_len = raw[cut:], len(provisional)
        start = max(0, before - self._window)
        hits = []
        committed = len(self._text) - self._provisional_len
        for rule in list(self._rules):
            self._opening.pop(rule.name, None)
            resume = self._resume.pop(rule.name, None)
            phrases_from = max(start, before if resume is None else min(before, resume - self._dropped))
            at = rule.first_match(self._text, phrases_from, start, before, self._folded)
            if at is not None:
                hits.append(Violation(rule.name, rule.action, "output", rule.description, at=self._dropped + at))
                self._rules.remove(rule)
                continue
            # the opening before the provisional part: where the next search resumes, and what a
            # non-ASCII stop rule holds back; an ASCII stop rule holds back the one in the whole text
            wanted = [(self._resume, committed)]
            if rule.action == "stop" and not rule.non_ascii:
                wanted.append((self._opening, None))
            for openings, endpos in wanted:
                opening = rule.phrase_opening(self._text, phrases_from, endpos)
                if opening is not None:
                    openings[rule.name] = self._dropped + opening
        if len(self._text) > 4 * self._window:  # keep memory bounded on long outputs
            self._dropped += len(self._text) - self._window
            self._text = self._text[-self._window:]
            self._folded = self._folded[-self._window:]
        return hits

    def open_tail(self) -> int:
        """How many of the last characters a `stop` rule's match could still begin in:
        the stream holds them back until the text after them rules a match out."""
        held = 0
        for rule in self._rules:
            if rule.action == "stop":
                # non-ASCII text: the last part may yet become part of a match ("cafe" + U+0301),
                # so it is held, and the opening is the one found before it
                opening = (self._resume if rule.non_ascii else self._opening).get(rule.name)
                held = max(held, min(rule.pattern_hold, len(self._text), self._window),
                           0 if opening is None else self.length - opening,
                           self._provisional_len if rule.non_ascii else 0)
        return held


MAX_PROVISIONAL_CHARS = 64  # a longer run of combining marks is normalized as it comes


def _last_starter(text: str) -> int:
    """Where the last character with canonical combining class 0 is (0 when there is none)."""
    for i in range(len(text) - 1, -1, -1):
        if not unicodedata.combining(text[i]):
            return i
    return 0


def _pattern_hold(longest: list[int | None]) -> int:
    """What a stop rule's patterns hold back by default, from their longest matches (None:
    unbounded): one character less than the longest, at most DEFAULT_PATTERN_HOLD_CHARS."""
    if any(n is None for n in longest):
        return DEFAULT_PATTERN_HOLD_CHARS
    return max(0, min(DEFAULT_PATTERN_HOLD_CHARS, max(n for n in longest if n is not None) - 1))


# A pattern is searched on the MQTT network thread for every request (up to the protocol's
# 65,536 characters): one whose time grows faster than the text (nested or adjacent unbounded
# quantifiers, `exfiltrat\w*\w*`, `(a+)+b`) could stall the daemon with one crafted prompt.
# Each is timed at load on its own words (and runs of digits, spaces, its punctuation) repeated, at
# growing lengths, ended by a NUL, and refused past a
# budget that grows with the length (a linear pattern stays far below it on any board). The
# lengths start small and grow slowly there, so that a pattern whose time doubles with each
# character is caught at a few dozen characters, in well under a second, before it can hang
# the load.
COST_PROBE_LENGTHS = (*range(2, 65, 2), 128, 256, 1024, 4096, 16384)
COST_PROBE_LIMIT_S = 2.0  # one probe past this is cut short (where the load runs on the main thread)


def _cost_budget_s(length: int) -> float:
    return max(0.02, 0.25 * length / COST_PROBE_LENGTHS[-1])


def _cost_probes(pattern: str, length: int) -> list[str]:
    """The pattern's own words (and letters) run together, spaced, on lines and each alone,
    and runs of digits, of spaces and of each punctuation character the pattern has, repeated
    to `length` and ended by a character hardly any pattern takes: the texts on which a pattern
    that backtracks works hardest (the end makes one anchored there, as `(\\w+\\s?)+$`, fail
    only after it has tried every way to split the run)."""
    words = list(dict.fromkeys(w.lower() for w in re.findall(r"[A-Za-z]+", pattern)))[:12] or ["a"]
    units = [sep.join(words) + sep for sep in ("", " ", "\n")] + (words if len(words) > 1 else [])
    units += ["1", " ", *dict.fromkeys(c for c in pattern if c.isascii() and c in _PROBE_PUNCTUATION)][:24]
    return [(unit * (length // len(unit) + 1))[:length - 1] + _PROBE_END for unit in units]


_PROBE_PUNCTUATION = frozenset("!\"#%&',-./:;<=>@_`~")  # what a pattern may repeat as a literal
_PROBE_END = "\x00"


class _ProbeTooSlow(Exception):
    pass


@contextmanager
def _cut_short_after(seconds: float) -> Iterator[None]:
    """Raise _ProbeTooSlow in the block after `seconds` (re checks for signals while it
    backtracks); on another thread than the main one, where no alarm can be set, nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum: int, frame: object) -> None:
        raise _ProbeTooSlow

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _search_time(rx: re.Pattern[str], text: str) -> float:
    start = time.perf_counter()
    try:
        with _cut_short_after(COST_PROBE_LIMIT_S):
            for _ in rx.finditer(text):
                pass
    except _ProbeTooSlow:
        pass
    return time.perf_counter() - start


def check_pattern_cost(rx: re.Pattern[str], key: str) -> None:
    """ConfigError when searching `rx` takes more than the budget on its probes."""
    for length in COST_PROBE_LENGTHS:
        for text in _cost_probes(rx.pattern, length):
            took = _search_time(rx, text)
            if took > _cost_budget_s(length):  # twice more: a busy machine is not a slow pattern
                took = min(took, _search_time(rx, text), _search_time(rx, text))
            if took > _cost_budget_s(length):
                raise ConfigError(
                    f"{key}: takes {took:.2f} s to search {length:,} characters of its own words repeated, "
                    f"and grows faster than the text: a request could stall the daemon. Bound its quantifiers "
                    f"(\\w{{0,12}} for \\w*, [\\s\\S]{{0,80}} for .*), start it at a word boundary (\\b), "
                    f"and do not nest or chain unbounded ones")


def _newer_re_syntax(pattern: str, exc: Exception) -> str:
    """Why a pattern that Python 3.11's re compiles does not compile here ("" otherwise): an
    atomic group or a possessive quantifier, which a policy checked on a 3.11+ workstation may
    hold, on a Python 3.10 device (JetPack 6, Ubuntu 22.04)."""
    if sys.version_info >= (3, 11) or not isinstance(exc, re.error) or exc.pos is None:
        return ""
    atomic = exc.msg == "unknown extension ?>"
    possessive = exc.msg == "multiple repeat" and pattern[exc.pos:exc.pos + 1] == "+"
    if not (atomic or possessive):
        return ""
    return (f" ({'an atomic group (?>...)' if atomic else 'a possessive quantifier (*+ ++ ?+ {m,n}+)'} needs "
            f"Python 3.11 or newer, and this is Python {sys.version_info[0]}.{sys.version_info[1]}: use a plain "
            "group (...) or quantifier, which every Python reads)")


def _compile_pattern(pattern: str, flags: int, key: str) -> re.Pattern[str]:
    """ConfigError naming `key` for a pattern that does not compile (a syntax error, a repeat
    count past what re allows, groups nested too deep for its parser) or that matches the
    empty text: such a pattern matches every request."""
    try:
        rx = re.compile(pattern, flags)
    except RecursionError:
        raise ConfigError(f"{key}: does not compile: its groups are nested too deeply") from None
    except (re.error, OverflowError, ValueError) as exc:
        raise ConfigError(f"{key}: does not compile: {exc}{_newer_re_syntax(pattern, exc)}") from None
    if rx.search("") is not None:
        raise ConfigError(f"{key}: matches the empty text ({pattern!r}), so it would match every request: "
                          f"give it text it must find (an empty alternative, as in 'a|', or a pattern "
                          f"that is all optional, as in 'x*', matches anything)")
    for sample in ZERO_WIDTH_SAMPLES:
        found = rx.search(sample)
        if found is not None and found.end() == found.start():
            raise ConfigError(f"{key}: matches no characters in ordinary text ({pattern!r} in {sample!r}), so it "
                              "would match nearly every request: a pattern must take some text (a lone \\b or "
                              "lookaround takes none)")
    return rx


# Plain code and prose that a policy pattern should not match without taking a character: a
# zero-width match in them (\b, a lone lookahead) would match nearly every request.
ZERO_WIDTH_SAMPLES = ("a b", "def f(x):\n    return x + 1\n", "Hello, world.")


def check_classifier(spec: ClassifierSpec, source: str) -> None:
    """ConfigError naming the key when the classifier's program cannot be run or its bundle
    folder is missing: the daemon would otherwise fail every request it judges (or, with
    on_failure = "open", judge none), with the cause only in its log. The program is looked
    for as the daemon starts it: a bare name on PATH, a path with a slash from the current
    folder."""
    if spec.command:
        program = spec.command[0]
        key = f"{source}: classifier.command[0] ({program!r})"
        if not program:
            raise ConfigError(f"{key}: empty program name")
        if os.sep not in program and (os.altsep is None or os.altsep not in program):
            if shutil.which(program) is None:
                raise ConfigError(f"{key}: no such program on PATH; give its absolute path")
        elif not os.path.exists(program):
            raise ConfigError(f"{key}: no such file")
        elif os.path.isdir(program):
            raise ConfigError(f"{key}: is a folder, not a program")
        elif not os.access(program, os.X_OK):
            raise ConfigError(f"{key}: not executable (chmod +x it, or name its interpreter first: "
                              f"command = [\"/usr/bin/python3\", \"{program}\"])")
    if spec.bundle is not None:
        key = f"{source}: classifier.bundle ({str(spec.bundle)!r})"
        if not spec.bundle.exists():
            raise ConfigError(f"{key}: no such folder")
        if not spec.bundle.is_dir():
            raise ConfigError(f"{key}: not a folder (a bundle is the folder `edge-runtime export` writes)")


def compile_policy(spec: PolicySpec, *, source: str, sha256: str = "") -> Policy:
    rules = []
    seen: set[str] = set()
    for i, r in enumerate(spec.rules):
        key = f"{source}: rules[{i}] ({r.name!r})"
        if r.name in seen:
            raise ConfigError(f"{key}: name: another rule has the same name")
        seen.add(r.name)
        flags = 0 if r.case_sensitive else re.IGNORECASE
        phrases, patterns = None, []
        if r.phrases:
            phrases = re.compile("|".join(_phrase_regex(p) for p in r.phrases), flags)
        for j, pattern in enumerate(r.patterns):
            patterns.append(_compile_pattern(pattern, flags, f"{key}: patterns[{j}]"))
            check_pattern_cost(patterns[-1], f"{key}: patterns[{j}]")
        beginnings = None
        if r.phrases:
            beginnings = re.compile("(?:" + "|".join(_phrase_beginnings_regex(p) for p in r.phrases) + r")\Z", flags)
        longest = [_longest_match_chars(rx) for rx in patterns]
        hold = 0
        if r.action == "stop" and r.patterns:
            hold = r.hold_back_chars if r.hold_back_chars is not None else _pattern_hold(longest)
        non_ascii = not all(normalize(text).isascii() for text in (*r.phrases, *r.patterns))
        # how far back a new match can begin: a lookahead can reach past the match's own length
        lookbacks = tuple(None if "(?=" in rx.pattern or "(?!" in rx.pattern else n
                          for rx, n in zip(patterns, longest))
        rules.append(Rule(r.name, r.action, frozenset(r.on), frozenset(r.modes), r.clients, phrases,
                          tuple(patterns), r.description, beginnings, hold, non_ascii, lookbacks,
                          tuple(Anchors.of(rx) for rx in patterns)))
    if spec.classifier is not None:
        check_classifier(spec.classifier, source)
    return Policy(tuple(rules), spec.limits, spec.classifier, spec.audit, spec.output_window_chars,
                  source, sha256)


def parse_policy(raw: bytes, *, source: str, base: Path | None = None) -> Policy:
    data = parse_toml(raw, source=source)
    classifier = data.get("classifier")
    if isinstance(classifier, dict) and isinstance(classifier.get("command"), list):
        # the program and its arguments as the filesystem and exec take them (UTF-8 text's bytes)
        classifier["command"] = [text_path(a) if isinstance(a, str) else a for a in classifier["command"]]
    if base is not None and isinstance(classifier, dict) and isinstance(classifier.get("bundle"), str):
        bundle = Path(text_path(classifier["bundle"])).expanduser()
        classifier["bundle"] = str(bundle if bundle.is_absolute() else base / bundle)
    spec = from_mapping(PolicySpec, data, source=source)
    return compile_policy(spec, source=source, sha256=hashlib.sha256(raw).hexdigest())


def load_policy(path: Path | str) -> Policy:
    """Read and compile a policy file. Raises ConfigError naming the file and key."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the policy file: {exc.strerror or exc}") from exc
    return parse_policy(raw, source=str(path), base=path.resolve().parent)
