"""Wire protocol v1: MQTT topics and the JSON of requests, replies and status.

This module is the only place that knows topic names and JSON field names. It
turns a request payload into a typed `WireRequest` (or raises `ProtocolError`
with the protocol error code), and encodes chunks, final replies, error replies
and status messages. It does not touch the network; `docs/protocol.md` is the
user-facing description of the same contract.

Topics (``<device_id>`` is the daemon's configured device id):

* ``edge/<device_id>/v1/generate``  requests (QoS 1)
* ``$share/<fleet_group>/edge/fleet/v1/generate``  fleet requests (shared subscription)
* ``edge/<device_id>/v1/cancel``    ``{"id": ...}`` stops a queued or running request
* ``edge/<device_id>/v1/status``    retained daemon state
* ``edge/<device_id>/v1/reply/<client_id>/<request id>``  EdgeClient's reply topics
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import REQUEST_ERRORS, BadRequest
from .sampling import validate_sampling
from .types import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    MAX_SEED,
    MODES,
    GenerationRequest,
    GenerationResult,
    Message,
    SamplingParams,
    is_int,
    is_number,
)

PROTOCOL_VERSION = 1

# Error codes a final error reply can carry (the `code` of edge_runtime.errors classes).
ERROR_CODES: tuple[str, ...] = (*(e.code for e in REQUEST_ERRORS), "internal")

STATES: tuple[str, ...] = ("online", "draining", "offline")

MAX_ID_CHARS = 128
# A reply topic is kept whole while its request is pending and for as long as its final reply
# is stored (the reply store's key, ~2,000 of them), and its client id level goes into log and
# audit lines and the prompt cache's owner: bounded, so one client cannot make the daemon hold
# 64 KB per request (2,000 stored replies under 60 KB topics were ~120 MB in memory and ~280 MB
# on disk). EdgeClient's longest topic is ~660 bytes (a 64-character device and client id and a
# 128-character request id of 4-byte characters).
MAX_REPLY_TOPIC_BYTES = 1024
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_MESSAGES = 1024
ROLES: tuple[str, ...] = ("system", "user", "assistant")

# Every field a v1 request may carry; anything else is a bad_request (catches typos
# such as "max_token" instead of silently ignoring them).
REQUEST_FIELDS = frozenset({
    "id", "mode", "prompt", "prefix", "suffix", "suffix_first", "messages",
    "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
    "deadline_ms", "reply_to", "cache_prompt", "count_tokens",
    "repeat_penalty", "presence_penalty", "frequency_penalty", "repeat_last_n", "min_p",
})
# Fields whose null means "left out" (see parse_request)
_NULLABLE_FIELDS = REQUEST_FIELDS - {"id", "mode"}
# The sampling fields after temperature, top_p, top_k and seed (min_p and the repetition
# penalties) and their defaults (off): SamplingParams' own
MORE_SAMPLING_DEFAULTS: dict[str, Any] = {name: getattr(SamplingParams(), name) for name in
                                          ("min_p", "repeat_penalty", "presence_penalty", "frequency_penalty",
                                           "repeat_last_n")}
# JSON numbers the sampler takes as floats (an integer 1 for top_p is 1.0)
_FLOAT_SAMPLING_FIELDS = frozenset({"temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty",
                                    "frequency_penalty"})
_MODE_FIELDS: dict[str, frozenset[str]] = {
    "complete": frozenset({"prompt"}),
    "infill": frozenset({"prefix", "suffix", "suffix_first"}),
    "chat": frozenset({"messages"}),
}

# Device ids, fleet groups and client ids become topic levels.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FLEET_LEVEL = "fleet"


# --------------------------------------------------------------------------- topics


def validate_name(value: str, what: str) -> str:
    """Check a device id / fleet group / client id used as one topic level.

    1-64 characters of ``A-Z a-z 0-9 . _ -``, starting with a letter or digit.
    Raises ValueError naming `what`.
    """
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(f"{what} must be 1-64 characters of A-Z a-z 0-9 . _ - "
                         f"starting with a letter or digit, got {value!r}")
    return value


@dataclass(frozen=True)
class Topics:
    """The topics of one device, or with ``Topics("fleet")`` of the fleet (clients only:
    requests to ``edge/fleet/v1/generate`` and replies under ``edge/fleet/v1/reply/``;
    the fleet has no cancel or status topic). A daemon's device id is never "fleet"."""

    device_id: str

    def __post_init__(self) -> None:
        validate_name(self.device_id, "device_id")

    @property
    def is_fleet(self) -> bool:
        return self.device_id == FLEET_LEVEL

    @property
    def base(self) -> str:
        return f"edge/{self.device_id}/v1"

    @property
    def generate(self) -> str:
        return f"{self.base}/generate"

    @property
    def cancel(self) -> str:
        return f"{self.base}/cancel"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def reply_prefix(self) -> str:
        return f"{self.base}/reply"

    def client_reply_filter(self, client_id: str) -> str:
        """The subscription an EdgeClient uses for all of its replies."""
        return f"{self.reply_prefix}/{validate_name(client_id, 'client_id')}/+"

    def reply_topic(self, client_id: str, request_id: str) -> str:
        """``edge/<device_id>/v1/reply/<client_id>/<request id>``."""
        validate_name(client_id, "client_id")
        if not is_valid_publish_topic(request_id) or "/" in request_id:
            raise ValueError(f"request id {request_id!r} cannot be a topic level")
        return f"{self.reply_prefix}/{client_id}/{request_id}"


