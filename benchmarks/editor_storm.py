"""An editor's completions at typing speed, against a real `edge-runtime serve` and Mosquitto.

An editor plugin (llama.vscode, Continue, Tabby) sends an infill request at each pause in
typing, the file before the cursor as `prefix` and after it as `suffix`, and cancels the
previous request when the user types again. This script types `--keys` characters into the
middle of a Python file of about `--file-tokens` tokens: after each it sends an infill request
(greedy, `--max-tokens`), waits 50 to 300 ms (seeded), cancels it and sends the next with one
more character; the last one runs to its end.

    python benchmarks/editor_storm.py --bundle BUNDLE|--synthetic DIR [--keys 30] [--file-tokens 2000]
        [--order psm|spm|both] [--max-tokens 16] [--queue-depth 8] [--seeds 0 1 2] [--json OUT]
    python benchmarks/editor_storm.py --synthetic DIR --file-tokens 1024 --prefill-chunks 512 256 128 64

Per order it prints: how many cancelled requests ended with their final reply (finish_reason
`cancelled`, or the `cancelled` error of one cancelled while queued), the time from a cancel
to that request's final reply (the engine free again) and to the next request's first chunk,
how many were refused `busy`, the prompt tokens kept per request (`cached_prompt_tokens`), and
the last request's time to its first chunk. Each `--seeds` storm is a client of its own (a cold
prompt cache) on one daemon per order.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "reliability")]

from mosquitto_broker import MosquittoBroker  # noqa: E402
from reliability_kit import ServeProcess, write_serve_config  # noqa: E402

from edge_runtime import Busy, EdgeClient  # noqa: E402
from edge_runtime.client import RemoteError  # noqa: E402


def source_file(tokens: int) -> tuple[str, int]:
    """A Python file of about `tokens` tokens, and the cursor: the start of its middle function."""
    functions = [f"def scale_{i}(values, factor={i}):\n    \"\"\"Scale each value by {i}.\"\"\"\n"
                 f"    return [v * factor + {i} for v in values]\n\n\n" for i in range(max(tokens // 40, 2))]
    text = "".join(functions)
    return text, text.index(f"def scale_{len(functions) // 2}(")


TYPED = "def total(values):\n    result = 0\n    for v in values:\n        result += v\n    return result\n"


class Watched:
    """One request, read on a thread of its own: when its first chunk and its final reply came."""

    def __init__(self, client: EdgeClient, **request) -> None:
        self.sent = time.monotonic()
        self.first_chunk: float | None = None
        self.done: float | None = None
        self.final: dict | None = None
        self.error: str | None = None
        self.generation = client.generate(**request)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for _ in self.generation:
                if self.first_chunk is None:
                    self.first_chunk = time.monotonic()
            self.final = self.generation.final
        except Busy:
            self.error = "busy"
        except RemoteError as exc:
            self.error = exc.code
        self.done = time.monotonic()


def storm(client: EdgeClient, order: str, keys: int, file_tokens: int, max_tokens: int, seed: int) -> dict:
    text, cursor = source_file(file_tokens)
    rng = random.Random(seed)
    watched: list[Watched] = []
    cancels: list[float] = []
    for k in range(1, keys + 1):
        prefix, suffix = text[:cursor] + TYPED[:k], text[cursor:]
        if watched:
            cancels.append(time.monotonic())
            watched[-1].generation.cancel()
        watched.append(Watched(client, mode="infill", prefix=prefix, suffix=suffix, suffix_first=order == "spm",
                               max_tokens=max_tokens, temperature=0.0, timeout=600))
        if k < keys:
            time.sleep(rng.uniform(0.05, 0.3))
    for w in watched:
        w.thread.join(600)
    cancelled = watched[:-1]
    running = [w for w in cancelled if (w.final or {}).get("finish_reason") == "cancelled"]  # it had started
    queued = [w for w in cancelled if w.error == "cancelled"]  # cancelled before it started
    ended = running + queued
    freed = [w.done - c for w, c in zip(cancelled, cancels) if w in running and w.done is not None]
    next_first = [n.first_chunk - c for n, c in zip(watched[1:], cancels) if n.first_chunk is not None]
    last = watched[-1]
    def ms(xs: list[float]) -> dict | None:
        return {"median": round(statistics.median(xs) * 1000), "max": round(max(xs) * 1000)} if xs else None

    finished = [w for w in cancelled if (w.final or {}).get("finish_reason") in ("stop", "length")]
    return {
        "order": order, "keys": keys,
        "prompt_tokens": (last.final or {}).get("usage", {}).get("prompt_tokens"),
        "cancelled_with_final_reply": f"{len(ended)} of {len(cancelled)}",
        "cancelled_running": len(running), "cancelled_queued": len(queued),
        "finished_before_cancel": len(finished),
        "busy": sum(1 for w in watched if w.error == "busy"),
        "running_cancel_to_its_final_reply_ms": ms(freed),
        "cancel_to_next_first_chunk_ms": ms(next_first),
        "cached_prompt_tokens": [(w.final or {}).get("usage", {}).get("cached_prompt_tokens") for w in watched],
        "last_first_chunk_ms": round((last.first_chunk - last.sent) * 1000) if last.first_chunk else None,
        "last_finish_reason": (last.final or {}).get("finish_reason"),
    }


def synthetic_bundle(folder: Path) -> Path:
    """A random-weight Code Llama-shaped model big enough for a prompt's run to take seconds on
    two cores (hidden 1024, 8 layers, 16 heads: 0.2 B parameters), exported int4 for the CPU
    profile into `folder` (once; reused)."""
    bundle = folder / "int4"
    if (bundle / "bundle.json").is_file():
        return bundle
    from edge_export.pipeline import ExportOptions, run_export
    from edge_export.progress import Progress
    from edge_export.synthetic import build_checkpoint

    checkpoint = build_checkpoint(folder / "checkpoint", hidden_size=1024, intermediate_size=2816, num_layers=8,
                                  num_heads=16, num_kv_heads=16, max_position_embeddings=4096, seed=5)
    run_export(ExportOptions(checkpoint=checkpoint, profile="cpu-x86_64", output=bundle, precision="int4",
                             skip_fidelity=True), Progress(5, enabled=False))
    return bundle


def prefill_chunk_costs(bundle: Path, chunks: list[int], tokens: int) -> list[dict]:
    """A `tokens`-id prompt's run at each prefill chunk size (the best of two): the whole prompt,
    and one chunk, which bounds how long a cancel waits (engine.py; memory_fit.PREFILL_CHUNK)."""
    import numpy as np

    from edge_runtime.engine import Engine

    engine = Engine.from_bundle(bundle, prompt_cache="off")
    text, _ = source_file(tokens * 2)
    ids = np.asarray(engine.tokenizer.encode(text)[:tokens], dtype=np.int64)
    decoder, rows = engine.decoder, []
    for chunk in chunks:
        decoder.prefill_chunk = chunk
        best = float("inf")
        for _ in range(2):
            cache = decoder.new_cache(len(ids) + 1)
            t0 = time.perf_counter()
            decoder.prefill(cache, ids)
            best = min(best, time.perf_counter() - t0)
        rows.append({"prefill_chunk": chunk, "prompt_ids": len(ids), "prompt_ms": round(best * 1000),
                     "per_chunk_ms": round(best * 1000 * min(chunk, len(ids)) / len(ids))})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", type=Path)
    source.add_argument("--synthetic", type=Path, metavar="DIR",
                        help="build (once) and use the random-weight int4 model of synthetic_bundle() in DIR")
    ap.add_argument("--keys", type=int, default=30)
    ap.add_argument("--file-tokens", type=int, default=2000)
    ap.add_argument("--order", choices=("psm", "spm", "both"), default="both")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--queue-depth", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--prefill-chunks", type=int, nargs="+", metavar="N",
                    help="instead of the storm: time a --file-tokens prompt's run at each prefill chunk size")
    args = ap.parse_args()
    if args.synthetic:
        args.bundle = synthetic_bundle(args.synthetic)
    if args.prefill_chunks:
        rows = prefill_chunk_costs(args.bundle, args.prefill_chunks, args.file_tokens)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="editor-storm-") as tmp:
        work = Path(tmp)
        with MosquittoBroker(work / "broker") as broker:
            for order in (("psm", "spm") if args.order == "both" else (args.order,)):
                # a device id per order: a daemon killed after its last reply may not have acknowledged
                # that request yet, and the broker would hand it to the next daemon of the same id
                device = f"editor-{order}"
                config = write_serve_config(work / f"{order}.toml", broker_url=broker.url, device_id=device,
                                            bundle=args.bundle.resolve(), state_dir=work / f"state-{order}",
                                            queue_depth=args.queue_depth, max_tokens=args.max_tokens)
                serve = ServeProcess(config, work / f"serve-{order}.log")
                try:
                    deadline = time.monotonic() + 300
                    while "warmed up in" not in serve.log:  # ready: the warm-up holds no request back
                        if time.monotonic() > deadline or not serve.alive():
                            raise SystemExit(f"serve did not come up:\n{serve.log[-3000:]}")
                        time.sleep(0.2)
                    for seed in args.seeds:
                        with EdgeClient(broker.url, device, client_id=f"editor-{seed}") as client:
                            while (client.status(timeout=2) or {}).get("state") != "online":
                                if time.monotonic() > deadline or not serve.alive():
                                    raise SystemExit(f"serve did not come up:\n{serve.log[-3000:]}")
                            results.append(dict(storm(client, order, args.keys, args.file_tokens, args.max_tokens,
                                                      seed), seed=seed))
                        print(json.dumps(results[-1]), flush=True)
                finally:
                    serve.close()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
