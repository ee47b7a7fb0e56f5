"""Typed requests and results of the generation engine (the public Python API).

The wire format (JSON over MQTT) lives in `protocol.py`; it converts to and from
these types. Nothing here knows about MQTT or onnxruntime.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["complete", "infill", "chat"]
FinishReason = Literal["stop", "length", "cancelled", "policy"]  # policy: an operator rule stopped it

MODES: tuple[str, ...] = ("complete", "infill", "chat")

# The reference implementation's sampling defaults (Meta's llama/generation.py).
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.9
DEFAULT_MAX_TOKENS = 256
DEFAULT_REPEAT_LAST_N = 64  # llama.cpp's and Ollama's window for the repetition penalties
MAX_PENALTY = 2.0  # presence_penalty and frequency_penalty lie in [-2, 2] (OpenAI's range)
# Whose previous request's keys and values a request may reuse (the engine's prompt cache,
# config `[model] prompt_cache`): "client" the same client id's, "shared" any request's, "off" none.
PROMPT_CACHE_SCOPES = ("client", "shared", "off")
MAX_SEED = 2**63 - 1  # a sampling seed fits a signed 64-bit integer (the wire's limit too)


def is_int(x: object) -> bool:
    """An integer in the protocol's sense: a JSON or numpy integer, not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_number(x: object) -> bool:
    """A finite real number, not a bool (an integer beyond any float, as JSON may spell one, is not)."""
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = DEFAULT_TEMPERATURE  # 0 means greedy
    top_p: float = DEFAULT_TOP_P  # nucleus; 1.0 disables
    top_k: int = 0  # 0 disables
    # tokens less likely than min_p times the most likely one dropped, after temperature, top-k and
    # top-p (transformers' MinPLogitsWarper; llama.cpp's and Ollama's min_p): 0 disables
    min_p: float = 0.0
    seed: int | None = None  # None: a fresh random seed per request
    # Penalties on the tokens of the last `repeat_last_n` of prompt and output (llama.cpp's and
    # Ollama's names and rules): a repeated token's logit divided by `repeat_penalty` (multiplied
    # when negative), less `frequency_penalty` per occurrence and `presence_penalty` once.
    repeat_penalty: float = 1.0  # 1.0 disables
    presence_penalty: float = 0.0  # 0 disables
    frequency_penalty: float = 0.0  # 0 disables
    repeat_last_n: int = DEFAULT_REPEAT_LAST_N  # 0: no penalty; -1: the whole context

    @property
    def penalizes(self) -> bool:
        """Whether any penalty changes the logits."""
        return self.repeat_last_n != 0 and (self.repeat_penalty != 1.0 or self.presence_penalty != 0.0
                                            or self.frequency_penalty != 0.0)


@dataclass(frozen=True)
class GenerationRequest:
    mode: Mode
    prompt: str | None = None  # complete
    prefix: str | None = None  # infill
    suffix: str | None = None  # infill
    suffix_first: bool = False  # infill: suffix-prefix-middle order
    messages: tuple[Message, ...] = ()  # chat
    max_tokens: int = None  # type: ignore[assignment]  # None: DEFAULT_MAX_TOKENS, lowered to what the context leaves
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    id: str = ""
    deadline: float | None = None  # time.monotonic() value after which generation stops
    # who asked (the MQTT client id of the reply topic): the operator policy's per-client limits, and the
    # engine's prompt cache in its "client" scope (a request reuses only its own client's previous prompt)
    client_id: str = ""
    # False: this request neither reuses the previous one's keys and values nor leaves its own for
    # the next (the daemon sets it for requests whose reply topic names no client)
    cache_prompt: bool = True
    # True: max_tokens is a default the client did not ask for, lowered by the engine to what the
    # context leaves after the prompt rather than refused
    max_tokens_is_default: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens is None:  # not given: the default, which the engine may lower (as the protocol's)
            object.__setattr__(self, "max_tokens", DEFAULT_MAX_TOKENS)
            object.__setattr__(self, "max_tokens_is_default", True)
        # chat messages may come in the wire's form, {"role", "content"} dicts
        if any(isinstance(m, dict) for m in self.messages):
            object.__setattr__(self, "messages", tuple(
                Message(m["role"], m["content"]) if isinstance(m, dict) and set(m) == {"role", "content"} else m
                for m in self.messages))


@dataclass(frozen=True)
class Chunk:
    """A piece of streamed output. Concatenating every chunk's `text` gives the result's text."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    # of the prompt tokens, those whose keys and values the previous request had computed
    # (the engine's prompt cache: only the rest were run)
    cached_prompt_tokens: int = 0
    # prompt lookup (prompt_lookup.py): ids drafted from the context, and of the completion
    # tokens, those that were drafts the sampler kept (each saved a decode step)
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0


@dataclass(frozen=True)
class Timings:
    ttft_ms: float  # time to first token (prefill + first sample)
    decode_tokens_per_s: float  # tokens after the first / time spent on them; NaN with < 2 tokens (null in JSON)
    total_ms: float


@dataclass(frozen=True)
class TokenCount:
    """What a request's prompt takes of the context, without generating (`Engine.count_tokens`,
    the protocol's `"count_tokens": true`): a chat client sizes its history with it."""

    prompt_tokens: int  # as the result's usage.prompt_tokens would count them (<s> and control tokens included)
    max_tokens: int  # what a generation would run with: the request's, or the default lowered to what is left
    context_limit: int

    @property
    def fits(self) -> bool:
        """Whether the request would be generated rather than refused with context_length_exceeded."""
        return self.max_tokens >= 1 and self.prompt_tokens + self.max_tokens <= self.context_limit


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: tuple[int, ...]  # generated ids (without a matched stop token)
    prompt_token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    warnings: tuple[str, ...] = ()