FLEET_GENERATE_TOPIC = f"edge/{FLEET_LEVEL}/v1/generate"


def fleet_subscription(fleet_group: str) -> str:
    """``$share/<fleet_group>/edge/fleet/v1/generate``: one device of the group gets each request."""
    return f"$share/{validate_name(fleet_group, 'fleet_group')}/{FLEET_GENERATE_TOPIC}"


_CONTROL_TOPIC_RE = re.compile(r"^edge/[^/]+/v1/(generate|cancel|status)$")


def is_control_topic(topic: str) -> bool:
    """A request, cancel or status topic of any device (or of the fleet): never a reply topic."""
    return bool(_CONTROL_TOPIC_RE.match(topic))


_REPLY_TOPIC_RE = re.compile(r"^edge/[^/]+/v1/reply/([^/]+)(?:/|$)")


def reply_client_id(topic: str) -> str:
    """The client id level of an ``edge/<device>/v1/reply/<client_id>/...`` topic (or of
    ``edge/<device>/v1/reply/<client_id>`` itself, which the ACL's ``.../<client_id>/#``
    lets that client read too), or "" for any other reply topic. The sample broker ACL
    lets a client read only the replies under its own id, so a client that names another
    id gets no answer."""
    match = _REPLY_TOPIC_RE.match(topic)
    return match.group(1) if match else ""


# What MQTT's UTF-8 strings must not hold (MQTT 3.1.1 and 5, 1.5.3/1.5.4): surrogates (not
# encodable), NUL; and what a broker may take for a malformed packet and drop the connection
# over (Mosquitto does): control characters and Unicode noncharacters
_BAD_TOPIC_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff]"
                              "|[\U0001fffe\U0001ffff\U0002fffe\U0002ffff\U0003fffe\U0003ffff\U0004fffe"
                              "\U0004ffff\U0005fffe\U0005ffff\U0006fffe\U0006ffff\U0007fffe\U0007ffff"
                              "\U0008fffe\U0008ffff\U0009fffe\U0009ffff\U000afffe\U000affff\U000bfffe"
                              "\U000bffff\U000cfffe\U000cffff\U000dfffe\U000dffff\U000efffe\U000effff"
                              "\U000ffffe\U000fffff\U0010fffe\U0010ffff]")


def is_valid_publish_topic(topic: object) -> bool:
    """A topic one may publish to: non-empty, no wildcards, not a ``$`` topic, ≤ 65535 bytes,
    and none of the characters a broker refuses (NUL, surrogates, control characters,
    noncharacters): a reply topic with one would get the daemon disconnected at its first
    publish, and again at each reconnect while the publish is queued."""
    if not isinstance(topic, str) or not topic or topic.startswith("$"):
        return False
    if "+" in topic or "#" in topic or _BAD_TOPIC_CHARS.search(topic):
        return False
    return len(topic.encode("utf-8")) <= 65535


