"""The scheduler on its own (no broker): ordering of record/release/deliver,
queue bounds, cancel, deadlines, drain and abandon."""

from __future__ import annotations

import threading
import time

from fake_engine import FakeEngine
from service_harness import wait_until

from edge_runtime.errors import Cancelled, DeadlineExceeded
from edge_runtime.protocol import RequestLimits, encode_request, parse_request
from edge_runtime.scheduler import Job, Scheduler, Submit
from edge_runtime.types import GenerationResult


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.scheduler: Scheduler | None = None
        self.done = threading.Event()

    def job_started(self, job):
        self.events.append(("started", job.id))

    def job_chunk(self, job, seq, chunk):
        self.events.append(("chunk", job.id, seq, chunk.text))

    def record(self, job, outcome):
        # still pending while its reply is recorded: a redelivery attaches to it
        assert self.scheduler is not None and self.scheduler.attach(job.key, None) is job
        kind = outcome.finish_reason if isinstance(outcome, GenerationResult) else outcome.code
        self.events.append(("record", job.id, kind))
        return kind.encode()

    def deliver(self, job, payload, deliveries):
        assert self.scheduler is not None and self.scheduler.attach(job.key, None) is None  # released
        self.events.append(("deliver", job.id, payload.decode(), tuple(deliveries)))
        self.done.set()


def job(rid: str, prompt: str = "a b c", deadline_ms: int = 10_000) -> Job:
    wire = parse_request(encode_request({"id": rid, "mode": "complete", "prompt": prompt,
                                         "deadline_ms": deadline_ms, "max_tokens": 64}), RequestLimits())
    return Job(wire=wire, key=f"t\n{rid}", route=None, deliveries=[f"d-{rid}"])


def make(depth: int = 2, delay: float = 0.0) -> tuple[Scheduler, Sink]:
    sink = Sink()
    scheduler = Scheduler(FakeEngine(token_delay_s=delay), sink, depth=depth)
    sink.scheduler = scheduler
    scheduler.start()
    return scheduler, sink


def test_order_of_events_and_duplicate_deliveries():
    scheduler, sink = make(delay=0.05)
    j = job("r1")
    assert scheduler.submit(j) is Submit.ACCEPTED
    assert scheduler.attach(j.key, "d-again") is j and scheduler.attach("t\nother", "x") is None
    wait_until(sink.done.is_set, 2)
    assert sink.events == [("started", "r1"), ("chunk", "r1", 0, "c"), ("chunk", "r1", 1, " b"),
                           ("chunk", "r1", 2, " a"), ("record", "r1", "stop"),
                           ("deliver", "r1", "stop", ("d-r1", "d-again"))]
    scheduler.stop_accepting()
    assert scheduler.wait_stopped(2)
    assert scheduler.submit(job("late")) is Submit.CLOSED


def test_bounded_queue_cancel_and_expiry():
    scheduler, sink = make(depth=2, delay=0.05)
    assert scheduler.submit(job("run", " ".join(["w"] * 20))) is Submit.ACCEPTED
    wait_until(lambda: scheduler.running is not None, 2)
    assert scheduler.submit(job("q1")) is Submit.ACCEPTED
    assert scheduler.submit(job("q2", deadline_ms=1)) is Submit.ACCEPTED
    assert scheduler.submit(job("q3")) is Submit.FULL and scheduler.queue_depth == 2
    assert scheduler.cancel("q1") == 1
    time.sleep(0.01)
    assert scheduler.expire_queued() == 1 and scheduler.queue_depth == 0
    assert ("record", "q1", Cancelled.code) in sink.events
    assert ("record", "q2", DeadlineExceeded.code) in sink.events
    assert scheduler.cancel("run") == 1
    wait_until(lambda: ("record", "run", "cancelled") in sink.events, 2)
    assert scheduler.cancel("nobody") == 0


def test_abandon_drops_the_running_and_queued_jobs():
    scheduler, sink = make(depth=4, delay=0.05)
    scheduler.submit(job("run", " ".join(["w"] * 20)))
    wait_until(lambda: scheduler.running is not None, 2)
    scheduler.submit(job("queued"))
    abandoned = scheduler.abandon_all()
    assert sorted(j.id for j in abandoned) == ["queued", "run"] and all(j.abandoned for j in abandoned)
    assert scheduler.wait_stopped(2)
    assert not any(e[0] in ("record", "deliver") for e in sink.events)
    assert scheduler.attach("t\nrun", "x") is None


def test_worker_heartbeat_and_stall():
    scheduler, _ = make(delay=0.3)
    scheduler.stall_after_s = 0.1
    assert not scheduler.stalled() and scheduler.worker_alive
    scheduler.submit(job("slow"))
    wait_until(lambda: scheduler.stalled(), 2)
    scheduler.stop_accepting()
    assert scheduler.wait_stopped(3) and not scheduler.worker_alive
