#!/usr/bin/env python3
"""Flash wear: the bytes the real `edge-runtime serve` writes to the disk a request, behind a
real Mosquitto, on the tiny test bundle (the figure in docs/deployment.md, "Flash wear").

    python3 scripts/flash_writes.py --requests 200            # the store full (2,000 replies)
    python3 scripts/flash_writes.py --requests 200 --prefill 0  # a new, empty store
    python3 scripts/flash_writes.py --requests 200 --broker-autosave 1  # Mosquitto saving after each change

The daemon's `write_bytes` from /proc/<pid>/io (bytes it sent to the storage layer: the
reply store's sqlite WAL and database, the audit log) over `--requests` sequential completions
after a warm-up one, and the bytes of its log lines (stderr, read through a pipe as journald
reads a service's: not counted in write_bytes; journald stores them with its own fields). The
state directory is in --workdir, so measure on the file system in question (ext4 here).
The broker's `write_bytes` too (a Mosquitto on the device, persistence on, in --workdir):
with `--broker-autosave N` it saves its persistence file after every N changes
(`autosave_interval N` and `autosave_on_changes true`), else at its default (every 1,800 s).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "reliability"))

from reliability_kit import Ledger, StatusWatch, build_tiny_bundle, wait_online, write_serve_config  # noqa: E402

from mosquitto_broker import MosquittoBroker  # noqa: E402

DEVICE = "flash"


class PipedServe:
    """`python -m edge_runtime serve` with its output read through a pipe and counted."""

    def __init__(self, config: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "edge_runtime", "serve", "--config", str(config)],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.pid = self.process.pid
        self.log_bytes = 0
        self._lines: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.log_bytes += len(line)
            self._lines.append(line)

    @property
    def log(self) -> str:
        return b"".join(self._lines[-50:]).decode(errors="replace")

    def io(self) -> dict[str, int]:
        return _io(self.pid)


def _io(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/io") as f:
        return {key: int(value) for key, value in (line.split(": ") for line in f)}


def prefill(state_dir: Path, n: int, payload_bytes: int) -> None:
    """A store holding `n` replies (the daemon keeps 2,000: full, its steady state)."""
    from edge_runtime.reply_store import ReplyStore, request_key

    state_dir.mkdir(parents=True, exist_ok=True)
    with ReplyStore(state_dir / f"replies-{DEVICE}.sqlite3") as store:
        for i in range(n):
            store.put(request_key("edge/flash/v1/reply/earlier", f"e{i}"), b"x" * payload_bytes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--prefill", type=int, default=2000, help="replies in the store before (default: full)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--broker-autosave", type=int, metavar="N",
                        help="Mosquitto's autosave_interval N with autosave_on_changes true")
    parser.add_argument("--workdir", type=Path, help="the bundle (kept) and the state (default: a temporary folder)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="flash-writes-"))
    work.mkdir(parents=True, exist_ok=True)
    bundle = build_tiny_bundle(work)
    state = Path(tempfile.mkdtemp(prefix="state-", dir=work))
    prefill(state, args.prefill, 350)
    autosave = (f"autosave_interval {args.broker_autosave}\nautosave_on_changes true\n"
                if args.broker_autosave else "")
    broker = MosquittoBroker(Path(tempfile.mkdtemp(prefix="broker-", dir=work)), extra_config=autosave).start()
    config = write_serve_config(work / "flash.toml", broker_url=broker.url, device_id=DEVICE, bundle=bundle,
                                state_dir=state, max_tokens=args.max_tokens)
    watch = StatusWatch(broker.host, broker.port, DEVICE)
    started = time.monotonic()
    serve = PipedServe(config)
    try:
        wait_online(watch, serve, 120, after=started)
        topic = f"edge/{DEVICE}/v1/generate"
        with Ledger(broker.host, broker.port, tag="flash").listen() as ledger:
            def ask(request_id: str) -> None:
                ledger.send(topic, request_id, {"id": request_id, "mode": "complete", "prompt": "def fib(n):",
                                                "max_tokens": args.max_tokens})
                if ledger.wait_finals([request_id], 60):
                    raise SystemExit(f"no answer to {request_id}:\n{serve.log}")

            ask("warm-up")
            time.sleep(0.5)
            before, log_before, t = serve.io(), serve.log_bytes, time.monotonic()
            broker_before = _io(broker.process.pid)
            for i in range(args.requests):
                ask(f"q{i}")
            after, log_after, seconds = serve.io(), serve.log_bytes, time.monotonic() - t
            broker_after = _io(broker.process.pid)
        n = args.requests
        written = after["write_bytes"] - before["write_bytes"]
        print(json.dumps({
            "requests": n, "store_replies_before": args.prefill, "max_tokens": args.max_tokens,
            "seconds": round(seconds, 1), "write_bytes": written, "write_bytes_per_request": round(written / n),
            "write_syscalls_per_request": round((after["syscw"] - before["syscw"]) / n, 2),
            "log_bytes_per_request": round((log_after - log_before) / n),
            "broker_autosave": autosave.replace("\n", "; ").strip("; ") or "default",
            "broker_write_bytes_per_request": round((broker_after["write_bytes"] - broker_before["write_bytes"]) / n),
            "state_files": {p.name: p.stat().st_size for p in sorted(state.iterdir())},
        }, indent=2))
    finally:
        serve.process.terminate()
        try:
            serve.process.wait(30)
        except subprocess.TimeoutExpired:
            serve.process.kill()
        watch.close()
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
