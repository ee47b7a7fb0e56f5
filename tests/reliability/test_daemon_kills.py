"""The real `edge-runtime serve` on the tiny bundle, SIGKILLed again and again at
random points while a client keeps sending; and SIGTERMed under load.

After every restart each request is answered: none lost, none answered twice
with different text (a request that was generating when the daemon died is
generated again with the same tokens -- greedily, or sampled with the seed its
bytes give it -- so its chunks and text are the same; one whose final reply was
stored but not yet acknowledged gets the stored reply again).
"""

from __future__ import annotations

import random
import re
import threading
import time
import uuid
from collections import Counter

import pytest
from reliability_kit import Ledger, ServeProcess, StatusWatch, record_figures, size, wait_online, write_serve_config

DEVICE = "kill-dev"
GENERATE = f"edge/{DEVICE}/v1/generate"
WORDS = ["def", "parse", "(x):", "return", "self", "import", "os", "for", "in", "class", "yield"]


@pytest.fixture
def serve_env(tiny_bundle, broker, tmp_path):
    config = write_serve_config(tmp_path / "serve.toml", broker_url=broker.url, device_id=DEVICE, bundle=tiny_bundle,
                                state_dir=tmp_path / "state", queue_depth=256, max_tokens=2048)
    watch = StatusWatch(broker.host, broker.port, DEVICE)
    procs: list[ServeProcess] = []

    def start() -> ServeProcess:
        t = time.monotonic()
        proc = ServeProcess(config, tmp_path / "daemon.log")
        procs.append(proc)
        wait_online(watch, proc, 60, after=t)
        return proc

    yield start, watch
    for proc in procs:
        proc.close()
    watch.close()


def _kills_run(serve_env, broker, kills: int, seed: int) -> dict:
    start, watch = serve_env
    rng = random.Random(seed)
    ledger = Ledger(broker.host, broker.port, persistent=True, tag="kills").listen()
    ids: list[str] = []
    stop = threading.Event()

    def client() -> None:  # keeps sending while the daemon dies and comes back
        i = 0
        while not stop.is_set():
            rid = f"k{i:05d}-{uuid.uuid4().hex[:6]}"
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30)))
            ids.append(rid)
            ledger.send(GENERATE, rid, {"id": rid, "mode": "complete" if i % 3 else "chat",
                                        **({"prompt": prompt} if i % 3 else
                                           {"messages": [{"role": "user", "content": prompt}]}),
                                        "max_tokens": rng.randint(4, 48),
                                        "temperature": 0 if i % 2 else 0.8})  # sampled: no seed given
            i += 1
            stop.wait(rng.uniform(0.05, 0.25))

    proc = start()
    sender = threading.Thread(target=client, daemon=True)
    sender.start()
    restart_s, killed_while_running, wills = [], 0, 0
    try:
        for k in range(kills):
            time.sleep(rng.uniform(0.2, 2.0))  # a random point: prefill, decode, publishing, idle
            before = len(ledger.answers)
            if any(a.chunks and not a.finals for a in list(ledger.answers.values())):
                killed_while_running += 1
            t_kill = time.monotonic()
            proc.kill()
            proc.close()
            watch.wait_state("offline", 10, after=t_kill)  # the will message
            wills += 1
            t = time.monotonic()
            proc = start()
            restart_s.append(time.monotonic() - t)
            del before
        time.sleep(0.5)
        stop.set()
        sender.join(5)
        missing = ledger.wait_finals(ids, 180)
        time.sleep(1.0)
        tally = ledger.tally(ids)
        codes = [f["error"]["code"] for i in ids for f in ledger.finals(i)[:1] if "error" in f]
        # `busy` is an answer: after a restart the broker hands over the whole backlog
        # at once, and what does not fit the queue is refused at once (not stored)
        busy = codes.count("busy")
        errors = sorted(set(codes) - {"busy"})
        proc.terminate()
        exit_code = proc.wait(60)
        log = proc.log
    finally:
        stop.set()
        ledger.close()
    return {**tally, "kills": kills, "killed_while_a_request_streamed": killed_while_running,
            "will_offline_seen": wills, "restart_to_online_s_mean": round(sum(restart_s) / len(restart_s), 2),
            "restart_to_online_s_max": round(max(restart_s), 2), "error_codes": errors, "busy": busy,
            "missing_after_wait": len(missing), "final_exit_code": exit_code,
            "requeued_after_restart": sum(1 for n in Counter(re.findall(r"request '([^']+)' queued", log)).values()
                                          if n > 1),
            "stored_finals_resent": log.count("was answered before"), "tracebacks": log.count("Traceback")}


def _check(fig: dict) -> None:
    assert fig["lost"] == 0, fig
    assert fig["conflicting"] == 0 and fig["restreamed_differently"] == 0, fig
    assert fig["error_codes"] == [], fig
    assert fig["final_exit_code"] == 0 and fig["tracebacks"] == 0, fig
    assert fig["will_offline_seen"] == fig["kills"], fig


def test_sigkill_repeatedly_while_a_client_keeps_sending(serve_env, broker):
    fig = _kills_run(serve_env, broker, kills=3, seed=11)
    record_figures("sigkill_quick", fig)
    _check(fig)


def test_sigterm_under_load_finishes_the_running_request_and_leaves_the_queue(serve_env, broker):
    start, watch = serve_env
    proc = start()
    with Ledger(broker.host, broker.port, persistent=True, tag="term").listen() as ledger:
        running = "t-running"
        ledger.send(GENERATE, running, {"id": running, "mode": "complete", "prompt": "def f(x):",
                                        "max_tokens": 400, "temperature": 0, "stream": True})
        queued = [f"t-queued-{i}" for i in range(6)]
        for rid in queued:
            ledger.send(GENERATE, rid, {"id": rid, "mode": "complete", "prompt": f"x{rid} = ", "max_tokens": 16,
                                        "temperature": 0})
        assert ledger.wait(lambda: bool(ledger.answers[running].chunks), 30)
        t_term = time.monotonic()
        proc.terminate()
        watch.wait_state("draining", 10, after=t_term)
        assert proc.wait(60) == 0, proc.log[-2000:]
        offline = watch.wait_state("offline", 10, after=t_term)
        assert "reason" not in offline  # a clean offline, not the will
        final = ledger.finals(running)
        assert len(final) == 1 and final[0]["finish_reason"] in ("length", "stop"), final
        answered_before_restart = [rid for rid in queued if ledger.finals(rid)]
        start()  # the next start gets the queued requests
        assert not ledger.wait_finals(queued, 60)
        time.sleep(0.5)
        tally = ledger.tally([running, *queued])
        record_figures("sigterm_under_load", {
            **tally, "running_finish_reason": final[0]["finish_reason"],
            "running_tokens": final[0]["usage"]["completion_tokens"],
            "queued": len(queued), "queued_answered_before_exit": len(answered_before_restart),
            "drain_s": round(offline["_received"] - t_term, 2)})
        assert tally["lost"] == 0 and tally["duplicated"] == 0, tally
        assert answered_before_restart == [], answered_before_restart


@pytest.mark.long
def test_sigkill_20_times(serve_env, broker):
    """The long form: at least 20 kills (EDGE_RELIABILITY_KILLS to change)."""
    fig = _kills_run(serve_env, broker, kills=max(20, size("kills", 20, 20)), seed=20)
    record_figures("sigkill", fig)
    _check(fig)
