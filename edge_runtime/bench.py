"""`edge-runtime bench`: prefill and decode speed of a bundle on this machine, and how
near each decode speed comes to the machine's memory-bandwidth roofline.

Prompts are random token ids (fixed seed): speed does not depend on the text.
Decode speed at context C is measured after prefilling C tokens, over the next
`decode_tokens` single-token steps, each followed by a greedy sample (argmax of
the last position's logits), as the engine's loop does. The memory bandwidth of the
device the session runs on is measured in a child process before the timings and after
them, the faster of the two counting (`roofline.py`: on the host a numpy copy and read,
on a GPU a Neg in device memory), and each decode speed is given as a share of
bandwidth / (the bytes a step reads at that context).
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .engine import Engine
from .roofline import DEFAULT_PROBE_MIB, measure_bandwidth, physical_cores, step_bytes


@dataclass
class BenchResult:
    bundle: str
    precision: str
    provider: str
    model_bytes: int
    prefill_tokens: int
    prefill_tokens_per_s: float
    ttft_ms: float
    decode_tokens_per_s: dict[int, float] = field(default_factory=dict)  # context -> tokens/s
    skipped: dict[int, str] = field(default_factory=dict)
    peak_rss_bytes: int = 0
    # the roofline (empty with roofline=False, or with a note where the bandwidth could not be measured)
    bandwidth: dict = field(default_factory=dict)  # roofline.measure_bandwidth's figures, bytes per second
    step_bytes: dict[int, int] = field(default_factory=dict)  # context -> bytes a decode step reads
    roofline_percent: dict[int, float] = field(default_factory=dict)  # decode tokens/s over bandwidth / step bytes
    read_roofline_percent: dict[int, float] = field(default_factory=dict)  # the same with the read bandwidth (host)
    roofline_note: str = ""


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prompt_ids(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = rng.integers(100, min(vocab, 32000), size=n, dtype=np.int64)
    ids[0] = 1
    return ids


def time_prefill(engine: Engine, n: int, repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` (prefill seconds, time to first token seconds) for an n-token prompt."""
    ids = prompt_ids(n, engine.bundle.architecture.vocab_size)
    best_prefill = best_ttft = float("inf")
    for _ in range(repeats):
        cache = engine.decoder.new_cache(n + 1)
        t0 = time.perf_counter()
        logits = engine.decoder.prefill(cache, ids)
        t1 = time.perf_counter()
        int(np.argmax(logits[-1]))
        t2 = time.perf_counter()
        best_prefill, best_ttft = min(best_prefill, t1 - t0), min(best_ttft, t2 - t0)
    return best_prefill, best_ttft


WARM_UP_STEPS = 3  # untimed decode steps before the timed ones


def time_decode(engine: Engine, context: int, steps: int) -> float:
    """Decode tokens/s after a `context`-token prefill."""
    ids = prompt_ids(context, engine.bundle.architecture.vocab_size, seed=context)
    cache = engine.decoder.new_cache(context + steps + WARM_UP_STEPS + 1)
    token = int(np.argmax(engine.decoder.prefill(cache, ids)[-1]))
    for _ in range(WARM_UP_STEPS):
        token = int(np.argmax(engine.decoder.decode(cache, token)))
    t0 = time.perf_counter()
    for _ in range(steps):
        token = int(np.argmax(engine.decoder.decode(cache, token)))
    return steps / (time.perf_counter() - t0)


def host_threads(engine: Engine) -> int:
    """The threads the engine's session computes with: the profile's, or onnxruntime's
    default (one per physical core)."""
    return engine.profile.intra_op_threads or physical_cores()


def add_roofline(result: BenchResult, bandwidth: dict, steps: dict[int, int]) -> BenchResult:
    """`result` with each decode speed as a share of `bandwidth` over the bytes a step reads."""
    result.bandwidth, result.step_bytes = bandwidth, steps
    for ctx, tps in result.decode_tokens_per_s.items():
        result.roofline_percent[ctx] = 100 * tps * steps[ctx] / bandwidth["bandwidth"]
        if bandwidth.get("read_bandwidth"):
            result.read_roofline_percent[ctx] = 100 * tps * steps[ctx] / bandwidth["read_bandwidth"]
    return result


