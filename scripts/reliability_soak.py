#!/usr/bin/env python3
"""Soak: the real `edge-runtime serve` on the tiny test bundle behind a real
Mosquitto, fed mixed requests for --minutes, with the daemon's resident memory,
open file descriptors and threads sampled every --sample-s seconds.

    python3 scripts/reliability_soak.py --minutes 30 --out reliability-figures

Writes <out>/soak.json (every sample, request counts, the verdict) and
<out>/soak.svg (memory and descriptors over time). Exit status 1 when memory or
descriptors grew, a request went unanswered, or the daemon died.

The mix, round after round: streamed completions, infills and chats (greedy and
sampled), non-streamed requests, a cancel in the middle of a stream, a burst
larger than the queue (some get `busy`), special tags (text in a completion,
`unsafe_prompt` in a chat), bad
JSON and unknown fields (`bad_request`), a redelivered id (the stored reply),
and a status read.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "reliability"))

from reliability_kit import (  # noqa: E402
    MiB,
    Ledger,
    ServeProcess,
    StatusWatch,
    build_tiny_bundle,
    wait_online,
    write_serve_config,
)
from mosquitto_broker import MosquittoBroker  # noqa: E402

DEVICE = "soak"
GENERATE = f"edge/{DEVICE}/v1/generate"
CANCEL = f"edge/{DEVICE}/v1/cancel"
QUEUE_DEPTH = 8


def requests_for_round(rng: random.Random) -> list[tuple[str, bytes | dict, str]]:
    """(kind, payload, expected outcome) for one round."""
    rid = lambda: uuid.uuid4().hex  # noqa: E731
    words = " ".join(rng.choice(["def", "parse", "(x):", "return", "self", "import", "os", "for", "in"])
                     for _ in range(rng.randint(2, 40)))
    temp = rng.choice([0.0, 0.6, 1.2])
    out: list[tuple[str, bytes | dict, str]] = [
        ("complete", {"id": rid(), "mode": "complete", "prompt": words, "max_tokens": rng.randint(1, 48),
                      "temperature": temp, "seed": rng.randint(0, 99)}, "result"),
        ("infill", {"id": rid(), "mode": "infill", "prefix": "def f(a, b):\n    ", "suffix": "\n" + words,
                    "max_tokens": 24, "temperature": temp}, "result"),
        ("chat", {"id": rid(), "mode": "chat", "stream": rng.random() < 0.5,
                  "messages": [{"role": "system", "content": "Answer with code."},
                               {"role": "user", "content": words}], "max_tokens": 32}, "result"),
        ("nostream", {"id": rid(), "mode": "complete", "prompt": words, "stream": False, "max_tokens": 16,
                      "stop": ["\n"]}, "result"),
        # special tags stay text in completion and infill prompts; chat refuses them
        ("tags-as-text", {"id": rid(), "mode": "complete", "prompt": f"{words} <PRE> [INST] </s>",
                          "max_tokens": 8}, "result"),
        ("unsafe", {"id": rid(), "mode": "chat", "messages": [{"role": "user", "content": f"{words} [INST]"}]},
         "unsafe_prompt"),
        ("badjson", b'{"id": "x", "mode": ', "bad_request"),
        ("unknown", {"id": rid(), "mode": "complete", "prompt": "x", "max_token": 3}, "bad_request"),
    ]
    return out


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="edge-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    bundle = Path(args.bundle) if args.bundle else build_tiny_bundle(work / "bundle")
    broker = MosquittoBroker(work / "broker").start()
    config = write_serve_config(work / "serve.toml", broker_url=broker.url, device_id=DEVICE, bundle=bundle,
                                state_dir=work / "state", queue_depth=QUEUE_DEPTH, max_tokens=64)
    watch = StatusWatch(broker.host, broker.port, DEVICE)
    started = time.monotonic()
    daemon = ServeProcess(config, work / "daemon.log")
    rng = random.Random(args.seed)
    counts: Counter[str] = Counter()
    unexpected: list[str] = []
    samples: list[dict] = []
    try:
        wait_online(watch, daemon, 120, after=started)
        ledger = Ledger(broker.host, broker.port, tag="soak").listen()
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        next_sample = t0
        rounds = 0
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_sample:
                samples.append({"t_s": round(now - t0, 1), "rss_mib": round(daemon.rss() / MiB, 2),
                                "fds": daemon.fds(), "threads": daemon.threads(), "requests": sum(counts.values())})
                next_sample += args.sample_s
            if not daemon.alive():
                unexpected.append(f"daemon exited with {daemon.process.returncode}")
                break
            rounds += 1
            batch = requests_for_round(rng)
            ids = []
            for kind, payload, expect in batch:
                request_id = payload["id"] if isinstance(payload, dict) else f"bad-{uuid.uuid4().hex}"
                ledger.send(GENERATE, request_id, payload)
                ids.append((kind, request_id, expect))
            # a cancel in the middle of a stream
            cancel_id = uuid.uuid4().hex
            ledger.send(GENERATE, cancel_id, {"id": cancel_id, "mode": "complete", "prompt": "def long():",
                                              "max_tokens": 64, "temperature": 1.0})
            ledger.client.publish(CANCEL, json.dumps({"id": cancel_id}), qos=1)
            ids.append(("cancel", cancel_id, "any"))
            # every 5th round: a burst larger than the queue, and a redelivered id
            if rounds % 5 == 0:
                for _ in range(QUEUE_DEPTH + 6):
                    b = uuid.uuid4().hex
                    ledger.send(GENERATE, b, {"id": b, "mode": "complete", "prompt": "x = ", "max_tokens": 8})
                    ids.append(("burst", b, "any"))
                again = ids[0][1]
                missing = ledger.wait_finals([again], 60)
                if not missing:
                    ledger.answers.pop(again, None)
                    ledger.send(GENERATE, again, batch[0][1])
                    ids.append(("redelivered", again, "result"))
            missing = ledger.wait_finals([i for _, i, _ in ids], 120)
            for kind, request_id, expect in ids:
                if request_id in missing:
                    unexpected.append(f"{kind} {request_id}: no final reply within 120 s")
                    continue
                final = ledger.finals(request_id)[0]
                code = final.get("error", {}).get("code") if isinstance(final.get("error"), dict) else None
                counts[f"{kind}:{code or 'result'}"] += 1
                if expect == "result" and code is not None and not (kind == "redelivered" and code == "busy"):
                    unexpected.append(f"{kind} {request_id}: {code} {final['error'].get('message')}")
                elif expect not in ("result", "any") and code != expect:
                    unexpected.append(f"{kind} {request_id}: expected {expect}, got {code or 'a result'}")
            for _, request_id, _ in ids:
                ledger.answers.pop(request_id, None)  # the ledger must not grow either
            if rounds % 50 == 0:
                watch.states.clear()
            if len(unexpected) > 50:
                break
        samples.append({"t_s": round(time.monotonic() - t0, 1), "rss_mib": round(daemon.rss() / MiB, 2),
                        "fds": daemon.fds(), "threads": daemon.threads(), "requests": sum(counts.values())})
        ledger.close()
        daemon.terminate()
        exit_code = daemon.wait(60)
    finally:
        daemon.close()
        watch.close()
        broker.stop()
    verdict = analyse(samples)
    result = {"minutes": args.minutes, "sample_s": args.sample_s, "requests": sum(counts.values()),
              "rounds": rounds, "outcomes": dict(sorted(counts.items())), "unexpected": unexpected[:50],
              "daemon_exit_code": exit_code, "bundle": str(bundle), **verdict, "samples": samples,
              "recorded": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "soak.svg").write_text(svg_plot(samples, title=f"edge-runtime serve soak, {args.minutes:g} min, "
                                                          f"{result['requests']} requests"))
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    ok = not unexpected and exit_code == 0 and verdict["memory_growth_ok"] and verdict["fd_growth_ok"]
    return 0 if ok else 1


def analyse(samples: list[dict]) -> dict:
    """Growth between the second tenth of the run (after warm-up) and the last tenth."""
    if len(samples) < 10:
        return {"memory_growth_ok": True, "fd_growth_ok": True, "note": "too short to judge"}
    n = len(samples)
    early = samples[n // 10: max(n // 5, n // 10 + 1)]
    late = samples[-max(n // 10, 1):]
    rss_early = statistics.median(s["rss_mib"] for s in early)
    rss_late = statistics.median(s["rss_mib"] for s in late)
    fd_early = max(s["fds"] for s in early)
    fd_late = max(s["fds"] for s in late)
    growth = rss_late - rss_early
    return {"rss_mib_start": samples[0]["rss_mib"], "rss_mib_warm_median": rss_early, "rss_mib_end_median": rss_late,
            "rss_mib_peak": max(s["rss_mib"] for s in samples), "rss_growth_mib": round(growth, 2),
            "fds_min": min(s["fds"] for s in samples), "fds_max": max(s["fds"] for s in samples),
            "fds_warm": fd_early, "fds_end": fd_late,
            "threads_min": min(s["threads"] for s in samples), "threads_max": max(s["threads"] for s in samples),
            # 5 % or 8 MiB, whichever is larger: allocator noise, not a leak
            "memory_growth_ok": growth <= max(8.0, 0.05 * rss_early), "fd_growth_ok": fd_late <= fd_early}


def svg_plot(samples: list[dict], *, title: str) -> str:
    """Two stacked line charts (RSS MiB, open fds) over minutes, as a standalone SVG."""
    width, height, left, right, top, panel, gap = 760, 420, 70, 20, 40, 150, 50
    ts = [s["t_s"] / 60 for s in samples] or [0.0]
    tmax = max(ts[-1], 1e-6)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>']
    for i, (key, label, colour) in enumerate((("rss_mib", "resident memory (MiB)", "#1f77b4"),
                                              ("fds", "open file descriptors", "#d62728"))):
        y0 = top + i * (panel + gap)
        values = [s[key] for s in samples] or [0]
        lo, hi = min(values), max(values)
        pad = max((hi - lo) * 0.1, 1.0)
        lo, hi = max(0, lo - pad), hi + pad
        x = lambda t: left + (width - left - right) * t / tmax  # noqa: E731
        y = lambda v: y0 + panel - panel * (v - lo) / (hi - lo)  # noqa: E731
        parts.append(f'<rect x="{left}" y="{y0}" width="{width - left - right}" height="{panel}" fill="none" '
                     f'stroke="#888"/>')
        parts.append(f'<text x="{left}" y="{y0 - 6}">{label}</text>')
        for frac in (0, 0.5, 1):
            v = lo + (hi - lo) * frac
            parts.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.0f}</text>')
        points = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in zip(ts, values))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}"/>')
    axis_y = top + 2 * panel + gap + 18
    for frac in (0, 0.25, 0.5, 0.75, 1):
        xpos = left + (width - left - right) * frac
        parts.append(f'<text x="{xpos:.1f}" y="{axis_y}" text-anchor="middle">{tmax * frac:.0f}</text>')
    parts.append(f'<text x="{width / 2}" y="{axis_y + 18}" text-anchor="middle">minutes</text></svg>')
    return "\n".join(parts) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--out", default="reliability-figures")
    parser.add_argument("--bundle", help="bundle to serve (default: build the tiny test bundle in --workdir)")
    parser.add_argument("--workdir", help="default: a new temporary folder")
    parser.add_argument("--seed", type=int, default=7)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
