"""Bounded request queue, the single engine worker thread, and the cancel registry.

The scheduler knows nothing about MQTT. The service hands it `Job`s from the
network thread (`submit` never blocks: a full queue is reported at once) and a
`JobSink` that publishes what the worker produces. Every job that is not
abandoned ends in exactly one `JobSink.record` + `JobSink.deliver` pair:

* `record(job, outcome)` encodes and stores the final reply (before anything is
  acknowledged) and returns the payload;
* the job then leaves the pending registry, so a redelivery of the same request
  from then on finds the stored reply;
* `deliver(job, payload, deliveries)` publishes the final reply and acknowledges
  every delivery of the request.

A job is *abandoned* (no reply, no acknowledgement: the broker redelivers it)
when the daemon drains or stops before the job finished.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Protocol

from .errors import Cancelled, DeadlineExceeded, EdgeRuntimeError
from .protocol import WireRequest
from .types import Chunk, GenerationResult

log = logging.getLogger(__name__)

Outcome = GenerationResult | EdgeRuntimeError


class EngineLike(Protocol):
    """What the scheduler needs of `edge_runtime.engine.Engine`."""

    info: Any

    def generate(self, request: Any, cancel: threading.Event | None = None) -> Any: ...


@dataclass(eq=False)
class Job:
    """One accepted request. `route` and `deliveries` are opaque to the scheduler
    (the service's reply route and broker deliveries to acknowledge)."""

    wire: WireRequest
    key: str
    route: Any
    deliveries: list[Any] = field(default_factory=list)
    body: bytes = b""  # the request as it came (a copy sent again with another body is told apart)
    # this generation of the request, in its chunks: after a daemon restart the request is generated
    # again from seq 0 under another run, and a client does not mix the two
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    cancel: threading.Event = field(default_factory=threading.Event)
    received: float = field(default_factory=time.monotonic)
    started: float | None = None
    abandoned: bool = False

    @property
    def id(self) -> str:
        return self.wire.id


class JobSink(Protocol):
    """Receives what the worker produces (implemented by the service)."""

    def job_started(self, job: Job) -> None: ...

    def job_chunk(self, job: Job, seq: int, chunk: Chunk) -> None: ...

    def record(self, job: Job, outcome: Outcome) -> bytes: ...

    def deliver(self, job: Job, payload: bytes, deliveries: list[Any]) -> None: ...


class Submit(Enum):
    ACCEPTED = "accepted"
    FULL = "full"
    CLOSED = "closed"


class Scheduler:
    """A bounded FIFO of jobs served by one worker thread."""

    def __init__(self, engine: EngineLike, sink: JobSink, *, depth: int,
                 on_change: Callable[[], None] | None = None, stall_after_s: float = 300.0,
                 log_content: bool = False, idle_tick_s: float = 1.0) -> None:
        if depth < 1:
            raise ValueError("queue depth must be >= 1")
        self.engine = engine
        self.sink = sink
        self.depth = depth
        self.stall_after_s = stall_after_s
        self.log_content = log_content
        self._on_change = on_change or (lambda: None)
        self._idle_tick_s = idle_tick_s
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._pending: dict[str, Job] = {}  # key -> queued or running job
        self._running: Job | None = None
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._last_progress = time.monotonic()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is not None:
            return
        thread = threading.Thread(target=self._run, name="edge-worker", daemon=True)
        thread.start()
        self._thread = thread  # after start: worker_started never sees a thread that is not yet alive

    def stop_accepting(self) -> None:
        """Refuse new jobs and stop the worker after the running one; queued jobs stay
        unanswered (and unacknowledged)."""
        with self._cond:
            self._accepting = False
            self._stop = True
            self._cond.notify_all()

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Wait for the worker to exit (after `stop_accepting`). True when it did."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def abandon_all(self) -> list[Job]:
        """Stop at once: mark the running job and every queued job abandoned (the
        running one is cancelled so the engine returns soon; its result is dropped)."""
        with self._cond:
            self._accepting = False
            self._stop = True
            jobs = list(self._queue)
            self._queue.clear()
            if self._running is not None:
                jobs.append(self._running)
            for job in jobs:
                job.abandoned = True
                job.cancel.set()
                self._pending.pop(job.key, None)
            self._cond.notify_all()
        if jobs:
            self._on_change()
        return jobs

    # ------------------------------------------------------------------ requests

    def attach(self, key: str, delivery: Any) -> Job | None:
        """If a job with `key` is queued or running, add `delivery` to the ones it
        acknowledges when it finishes and return it (a duplicate delivery, e.g. a
        redelivery after a reconnect); else None."""
        with self._cond:
            job = self._pending.get(key)
            if job is None or job.abandoned:
                return None
            if delivery is not None and delivery not in job.deliveries:
                job.deliveries.append(delivery)
            return job

    def submit(self, job: Job) -> Submit:
        """Queue `job` without blocking."""
        with self._cond:
            if not self._accepting:
                return Submit.CLOSED
            if len(self._queue) >= self.depth:
                return Submit.FULL
            self._queue.append(job)
            self._pending[job.key] = job
            self._cond.notify_all()
        self._on_change()
        return Submit.ACCEPTED

    def cancel(self, request_id: str) -> int:
        """Cancel every queued or running job with this id. A running job stops
        between two tokens (its final reply has finish_reason "cancelled"); a queued
        one is answered with a `cancelled` error at once. Returns how many matched."""
        removed: list[Job] = []
        matched = 0
        with self._cond:
            for job in list(self._queue):
                if job.id == request_id:
                    self._queue.remove(job)
                    job.cancel.set()
                    removed.append(job)
            running = self._running
            if running is not None and running.id == request_id and not running.abandoned:
                running.cancel.set()
                matched += 1
        matched += len(removed)
        for job in removed:
            self._complete(job, Cancelled("cancelled before it started"))
        if removed:
            self._on_change()
        return matched

    def take_queued(self, predicate: Callable[[Job], bool]) -> list[Job]:
        """Remove the queued jobs `predicate` picks, unanswered, and return them (the caller
        answers them: at a drain, those the broker cannot deliver again)."""
        with self._cond:
            taken = [job for job in self._queue if predicate(job)]
            for job in taken:
                self._queue.remove(job)
                self._pending.pop(job.key, None)
        if taken:
            self._on_change()
        return taken

    def expire_queued(self, now: float | None = None) -> int:
        """Answer queued jobs whose deadline has passed with `deadline_exceeded`."""
        now = time.monotonic() if now is None else now
        expired: list[Job] = []
        with self._cond:
            for job in list(self._queue):
                deadline = job.wire.request.deadline
                if deadline is not None and now > deadline:
                    self._queue.remove(job)
                    expired.append(job)
        for job in expired:
            self._complete(job, DeadlineExceeded("deadline passed while queued"))
        if expired:
            self._on_change()
        return len(expired)

    # ------------------------------------------------------------------ state

    @property
    def queue_depth(self) -> int:
        """Jobs waiting (not counting the running one)."""
        with self._cond:
            return len(self._queue)

    @property
    def running(self) -> Job | None:
        with self._cond:
            return self._running

    @property
    def worker_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def worker_started(self) -> bool:
        return self._thread is not None

    @property
    def last_progress(self) -> float:
        """time.monotonic() of the worker's last sign of life (a token, a job start,
        or an idle tick)."""
        return self._last_progress

    def stalled(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return now - self._last_progress > self.stall_after_s

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._stop:
                        self._last_progress = time.monotonic()
                        self._cond.wait(self._idle_tick_s)
                    if self._stop:
                        return
                    job = self._queue.popleft()
                    self._running = job
                    self._last_progress = time.monotonic()
                self._on_change()
                try:
                    self._execute(job)
                except Exception:  # never let the worker die on one request
                    log.exception("request %s: failed to publish its reply", job.id)
                finally:
                    with self._cond:
                        self._running = None
                        self._last_progress = time.monotonic()
                        self._cond.notify_all()
                    self._on_change()
        finally:
            log.debug("worker exited")

    def _execute(self, job: Job) -> None:
        job.started = time.monotonic()
        request = job.wire.request
        if request.deadline is not None and job.started > request.deadline:
            self._complete(job, DeadlineExceeded("deadline passed while queued"))
            return
        self.sink.job_started(job)
        outcome: Outcome
        seq = 0
        result: GenerationResult | None = None
        stream = None
        try:
            stream = self.engine.generate(request, job.cancel)
            for item in stream:
                self._last_progress = time.monotonic()
                if isinstance(item, GenerationResult):
                    result = item
                    break
                if isinstance(item, Chunk):
                    if item.text and not job.abandoned:
                        self.sink.job_chunk(job, seq, item)
                        seq += 1
                else:
                    raise TypeError(f"engine yielded {type(item).__name__}")
            if result is None:
                raise RuntimeError("engine ended without a GenerationResult")
            outcome = result
        except EdgeRuntimeError as exc:
            outcome = exc
        except Exception as exc:
            if self.log_content:
                log.error("request %s: engine failed", job.id, exc_info=True)
            else:
                log.error("request %s: engine failed: %s (details withheld: log_content is off)",
                          job.id, type(exc).__name__)
            outcome = EdgeRuntimeError("internal error in the engine")
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        self._complete(job, outcome)

    def _complete(self, job: Job, outcome: Outcome) -> None:
        """Record, release and deliver one job's final reply (see module doc)."""
        if job.abandoned:
            with self._cond:
                if self._pending.get(job.key) is job:
                    del self._pending[job.key]
            return
        payload = self.sink.record(job, outcome)
        with self._cond:
            if self._pending.get(job.key) is job:
                del self._pending[job.key]
            deliveries = list(job.deliveries)
        self.sink.deliver(job, payload, deliveries)
