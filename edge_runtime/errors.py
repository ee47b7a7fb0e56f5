"""Typed errors. Each carries the wire error code the MQTT protocol uses, so the
service maps exceptions to replies without inventing messages."""

from __future__ import annotations


class EdgeRuntimeError(Exception):
    """Base class. `code` is the protocol's error code."""

    code = "internal"


class BadRequest(EdgeRuntimeError):
    code = "bad_request"


class UnsupportedMode(EdgeRuntimeError):
    code = "unsupported_mode"


class ContextLengthExceeded(EdgeRuntimeError):
    """The prompt and `max_tokens` do not fit the context. The numbers a client needs to trim
    its prompt (a chat's oldest turns) and send it again, each None where not known:
    `prompt_tokens` (the prompt's tokens, control tokens included; None for a text refused by
    its length alone, before it was counted), `max_tokens` (the request's, where it gave one)
    and `context_limit` (the engine's). The protocol's error object carries those known."""

    code = "context_length_exceeded"

    def __init__(self, message: str, *, prompt_tokens: int | None = None, max_tokens: int | None = None,
                 context_limit: int | None = None) -> None:
        super().__init__(message)
        self.prompt_tokens, self.max_tokens, self.context_limit = prompt_tokens, max_tokens, context_limit

    def __reduce__(self) -> tuple:  # copy and pickle keep the numbers
        return (_context_length_exceeded, (type(self), str(self), self.wire_fields()))

    def wire_fields(self) -> dict[str, int]:
        """The error object's extra fields: those of the three numbers that are known."""
        fields = {"prompt_tokens": self.prompt_tokens, "max_tokens": self.max_tokens,
                  "context_limit": self.context_limit}
        return {k: v for k, v in fields.items() if v is not None}


def _context_length_exceeded(cls: type, message: str, fields: dict[str, int]) -> ContextLengthExceeded:
    return cls(message, **fields)


class UnsafePrompt(EdgeRuntimeError):
    code = "unsafe_prompt"


class PolicyViolation(EdgeRuntimeError):
    """The operator's policy refuses the request; the message names the rule."""

    code = "policy_violation"


class RateLimited(EdgeRuntimeError):
    """The client exceeded a per-client limit of the operator's policy; `retry_after_s`:
    when a request would be admitted again (None when not known)."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Busy(EdgeRuntimeError):
    code = "busy"


class DeadlineExceeded(EdgeRuntimeError):
    code = "deadline_exceeded"


class Cancelled(EdgeRuntimeError):
    code = "cancelled"


# The errors a request can end with: the error codes of the protocol's replies (with "internal")
REQUEST_ERRORS: tuple[type[EdgeRuntimeError], ...] = (
    BadRequest, UnsupportedMode, ContextLengthExceeded, UnsafePrompt, PolicyViolation, RateLimited, Busy,
    DeadlineExceeded, Cancelled)


class ConfigError(EdgeRuntimeError):
    """A configuration or profile file is invalid; the message names file and key
    (also in ``key`` and ``problem`` when one key is at fault)."""

    code = "config_error"

    def __init__(self, message: str, *, key: str | None = None, problem: str | None = None) -> None:
        super().__init__(message)
        self.key, self.problem = key, problem


class BundleError(EdgeRuntimeError):
    """A bundle is missing, malformed, or fails verification; the message names the file."""

    code = "bundle_error"


class RuntimeMissing(EdgeRuntimeError):
    """Neither onnxruntime nor onnxruntime-gpu is installed."""

    code = "internal"
