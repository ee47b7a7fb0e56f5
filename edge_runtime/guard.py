"""Enforces the operator's policy around the engine, at two points of a request's path:

* `PolicyGuard.admit` (network thread, before the queue): per-client requests per
  minute and max tokens, then the input rules. Cheap and immediate: a refused
  request never waits in the queue.
* `GuardedEngine.generate` (worker thread): the external classifier (which may be
  slow), then the engine with the output rules watching the stream. The stream
  holds back the last characters a `stop` rule's match could begin in; when one
  completes, generation ends and nothing from the chunk the match begins in on is
  sent: the final reply's text is what was streamed, with finish reason ``policy``.

Every refusal, stop and flag is written to the audit log.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .audit import AUDIT_FILE, AuditLog
from .classifier import Classifier, make_classifier
from .client_limits import RequestRateLimiter
from .errors import PolicyViolation, RateLimited
from .policy import OutputWatch, Policy, Violation, request_text
from .types import Chunk, GenerationRequest, GenerationResult

log = logging.getLogger(__name__)


class PolicyGuard:
    def __init__(self, policy: Policy, audit: AuditLog, classifier: Classifier | None = None,
                 limiter: RequestRateLimiter | None = None) -> None:
        self.policy = policy
        self.audit = audit
        self.classifier = classifier
        self.limiter = limiter or RequestRateLimiter()

    @classmethod
    def create(cls, policy: Policy, state_dir: Path) -> "PolicyGuard":
        audit = AuditLog(Path(state_dir) / AUDIT_FILE, record_text=policy.audit.record_text,
                         max_bytes=policy.audit.max_bytes)
        return cls(policy, audit, make_classifier(policy.classifier))

    # ------------------------------------------------------------------ admission (network thread)

    def _record(self, request: GenerationRequest, v: Violation, text: str, detail: str = "") -> None:
        self.audit.record(request_id=request.id, client_id=request.client_id, mode=request.mode, rule=v.rule,
                          action=v.action, where=v.where, text=text, detail=detail)

    def default_max_tokens(self, request: GenerationRequest) -> GenerationRequest:
        """A request that left max_tokens to the daemon's default, with the default
        lowered to its client's policy limit when that is smaller: a default the
        client never asked for is not a reason to refuse it."""
        limit = self.policy.limit_for(request.client_id).max_tokens
        if limit and request.max_tokens > limit:
            return dataclasses.replace(request, max_tokens=limit)
        return request

    def admit(self, request: GenerationRequest) -> None:
        """Raise PolicyViolation (input rules, then max_tokens) / RateLimited, or return
        (flags recorded). A request that is admitted counts against its client's rate;
        `refund` takes it back."""
        client = request.client_id
        limit = self.policy.limit_for(client)
        text = request_text(request)
        for v in self.policy.check_input(request, client):  # first: the audit log names the rule the text broke
            self._record(request, v, text)
            if v.action == "refuse":
                raise PolicyViolation(f"refused by policy rule {v.rule!r}"
                                      + (f": {v.description}" if v.description else ""))
        if limit.max_tokens and request.max_tokens > limit.max_tokens:
            self._record(request, Violation("limits.max_tokens", "refuse", "limit"), text,
                         f"max_tokens {request.max_tokens} > {limit.max_tokens}")
            raise PolicyViolation(f"policy limit limits.max_tokens: client {client or '-'!s} may ask for at most "
                                  f"{limit.max_tokens} tokens (asked {request.max_tokens})")
        if not self.limiter.admit(client, limit.requests_per_minute):
            wait = self.limiter.retry_after_s(client)
            if self.limiter.refusals_in_a_row(client) == 1:  # a spell over the rate: its first refusal, not
                # each one (each is an fsync on the network thread, and a flood would rotate the log away)
                self._record(request, Violation("limits.requests_per_minute", "refuse", "limit"), text,
                             f"{limit.requests_per_minute}/min (recorded once until the client is admitted again)")
            raise RateLimited(f"policy limit limits.requests_per_minute: client {client or '-'} may send "
                              f"{limit.requests_per_minute} requests per minute; retry in {wait:.0f} s",
                              retry_after_s=round(wait, 3))

    def refund(self, request: GenerationRequest) -> None:
        self.limiter.refund(request.client_id)

    def wrap(self, engine: Any) -> "GuardedEngine":
        return GuardedEngine(engine, self)


class _StopFlag:
    """Looks like the threading.Event the engine polls: set by the request's own
    cancel or by a `stop` rule (which the guard tells apart)."""

    def __init__(self, cancel: threading.Event | None) -> None:
        self._cancel = cancel
        self._stopped = False

    def set(self) -> None:
        self._stopped = True

    def is_set(self) -> bool:
        return self._stopped or (self._cancel is not None and self._cancel.is_set())


class GuardedEngine:
    """The engine, with the policy's worker-side checks around each request."""

    def __init__(self, engine: Any, guard: PolicyGuard) -> None:
        self.engine = engine
        self.guard = guard

    @property
    def info(self) -> Any:
        return self.engine.info

    def generate(self, request: GenerationRequest,
                 cancel: threading.Event | None = None) -> Iterator[Chunk | GenerationResult]:
        guard, policy = self.guard, self.guard.policy
        client = request.client_id
        if guard.classifier is not None and policy.classifier_applies(request.mode, client):
            self._classify(request)
        rules = policy.rules_for("output", request.mode, client)
        if not rules:
            yield from self.engine.generate(request, cancel)
            return
        watch = OutputWatch(rules, policy.output_window_chars)
        flag = _StopFlag(cancel)
        held: deque[tuple[Chunk, int]] = deque()  # chunks not sent yet, with where each ends in `watch`
        sent: list[str] = []
        sent_ids = 0
        stopped_by: Violation | None = None

        def release(upto: int) -> Iterator[Chunk]:
            nonlocal sent_ids
            while held and held[0][1] <= upto:
                chunk, _ = held.popleft()
                sent.append(chunk.text)
                sent_ids += len(chunk.token_ids)
                yield chunk

        stream = self.engine.generate(request, flag)
        try:
            for item in stream:
                if isinstance(item, Chunk):
                    if stopped_by is not None:
                        continue  # the engine's last words after the stop: never sent
                    hits = watch.feed(item.text)
                    held.append((item, watch.length))
                    for v in hits:
                        guard._record(request, v, watch.text)
                    stops = [v for v in hits if v.action == "stop"]
                    if stops:
                        stopped_by = min(stops, key=lambda v: v.at)  # an output violation says where it begins
                        flag.set()
                        # what ends before the match begins is sent; the chunk it begins in is not
                        yield from release(stopped_by.at)
                        held.clear()
                        continue
                    yield from release(watch.length - watch.open_tail())
                elif isinstance(item, GenerationResult) and stopped_by is not None:
                    yield dataclasses.replace(
                        item, text="".join(sent), token_ids=item.token_ids[:sent_ids], finish_reason="policy",
                        warnings=tuple(item.warnings) + (f"stopped by policy rule {stopped_by.rule!r}",))
                else:
                    if isinstance(item, GenerationResult):
                        yield from release(watch.length)  # no match came: what was held goes out
                    yield item
        finally:
            stream.close()

    def _classify(self, request: GenerationRequest) -> None:
        guard = self.guard
        assert guard.classifier is not None and guard.policy.classifier is not None
        text = request_text(request)
        verdict = guard.classifier.classify(text)
        if not verdict.blocked and not verdict.failed:
            return
        action = guard.policy.classifier.action if verdict.blocked else "flag"
        detail = f"label {verdict.label}" + (" (classifier failed)" if verdict.failed else "")
        guard._record(request, Violation("classifier", action, "classifier"), text, detail)
        if verdict.blocked and action == "refuse":
            reason = ("the classifier failed and the policy fails closed" if verdict.failed
                      else f"the classifier labelled it {verdict.label!r}")
            raise PolicyViolation(f"refused by policy rule 'classifier': {reason}")
