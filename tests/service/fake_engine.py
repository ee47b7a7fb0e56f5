"""A small deterministic test double of `edge_runtime.engine.Engine`.

It implements exactly the engine's interface (`info`, `generate(request, cancel)`)
and "generates" the words of the request's text in reverse order, one word per
token, sleeping `token_delay_s` before each token so tests can cancel, fill the
queue, run into deadlines and drain.

Trigger words in the text make it raise the engine's typed errors before the
first chunk: ``<UNSAFE>`` and real special tags (``<PRE>``, ``[INST]``, ...) ->
UnsafePrompt, ``<BADREQ>`` -> BadRequest, ``<BOOM>`` -> a plain RuntimeError (an
internal error); more words than `context_limit` -> ContextLengthExceeded; infill
when `supports_infill` is False -> UnsupportedMode.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import (
    BadRequest,
    ContextLengthExceeded,
    DeadlineExceeded,
    UnsafePrompt,
    UnsupportedMode,
)
from edge_runtime.types import Chunk, GenerationRequest, GenerationResult, Timings, TokenCount, Usage

SPECIAL_TAGS = ("<PRE>", "<SUF>", "<MID>", "<EOT>", "[INST]", "[/INST]", "<<SYS>>", "<s>", "</s>")


@dataclass(frozen=True)
class FakeModelInfo:
    model_name: str = "fake-codellama"
    profile: str = "test-profile"
    precision: str = "fp32"
    bundle_sha256: str = "0" * 64
    context_limit: int = 4096
    supports_infill: bool = True
    chat_format: str = "llama2"
    provider: str = "CPUExecutionProvider"


def source_text(request: GenerationRequest) -> str:
    if request.mode == "complete":
        return request.prompt or ""
    if request.mode == "infill":
        return f"{request.prefix or ''} {request.suffix or ''}".strip()
    return request.messages[-1].content if request.messages else ""


def expected_text(text: str, max_tokens: int = 10**9) -> str:
    """What the fake generates for `text` (without stop strings)."""
    return " ".join(list(reversed(text.split()))[:max_tokens])


class FakeEngine:
    def __init__(self, *, token_delay_s: float = 0.0, context_limit: int = 4096,
                 supports_infill: bool = True, calls_file: Path | str | None = None) -> None:
        self.info = FakeModelInfo(context_limit=context_limit, supports_infill=supports_infill)
        self.token_delay_s = token_delay_s
        self.calls: list[GenerationRequest] = []
        self.calls_file = Path(calls_file) if calls_file else None
        self._lock = threading.Lock()

    def count_tokens(self, request: GenerationRequest) -> TokenCount:
        """The engine's `count_tokens`: one token a word of the text, the checks of `generate`."""
        words = len(source_text(request).split())
        if "<BADREQ>" in source_text(request):
            raise BadRequest("the engine does not like this request")
        left = self.info.context_limit - words
        max_tokens = max(0, min(request.max_tokens, left)) if request.max_tokens_is_default else request.max_tokens
        return TokenCount(prompt_tokens=words, max_tokens=max_tokens, context_limit=self.info.context_limit)

    def generate(self, request: GenerationRequest,
                 cancel: threading.Event | None = None) -> Iterator[Chunk | GenerationResult]:
        text = source_text(request)
        words = text.split()
        # Checks before the first chunk, like the real engine.
        if request.mode == "infill" and not self.info.supports_infill:
            raise UnsupportedMode("this model has no infilling tokens")
        if "<UNSAFE>" in text or any(tag in text for tag in SPECIAL_TAGS):
            raise UnsafePrompt("the prompt contains a special token")
        if "<BADREQ>" in text:
            raise BadRequest("the engine does not like this request")
        if "<BOOM>" in text:
            raise RuntimeError(f"engine exploded on {text!r}")
        if len(words) + request.max_tokens > self.info.context_limit:
            raise ContextLengthExceeded(
                f"{len(words)} prompt tokens + max_tokens {request.max_tokens} exceed "
                f"the context limit of {self.info.context_limit}")
        with self._lock:
            self.calls.append(request)
            if self.calls_file is not None:
                with open(self.calls_file, "a", encoding="utf-8") as f:
                    f.write(request.id + "\n")
        start = time.perf_counter()
        first = None
        out: list[str] = []
        ids: list[int] = []
        finish = "stop"
        for i, word in enumerate(reversed(words)):
            if len(ids) >= request.max_tokens:
                finish = "length"
                break
            if self.token_delay_s:
                time.sleep(self.token_delay_s)
            if first is None:
                first = time.perf_counter() - start
            piece = word if i == 0 else " " + word
            candidate = "".join(out) + piece
            stop_at = min((candidate.find(s) for s in request.stop if s in candidate), default=-1)
            ids.append(i + 1)
            if stop_at >= 0:
                piece = candidate[:stop_at][len("".join(out)):]
                if piece:
                    out.append(piece)
                    yield Chunk(piece, (i + 1,))
                finish = "stop"
                break
            out.append(piece)
            yield Chunk(piece, (i + 1,))
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            if request.deadline is not None and time.monotonic() > request.deadline:
                raise DeadlineExceeded(f"deadline passed after {len(ids)} tokens")
        total = time.perf_counter() - start
        first = first if first is not None else total
        yield GenerationResult(
            text="".join(out), token_ids=tuple(ids), prompt_token_ids=tuple(range(len(words))),
            finish_reason=finish,  # type: ignore[arg-type]
            usage=Usage(prompt_tokens=len(words), completion_tokens=len(ids)),
            timings=Timings(ttft_ms=first * 1000, decode_tokens_per_s=(len(ids) - 1) / (total - first)
                            if total > first and len(ids) > 1 else 0.0, total_ms=total * 1000),
            warnings=("fake warning",) if "<WARN>" in text else ())