def run_bench(bundle: str, *, profile: str | None = None, prefill_tokens: int = 512,
              contexts: tuple[int, ...] = (128, 2048), decode_tokens: int = 64, repeats: int = 3,
              roofline: bool = True, bandwidth_mib: int = DEFAULT_PROBE_MIB) -> BenchResult:
    engine = Engine.from_bundle(bundle, profile=profile)
    limit = engine.context_limit
    result = BenchResult(bundle=str(engine.bundle.root), precision=engine.bundle.precision,
                         provider=engine.info.provider,
                         model_bytes=sum(f["size"] for f in engine.bundle.manifest["files"]
                                         if f["path"].startswith("model.onnx")),
                         prefill_tokens=min(prefill_tokens, limit - 1), prefill_tokens_per_s=0.0, ttft_ms=0.0)
    measures: list[dict] = []
    failures: list[str] = []
    fitting = [c for c in contexts if c + decode_tokens + WARM_UP_STEPS + 1 <= limit]
    result.skipped = {c: f"context limit {limit}" for c in contexts if c not in fitting}
    roofline = roofline and bool(fitting)  # a decode speed to compare

    def measure() -> None:  # in a child process: its arrays never count in this process's RSS
        if roofline:
            try:
                measures.append(measure_bandwidth(threads=host_threads(engine), device=engine.decoder.device,
                                                  device_id=getattr(engine.decoder, "device_id", 0),
                                                  mib=bandwidth_mib))
            except (RuntimeError, OSError, ValueError) as exc:
                failures.append(str(exc))

    measure()  # before the timings and after: this VM's or board's bandwidth drifts, the faster one counts
    prefill_s, ttft_s = time_prefill(engine, result.prefill_tokens, repeats)
    result.prefill_tokens_per_s = result.prefill_tokens / prefill_s
    result.ttft_ms = ttft_s * 1000
    for context in fitting:
        result.decode_tokens_per_s[context] = time_decode(engine, context, decode_tokens)
    result.peak_rss_bytes = peak_rss_bytes()
    measure()
    result.roofline_note = "; ".join(dict.fromkeys(failures))  # a failed measure is said, a good one still counts
    if measures and result.decode_tokens_per_s:
        arch = engine.bundle.architecture
        steps = step_bytes(engine.bundle.graph_path, layers=arch.num_layers, kv_heads=arch.num_kv_heads,
                           head_dim=arch.head_dim, contexts=result.decode_tokens_per_s)
        add_roofline(result, faster(measures), steps)
    return result


def faster(measures: list[dict]) -> dict:
    """Several bandwidth measures as one: the highest of each figure (bytes per second)."""
    best = dict(measures[0])
    for m in measures[1:]:
        for key, value in m.items():
            if isinstance(value, float):
                best[key] = max(best[key], value)
    return best


def format_result(r: BenchResult) -> str:
    lines = [f"bundle            {r.bundle} ({r.precision}, {r.provider}, model {r.model_bytes / 2**20:.1f} MiB)",
             f"prefill           {r.prefill_tokens_per_s:,.0f} tokens/s ({r.prefill_tokens} prompt tokens)",
             f"time to 1st token {r.ttft_ms:.1f} ms ({r.prefill_tokens} prompt tokens)"]
    if r.bandwidth:
        how = (f"copy (numpy, read + written), {r.bandwidth['read_bandwidth'] / 1e9:,.1f} GB/s read, "
               f"{r.bandwidth['threads']} threads" if r.bandwidth.get("device") == "cpu"
               else "read + written by a float16 Neg in device memory")
        lines.append(f"memory bandwidth  {r.bandwidth['bandwidth'] / 1e9:,.1f} GB/s {how}")
    if r.roofline_note:
        lines.append(f"memory bandwidth  {'a measure failed' if r.bandwidth else 'not measured'} ({r.roofline_note})")
    for ctx, tps in r.decode_tokens_per_s.items():
        roof = ""
        if ctx in r.roofline_percent:
            roof = (f"  ({r.step_bytes[ctx] / 2**20:,.1f} MiB a step: {r.roofline_percent[ctx]:.0f} % of the roofline"
                    + (f", {r.read_roofline_percent[ctx]:.0f} % of the read roofline" if ctx in r.read_roofline_percent
                       else "") + ")")
        lines.append(f"decode @ {ctx:<8} {tps:,.1f} tokens/s{roof}")
    for ctx, why in r.skipped.items():
        lines.append(f"decode @ {ctx:<8} skipped ({why})")
    lines.append(f"peak RSS          {r.peak_rss_bytes / 2**20:.0f} MiB")
    return "\n".join(lines)


def result_json(r: BenchResult) -> str:
    return json.dumps(asdict(r), indent=2)
