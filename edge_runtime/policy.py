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
across any run of whitespace. This module only decides; `guard.py` enforces.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from .errors import ConfigError
from .typed_toml import InvalidField, at_least, between, from_mapping, non_empty, parse_toml
from .types import MODES, GenerationRequest

Action = Literal["refuse", "stop", "flag"]
Where = Literal["input", "output"]

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))
DEFAULT_OUTPUT_WINDOW_CHARS = 2048


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
            if not phrase.strip():
                raise InvalidField(f"phrases[{i}]", "empty phrase")


@dataclass(frozen=True)
class ClientLimitSpec:
    requests_per_minute: Annotated[int, at_least(0)] = 0  # 0: no limit
    max_tokens: Annotated[int, at_least(0)] = 0  # 0: the daemon's own [limits] max_tokens


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
    max_text_chars: Annotated[int, at_least(1)] = 65536

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


# --------------------------------------------------------------------------- compiled


def normalize(text: str) -> str:
    """What rules are matched against: NFKC (full-width letters, ligatures ... become
    plain ones) without zero-width characters and soft hyphens."""
    return unicodedata.normalize("NFKC", text).translate(_ZERO_WIDTH)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def _phrase_regex(phrase: str) -> str:
    return r"\s+".join(re.escape(word) for word in normalize(phrase).split())


@dataclass(frozen=True)
class Rule:
    name: str
    action: str
    on: frozenset[str]
    modes: frozenset[str]
    clients: tuple[str, ...]
    regexes: tuple[re.Pattern[str], ...]
    description: str = ""

    def applies(self, where: str, mode: str, client_id: str) -> bool:
        return (where in self.on and mode in self.modes
                and (not self.clients or any(fnmatch.fnmatchcase(client_id, g) for g in self.clients)))

    def search(self, text: str, pos: int = 0) -> bool:
        return any(rx.search(text, pos) for rx in self.regexes)


@dataclass(frozen=True)
class Violation:
    """A rule (or limit, or the classifier) that matched a request or its output."""

    rule: str
    action: str  # refuse | stop | flag
    where: str  # input | output | limit | classifier
    description: str = ""


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
            requests_per_minute=own.requests_per_minute if own and own.requests_per_minute
            else self.limits.requests_per_minute,
            max_tokens=own.max_tokens if own and own.max_tokens else self.limits.max_tokens)

    def rules_for(self, where: str, mode: str, client_id: str) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.applies(where, mode, client_id))

    def check_input(self, request: GenerationRequest, client_id: str) -> list[Violation]:
        """Every input rule that matches the request's text, in file order."""
        rules = self.rules_for("input", request.mode, client_id)
        if not rules:
            return []
        text = normalize(request_text(request))
        return [Violation(r.name, r.action, "input", r.description) for r in rules if r.search(text)]

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
    at most once; only matches that end in the newest text are reported, and matches
    are looked for in the last `window` characters (a match longer than that is missed)."""

    def __init__(self, rules: tuple[Rule, ...], window: int = DEFAULT_OUTPUT_WINDOW_CHARS) -> None:
        self._rules = list(rules)
        self._window = window
        self._text = ""

    @property
    def text(self) -> str:
        return self._text

    def feed(self, delta: str) -> list[Violation]:
        if not self._rules or not delta:
            return []
        before = len(self._text)
        self._text += normalize(delta)
        start = max(0, before - self._window)
        hits = []
        for rule in list(self._rules):
            if rule.search(self._text, start):
                hits.append(Violation(rule.name, rule.action, "output", rule.description))
                self._rules.remove(rule)
        if len(self._text) > 4 * self._window:  # keep memory bounded on long outputs
            self._text = self._text[-self._window:]
        return hits


def compile_policy(spec: PolicySpec, *, source: str, sha256: str = "") -> Policy:
    rules = []
    seen: set[str] = set()
    for i, r in enumerate(spec.rules):
        key = f"{source}: rules[{i}] ({r.name!r})"
        if r.name in seen:
            raise ConfigError(f"{key}: name: another rule has the same name")
        seen.add(r.name)
        flags = 0 if r.case_sensitive else re.IGNORECASE
        regexes = []
        if r.phrases:
            regexes.append(re.compile("|".join(_phrase_regex(p) for p in r.phrases), flags))
        for j, pattern in enumerate(r.patterns):
            try:
                regexes.append(re.compile(pattern, flags))
            except re.error as exc:
                raise ConfigError(f"{key}: patterns[{j}]: does not compile: {exc}") from None
        rules.append(Rule(r.name, r.action, frozenset(r.on), frozenset(r.modes), r.clients, tuple(regexes),
                          r.description))
    return Policy(tuple(rules), spec.limits, spec.classifier, spec.audit, spec.output_window_chars,
                  source, sha256)


def parse_policy(raw: bytes, *, source: str, base: Path | None = None) -> Policy:
    data = parse_toml(raw, source=source)
    classifier = data.get("classifier")
    if base is not None and isinstance(classifier, dict) and isinstance(classifier.get("bundle"), str):
        bundle = Path(classifier["bundle"]).expanduser()
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