def reply_topic_too_long(topic: str) -> str | None:
    """Why a usable reply topic is refused (`bad_request`) for its size, or None when it is not
    longer than MAX_REPLY_TOPIC_BYTES of UTF-8."""
    size = len(topic.encode("utf-8", "surrogatepass"))
    if size <= MAX_REPLY_TOPIC_BYTES:
        return None
    return f"the reply topic is {size} bytes of UTF-8, the limit is {MAX_REPLY_TOPIC_BYTES}"


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class RequestLimits:
    """Request limits (the `[limits]` config section is structurally the same)."""

    max_payload_bytes: int = 256 * 1024
    max_prompt_chars: int = 64 * 1024
    max_tokens: int = 2048
    default_deadline_ms: int = 120_000
    max_deadline_ms: int = 600_000


@dataclass(frozen=True)
class WireRequest:
    """A validated request: the engine's `GenerationRequest` plus the wire-only fields."""

    id: str
    request: GenerationRequest  # .id == id; .deadline is a time.monotonic() value
    stream: bool
    deadline_ms: int
    reply_to: str | None  # the reply topic from the JSON (what a daemon on MQTT 3.1.1 answers to)
    count_tokens: bool = False  # answer with the prompt's token count (encode_count) instead of generating

    @property
    def mode(self) -> str:
        return self.request.mode

    @property
    def prompt_chars(self) -> int:
        return prompt_chars(self.request)


