"""MQTT overhead on loopback: end-to-end request time seen by a client minus the
engine's own time (the final reply's `timings.total_ms`), p50 and p95 over N short
requests, and requests/s, with a real Mosquitto and the real daemon and engine.

    python benchmarks/mqtt_overhead.py --bundle bundles/demo-cpu-x86_64-int4 [--requests 200]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edge_runtime.client import EdgeClient
from edge_runtime.config import load_config
from edge_runtime.engine import Engine
from edge_runtime.service import EdgeService


def start_broker(workdir: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise SystemExit("mosquitto did not start")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=4)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mqtt-bench-"))
    broker, port = start_broker(work)
    url = f"mqtt://127.0.0.1:{port}"
    config = load_config(None, {"model.bundle": args.bundle, "mqtt.broker": url, "mqtt.device_id": "bench",
                                "service.state_dir": str(work / "state")})
    service = EdgeService(config, Engine.from_bundle(args.bundle)).start()
    try:
        service.wait_ready(30)
        e2e, engine_ms = [], []
        with EdgeClient(url, "bench") as client:
            client.complete("x", max_tokens=args.max_tokens, temperature=0.0)  # warm up
            start = time.perf_counter()
            for i in range(args.requests):
                t0 = time.perf_counter()
                gen = client.generate(mode="complete", prompt=f"def f{i}(", max_tokens=args.max_tokens,
                                      temperature=0.0, timeout=30)
                for _ in gen:
                    pass
                final = gen.result()
                e2e.append((time.perf_counter() - t0) * 1000)
                engine_ms.append(final["timings"]["total_ms"])
            wall = time.perf_counter() - start
    finally:
        service.stop()
        broker.terminate()
        shutil.rmtree(work, ignore_errors=True)
    overhead = [a - b for a, b in zip(e2e, engine_ms)]
    print(f"{args.requests} sequential streamed requests, max_tokens {args.max_tokens}, bundle {args.bundle}")
    print(f"end-to-end ms   p50 {statistics.median(e2e):7.2f}   p95 {percentile(e2e, 0.95):7.2f}")
    print(f"engine ms       p50 {statistics.median(engine_ms):7.2f}   p95 {percentile(engine_ms, 0.95):7.2f}")
    print(f"MQTT overhead   p50 {statistics.median(overhead):7.2f}   p95 {percentile(overhead, 0.95):7.2f}")
    print(f"requests/s      {args.requests / wall:.1f}")
    return 0


if __name__ == "__main__":
    from edge_runtime.cli import run_script

    sys.exit(run_script(main))
