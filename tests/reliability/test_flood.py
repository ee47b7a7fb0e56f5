"""A flood of 1 000 requests, far faster than the device serves them: resident
memory stays bounded, the excess gets `busy` at once, and the daemon answers a
cancel and republishes its status throughout (tests/service/fake_daemon.py: the
real EdgeService in its own process, FakeEngine at 20 ms a token)."""

from __future__ import annotations

import json
import statistics
import time

from reliability_kit import MiB, Ledger, PeakSampler, StatusWatch, record_figures, size, wait_online
from service_harness import DaemonProcess, write_config

DEVICE = "flood-dev"
GENERATE = f"edge/{DEVICE}/v1/generate"
CANCEL = f"edge/{DEVICE}/v1/cancel"
QUEUE = 8


def test_flood_of_requests_gets_busy_at_once_with_bounded_memory(broker, tmp_path):
    n = size("flood", 1000, 1000)
    config = write_config(tmp_path / "d.toml", broker, tmp_path / "state", device_id=DEVICE, queue_depth=QUEUE)
    watch = StatusWatch(broker.host, broker.port, DEVICE)
    t = time.monotonic()
    daemon = DaemonProcess(config, token_delay=0.02)
    try:
        wait_online(watch, daemon, 30, after=t)
        with Ledger(broker.host, broker.port, tag="flood").listen() as ledger:
            ledger.send(GENERATE, "warm", {"id": "warm", "mode": "complete", "prompt": "a b"})
            assert not ledger.wait_finals(["warm"], 10)
            baseline = daemon_rss = __import__("psutil").Process(daemon.process.pid).memory_info().rss
            big = "w " * 2000  # 4 kB prompts, 100 tokens each at 20 ms: 2 s of work per request
            ids = [f"f{i:04d}" for i in range(n)]
            cancel_probes: list[float] = []
            statuses_before = len(watch.states)
            with PeakSampler(daemon.process.pid) as sampler:
                t0 = time.monotonic()
                for i, rid in enumerate(ids):
                    ledger.send(GENERATE, rid, {"id": rid, "mode": "complete", "prompt": big, "max_tokens": 100})
                    if i in (1, 300, 700):
                        # cancel the running/queued request now: its final must come quickly
                        target = ids[i]
                        tc = time.monotonic()
                        ledger.client.publish(CANCEL, json.dumps({"id": target}), qos=1)
                        ledger.wait(lambda: bool(ledger.finals(target)), 10)
                        cancel_probes.append(time.monotonic() - tc)
                send_s = time.monotonic() - t0
                busy_deadline = time.monotonic() + 30
                ledger.wait(lambda: sum(1 for r in ids if ledger.finals(r)) >= n - QUEUE - 2, 30)
                assert time.monotonic() < busy_deadline
                flood_s = time.monotonic() - t0
                # cancel everything still queued or running: the daemon empties at once
                for rid in ids:
                    if not ledger.finals(rid):
                        ledger.client.publish(CANCEL, json.dumps({"id": rid}), qos=1)
                missing = ledger.wait_finals(ids, 30)
            codes = [ledger.finals(r)[0].get("error", {}).get("code", "result") for r in ids if ledger.finals(r)]
            busy_latency = [ledger.answers[r].first_reply_at - ledger.sent_at[r] for r in ids
                            if ledger.finals(r) and ledger.finals(r)[0].get("error", {}).get("code") == "busy"]
            status_updates = len(watch.states) - statuses_before
            daemon_rss = daemon.process.poll() is None and __import__("psutil").Process(
                daemon.process.pid).memory_info().rss
            tally = ledger.tally(ids)
        figures = {"requests": n, "queue_depth": QUEUE, "send_s": round(send_s, 2),
                   "busy_or_answered_s": round(flood_s, 2), "busy": codes.count("busy"),
                   "cancelled": codes.count("cancelled"), "results": codes.count("result"),
                   "other_codes": sorted(set(codes) - {"busy", "cancelled", "result"}),
                   "busy_reply_ms_median": round(statistics.median(busy_latency) * 1000, 1),
                   "busy_reply_ms_p99": round(sorted(busy_latency)[int(len(busy_latency) * 0.99) - 1] * 1000, 1),
                   "cancel_answer_ms": [round(c * 1000, 1) for c in cancel_probes],
                   "status_updates_during_flood": status_updates,
                   "rss_baseline_mib": round(baseline / MiB, 1), "rss_peak_mib": round(sampler.peak / MiB, 1),
                   "rss_after_mib": round(daemon_rss / MiB, 1) if daemon_rss else None,
                   "lost": tally["lost"], "duplicated": tally["duplicated"], "missing": len(missing)}
        record_figures("flood", figures)
        assert daemon.process.poll() is None
        assert not missing and tally["duplicated"] == 0, figures
        assert figures["busy"] >= n - QUEUE - 10 - 3, figures
        assert figures["other_codes"] == [], figures
        assert max(cancel_probes) < 5.0, figures
        assert figures["status_updates_during_flood"] >= 1, figures  # one at least, however loaded the machine
        assert sampler.peak - baseline < 64 * MiB, figures
    finally:
        watch.close()
        daemon.stop()