class ProtocolError(Exception):
    """A request that cannot be accepted. `code` is a protocol error code; `request_id`
    and `reply_to` are filled in when they could be read from the payload."""

    def __init__(self, code: str, message: str, *, request_id: str | None = None,
                 reply_to: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        assert code in ERROR_CODES, code
        self.code = code
        self.message = message
        self.request_id = request_id
        self.reply_to = reply_to


def prompt_chars(request: GenerationRequest) -> int:
    """Characters of user text in a request (prompt, prefix + suffix, or message contents)."""
    if request.mode == "complete":
        return len(request.prompt or "")
    if request.mode == "infill":
        return len(request.prefix or "") + len(request.suffix or "")
    return sum(len(m.content) for m in request.messages)


_SHOWN_NAMES = 8
_SHOWN_NAME_CHARS = 40


def _field_names(names: list[str]) -> str:
    """Unknown field names for an error message (sent back and logged): the first few, each cut
    short; the client chose them, up to the whole payload (256 KB logged per request)."""
    shown = [n if len(n) <= _SHOWN_NAME_CHARS else n[:_SHOWN_NAME_CHARS] + "…" for n in names[:_SHOWN_NAMES]]
    more = f" and {len(names) - _SHOWN_NAMES} more" if len(names) > _SHOWN_NAMES else ""
    return ", ".join(shown) + more


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Python reads integers of at most 4,300 digits (sys.get_int_max_str_digits(), a guard against
# slow conversions); a longer one is refused here, with a message for the client, not Python's
MAX_INT_DIGITS = 4300


def _parse_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise ValueError(f"payload has a number of {digits} digits; at most {MAX_INT_DIGITS} are read")
    return int(text)


def _peek_id(obj: Mapping[str, Any]) -> str | None:
    value = obj.get("id")
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS:
        return value
    return None


def _peek_reply_to(obj: Mapping[str, Any]) -> str | None:
    value = obj.get("reply_to")
    return value if is_valid_publish_topic(value) else None


def decode_json_object(payload: bytes) -> dict[str, Any]:
    """Strict JSON decoding of an object (UTF-8, no NaN/Infinity). Raises ValueError.
    A leading UTF-8 byte order mark is skipped, as RFC 8259 allows a parser to: some
    encoders write one (Windows tools, a JSON file saved by an editor and sent with
    ``mosquitto_pub -f``)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"payload is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    text = text.removeprefix("\ufeff")
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"payload is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"payload must be a JSON object, got {type(obj).__name__}")
    return obj


def payload_seed(payload: bytes) -> int:
    """The sampling seed of a request that names none: from its bytes (which hold its id),
    so each request samples afresh, and one the broker delivers again after the daemon
    died mid-answer samples the same tokens, continuing the stream its client saw."""
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "big") & MAX_SEED


def parse_request(payload: bytes, limits: RequestLimits | Any = RequestLimits(), *,
                  now: float | None = None) -> WireRequest:
    """Validate a request payload against the protocol and `limits`.

    `limits` is anything with the `RequestLimits` attributes (e.g. the config's
    `[limits]` section). `now` is the `time.monotonic()` value the deadline counts
    from (default: now). Special tokens in the text (``<PRE>``, ``[INST]``, ...) are
    left for the engine, which knows the model's tokenizer and rejects them with
    `unsafe_prompt`.

    Raises `ProtocolError` (codes ``bad_request`` or ``unsupported_mode``).
    """
    now = time.monotonic() if now is None else now
    if len(payload) > limits.max_payload_bytes:
        raise ProtocolError("bad_request", f"payload is {len(payload)} bytes, the limit is "
                                           f"{limits.max_payload_bytes}")
    try:
        obj = decode_json_object(payload)
    except ValueError as exc:
        raise ProtocolError("bad_request", str(exc)) from None

    # null for an optional field is the field left out: encoders that write every field of a
    # class (C#'s and Java's by default, Go's without omitempty) send the other modes' fields
    # and the unset numbers as null. null for id or mode, or an unknown field, stays an error.
    obj = {k: v for k, v in obj.items() if v is not None or k not in _NULLABLE_FIELDS}
    request_id = _peek_id(obj)
    reply_to = _peek_reply_to(obj)

    def bad(message: str, code: str = "bad_request") -> ProtocolError:
        return ProtocolError(code, message, request_id=request_id, reply_to=reply_to)

    # id
    if "id" not in obj:
        raise bad("missing field: id")
    raw_id = obj["id"]
    if not isinstance(raw_id, str):
        raise bad(f"id must be a string, got {type(raw_id).__name__}")
    if not raw_id or len(raw_id) > MAX_ID_CHARS:
        raise bad(f"id must be 1-{MAX_ID_CHARS} characters, got {len(raw_id)}")
    if "reply_to" in obj and reply_to is None:
        raise bad("reply_to must be a topic without wildcards that does not start with $")
    if reply_to is not None and (too_long := reply_topic_too_long(reply_to)):
        raise bad(f"reply_to: {too_long}")

    unknown = sorted(k for k in obj if k not in REQUEST_FIELDS)
    if unknown:
        raise bad(f"unknown field(s): {_field_names(unknown)}")

    # mode
    if "mode" not in obj:
        raise bad("missing field: mode (one of complete, infill, chat)")
    mode = obj["mode"]
    if not isinstance(mode, str):
        raise bad(f"mode must be a string, got {type(mode).__name__}")
    if mode not in MODES:
        raise bad(f"unknown mode {mode[:40]!r}; supported: {', '.join(MODES)}", "unsupported_mode")
    for other_mode, fields in _MODE_FIELDS.items():
        if other_mode != mode:
            stray = sorted(fields & obj.keys())
            if stray:
                raise bad(f"field(s) {', '.join(stray)} belong to mode {other_mode}, not {mode}")

    def text_field(name: str, *, required: bool, default: str = "") -> str:
        if name not in obj:
            if required:
                raise bad(f"missing field: {name} (required in {mode} mode)")
            return default
        value = obj[name]
        if not isinstance(value, str):
            raise bad(f"{name} must be a string, got {type(value).__name__}")
        return value

    prompt = prefix = suffix = None
    suffix_first = False
    messages: tuple[Message, ...] = ()
    if mode == "complete":
        prompt = text_field("prompt", required=True)
        if not prompt:
            raise bad("prompt must not be empty")
    elif mode == "infill":
        prefix = text_field("prefix", required=True)
        suffix = text_field("suffix", required=False)
        suffix_first = obj.get("suffix_first", False)
        if not isinstance(suffix_first, bool):
            raise bad("suffix_first must be true or false")
    else:
        messages = _parse_messages(obj.get("messages"), bad)

    # numbers
    max_tokens = obj.get("max_tokens", min(DEFAULT_MAX_TOKENS, limits.max_tokens))
    if not is_int(max_tokens):
        raise bad("max_tokens must be an integer")
    if not 1 <= max_tokens <= limits.max_tokens:
        raise bad(f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}")

    fields = {"temperature": obj.get("temperature", DEFAULT_TEMPERATURE), "top_p": obj.get("top_p", DEFAULT_TOP_P),
              "top_k": obj.get("top_k", 0), "seed": obj.get("seed"),
              **{name: obj.get(name, default) for name, default in MORE_SAMPLING_DEFAULTS.items()}}
    try:  # the ranges are the sampler's own (sampling.validate_sampling)
        validate_sampling(SamplingParams(**fields))
    except BadRequest as exc:
        raise bad(str(exc)) from None
    if fields["seed"] is None:
        fields["seed"] = payload_seed(payload)
    sampling = SamplingParams(**{name: float(v) if name in _FLOAT_SAMPLING_FIELDS else v for name, v in fields.items()})

    stop = obj.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("stop must be a list of strings")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise bad(f"stop may hold at most {MAX_STOP_SEQUENCES} strings, got {len(stop)}")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stop):
        raise bad(f"each stop string must be 1-{MAX_STOP_CHARS} characters")

    stream = obj.get("stream", True)
    if not isinstance(stream, bool):
        raise bad("stream must be true or false")

    cache_prompt = obj.get("cache_prompt", True)
    if not isinstance(cache_prompt, bool):
        raise bad("cache_prompt must be true or false")

    count_tokens = obj.get("count_tokens", False)
    if not isinstance(count_tokens, bool):
        raise bad("count_tokens must be true or false")

    deadline_ms = obj.get("deadline_ms", limits.default_deadline_ms)
    if not is_number(deadline_ms) or deadline_ms <= 0:
        raise bad("deadline_ms must be a positive number of milliseconds")
    if deadline_ms > limits.max_deadline_ms:
        raise bad(f"deadline_ms must be at most {limits.max_deadline_ms}, got {deadline_ms}")

    request = GenerationRequest(
        mode=mode,  # type: ignore[arg-type]
        prompt=prompt,
        prefix=prefix,
        suffix=suffix,
        suffix_first=suffix_first,
        messages=messages,
        max_tokens=max_tokens,
        max_tokens_is_default="max_tokens" not in obj,
        sampling=sampling,
        stop=tuple(stop),
        id=raw_id,
        deadline=now + deadline_ms / 1000.0,
        cache_prompt=cache_prompt,
    )
    chars = prompt_chars(request)
    if chars > limits.max_prompt_chars:
        raise bad(f"prompt is {chars} characters, the limit is {limits.max_prompt_chars}")
    return WireRequest(id=raw_id, request=request, stream=stream, deadline_ms=int(deadline_ms),
                       reply_to=reply_to, count_tokens=count_tokens)


def _parse_messages(value: object, bad: Any) -> tuple[Message, ...]:
    if value is None:
        raise bad("missing field: messages (required in chat mode)")
    if not isinstance(value, list) or not value:
        raise bad("messages must be a non-empty list of {role, content} objects")
    if len(value) > MAX_MESSAGES:
        raise bad(f"messages may hold at most {MAX_MESSAGES} entries")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise bad(f"messages[{i}] must be an object with role and content")
        extra = sorted(set(item) - {"role", "content"})
        if extra:
            raise bad(f"messages[{i}] has unknown field(s): {_field_names(extra)}")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string")
        out.append(Message(role=role, content=content))
    return tuple(out)


def parse_cancel(payload: bytes) -> str:
    """The request id of a cancel payload ``{"id": ...}``. Raises ProtocolError (bad_request)."""
    try:
        obj = decode_json_object(payload)
    except ValueError as exc:
        raise ProtocolError("bad_request", str(exc)) from None
    request_id = _peek_id(obj)
    if request_id is None:
        raise ProtocolError("bad_request", f"cancel needs an id of 1-{MAX_ID_CHARS} characters")
    return request_id


# --------------------------------------------------------------------------- replies


def _dumps(obj: Mapping[str, Any]) -> bytes:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # a lone surrogate (an id or field name sent as "\ud800"): escape it as JSON
        # does, so the reply is valid UTF-8 and carries the id exactly as it was sent
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode("ascii")


def finite_or_none(value: float, digits: int = 3) -> float | None:
    """A measured number for JSON: rounded, or None (null) when it could not be measured (NaN)."""
    return round(float(value), digits) if math.isfinite(value) else None


def encode_chunk(request_id: str, seq: int, delta: str, run: str | None = None) -> bytes:
    """``{"id", "seq", "delta", "done": false}`` (and ``"run"`` when given: which generation of
    the request the chunk is from); seq counts from 0."""
    chunk: dict[str, Any] = {"id": request_id, "seq": seq, "delta": delta, "done": False}
    if run is not None:
        chunk["run"] = run
    return _dumps(chunk)


def usage_and_timings(result: GenerationResult) -> dict[str, Any]:
    """``{"usage": {...}, "timings": {...}}`` of a result, as the final reply and
    ``generate --json`` give them (NaN timings as null)."""
    return {"usage": {"prompt_tokens": result.usage.prompt_tokens,
                      "completion_tokens": result.usage.completion_tokens,
                      "cached_prompt_tokens": result.usage.cached_prompt_tokens,
                      "draft_tokens": result.usage.draft_tokens,
                      "accepted_draft_tokens": result.usage.accepted_draft_tokens},
            "timings": {"ttft_ms": finite_or_none(result.timings.ttft_ms),
                        "decode_tokens_per_s": finite_or_none(result.timings.decode_tokens_per_s),
                        "total_ms": finite_or_none(result.timings.total_ms)}}


def final_dict(request_id: str, result: GenerationResult) -> dict[str, Any]:
    """The final reply of a finished generation as a dict."""
    reply: dict[str, Any] = {"id": request_id, "done": True, "text": result.text,
                             "finish_reason": result.finish_reason, **usage_and_timings(result)}
    if result.warnings:
        reply["warnings"] = list(result.warnings)
    return reply


def encode_final(request_id: str, result: GenerationResult) -> bytes:
    """``{"id", "done": true, "text", "finish_reason", "usage", "timings"[, "warnings"]}``."""
    return _dumps(final_dict(request_id, result))


def encode_count(request_id: str, count: Any) -> bytes:
    """The reply to a `"count_tokens": true` request: ``{"id", "done": true, "count": {"prompt_tokens",
    "max_tokens", "context_limit", "fits"}}`` (`count`: an engine's `TokenCount`)."""
    return _dumps({"id": request_id, "done": True, "count": {
        "prompt_tokens": count.prompt_tokens, "max_tokens": count.max_tokens, "context_limit": count.context_limit,
        "fits": bool(count.fits)}})


def encode_error(request_id: str | None, code: str, message: str, *, retry_after_s: float | None = None,
                 fields: Mapping[str, int] | None = None) -> bytes:
    """``{"id", "done": true, "error": {"code", "message"}}`` (id null when unknown), with
    ``retry_after_s`` in the error when the daemon knows when to retry (rate_limited), and
    `fields` (`error_fields`: context_length_exceeded's `prompt_tokens`, `max_tokens` and
    `context_limit`) beside code and message."""
    if code not in ERROR_CODES:
        code = "internal"
    error: dict[str, Any] = {"code": code, "message": message}
    if retry_after_s is not None:
        error["retry_after_s"] = retry_after_s
    for key, value in (fields or {}).items():
        error.setdefault(key, value)
    return _dumps({"id": request_id, "done": True, "error": error})


def error_fields(exc: BaseException) -> dict[str, int]:
    """An error's machine-readable numbers for its error object (ContextLengthExceeded's); {} for others."""
    wire_fields = getattr(exc, "wire_fields", None)
    return dict(wire_fields()) if callable(wire_fields) else {}


def encode_cancel(request_id: str) -> bytes:
    return _dumps({"id": request_id})


def encode_status(state: str, *, device_id: str, model_info: object | None, queue_depth: int,
                  queue_limit: int, version: str, **extra: Any) -> bytes:
    """The retained status message. `model_info` is the engine's `ModelInfo` (any
    object with its attributes); missing attributes become null."""
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}")

    def info(name: str) -> Any:
        return getattr(model_info, name, None) if model_info is not None else None

    status: dict[str, Any] = {
        "state": state,
        "device_id": device_id,
        "protocol": PROTOCOL_VERSION,
        "version": version,
        "model": info("model_name"),
        "profile": info("profile"),
        "precision": info("precision"),
        "bundle_sha256": info("bundle_sha256"),
        "context_limit": info("context_limit"),
        "supports_infill": info("supports_infill"),
        "chat_format": info("chat_format"),
        "family": info("family"),  # size class, variant, attention, infill, memory plan (engine.ModelInfo)
        "fidelity": info("fidelity"),  # measured at export? passed? (fidelity_record.FidelityRecord.as_status)
        "provider": info("provider"),
        "queue_depth": queue_depth,
        "queue_limit": queue_limit,
        "ts": round(time.time(), 3),
    }
    status.update(extra)
    return _dumps(status)


def build_request(*, request_id: str, mode: str, prompt: str | None = None,
                  prefix: str | None = None, suffix: str | None = None,
                  suffix_first: bool | None = None, messages: Any = None,
                  max_tokens: int | None = None, temperature: float | None = None,
                  top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                  stop: Any = None, stream: bool = True, deadline_ms: int | None = None,
                  reply_to: str | None = None, cache_prompt: bool | None = None,
                  count_tokens: bool | None = None, repeat_penalty: float | None = None,
                  presence_penalty: float | None = None, frequency_penalty: float | None = None,
                  repeat_last_n: int | None = None, min_p: float | None = None) -> dict[str, Any]:
    """A request dict for clients; fields left None are omitted (the daemon's defaults apply).
    `messages` may hold `Message` objects or ``{role, content}`` dicts. Raises `BadRequest` for
    what cannot be sent as the protocol's JSON (the daemon checks the rest)."""
    obj: dict[str, Any] = {"id": request_id, "mode": mode}
    if messages is not None:
        if isinstance(messages, (str, bytes, Mapping)):
            raise BadRequest(f"messages must be a list of {{role, content}} dicts or Message objects, "
                             f"got {type(messages).__name__}")
        converted = []
        for i, m in enumerate(messages):
            if not isinstance(m, (Message, Mapping)):
                raise BadRequest(f"messages[{i}] must be a {{role, content}} dict or a Message, got {type(m).__name__}")
            converted.append({"role": m.role, "content": m.content} if isinstance(m, Message) else dict(m))
        messages = converted
    if isinstance(stop, str):
        stop = [stop]
    elif stop is not None:
        if not isinstance(stop, (list, tuple)):
            raise BadRequest(f"stop must be a string or a list of strings, got {type(stop).__name__}")
        stop = list(stop)
    for name, number in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p),
                         ("deadline_ms", deadline_ms), ("repeat_penalty", repeat_penalty),
                         ("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if isinstance(number, float) and not math.isfinite(number):
            raise BadRequest(f"{name} must be a finite number, got {number}")
    for key, value in (("prompt", prompt), ("prefix", prefix), ("suffix", suffix),
                       ("suffix_first", suffix_first), ("messages", messages),
                       ("max_tokens", max_tokens), ("temperature", temperature),
                       ("top_p", top_p), ("top_k", top_k), ("seed", seed), ("stop", stop),
                       ("deadline_ms", deadline_ms), ("reply_to", reply_to), ("cache_prompt", cache_prompt),
                       ("count_tokens", count_tokens),
                       ("repeat_penalty", repeat_penalty), ("presence_penalty", presence_penalty),
                       ("frequency_penalty", frequency_penalty), ("repeat_last_n", repeat_last_n),
                       ("min_p", min_p)):
        if value is not None:
            obj[key] = value
    obj["stream"] = stream
    return obj


def encode_request(obj: Mapping[str, Any]) -> bytes:
    """The JSON of a request; `BadRequest` for a value JSON cannot hold (bytes, a set, ...)."""
    try:
        return _dumps(obj)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"the request cannot be sent as JSON: {exc}") from None
