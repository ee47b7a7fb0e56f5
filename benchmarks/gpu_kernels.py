"""Where a decode step's time goes on an NVIDIA GPU (issue #8): every kernel, copy and memset
of our engine's decode steps, traced on the GPU itself.

    python benchmarks/gpu_kernels.py --bundle B [--variant cuda|cuda-graph] [--context 128] [--steps 16] [--json OUT]

The engine is the daemon's (benchmarks/gpu_decode.py's ``load_engine``: the nvidia-gpu profile,
the KV cache in device memory, I/O binding; ``--variant cuda-graph`` replays a recorded CUDA graph
per step). After a ``--context``-token prompt and three untimed steps it times ``--steps`` decode
steps (the median is the step's wall time), then runs ``--steps`` more under PyTorch's profiler with
its CUDA activity on: CUPTI records every kernel the process launches, onnxruntime's included,
with the GPU's own start and end times. It prints

* the step: wall time, GPU busy time (the union of its kernels, copies and memsets), GPU idle time
  (wall - busy: the host's share, launches and the Python loop), kernels per step;
* copies between host and device per step, by direction, with their bytes (the loop should
  have one: the logits, device to host);
* the kernels by name (template arguments dropped), the longest first: calls per step, time per
  step, mean time per call, share of the GPU's busy time; and how much of the busy time went to
  kernels shorter than 5 us.

Needs PyTorch with CUDA beside onnxruntime-gpu (the trace is PyTorch's; nothing else of it runs).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_graphs import prompt_ids  # noqa: E402
from gpu_decode import PROFILE, VARIANTS, load_engine, session_config_item  # noqa: E402
from peers import Stepper, time_steps  # noqa: E402

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
SHORT_KERNEL_US = 5.0


def kernel_name(name: str) -> str:
    """A kernel's name without its return type, template arguments and parameters."""
    name = re.sub(r"^void\s+", "", name.strip())
    depth, out = 0, []
    for ch in name:  # drop <...> (nested) and everything from the parameter list on
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif ch == "(" and depth == 0:
            break
        elif depth == 0:
            out.append(ch)
    return "".join(out).strip() or name[:80]


def load_trace(path: Path) -> list[dict]:
    """The complete ("X") events of a Chrome trace, as PyTorch's profiler writes it."""
    data = json.loads(Path(path).read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def copy_direction(event: dict) -> str:
    """HtoD, DtoH, DtoD, ... from a memcpy event's name ("Memcpy HtoD (Pageable -> Device)")."""
    m = re.search(r"\b([HDAP]to[HDAP])\b", event.get("name", ""))
    return m.group(1) if m else event.get("name", "memcpy")


def summarize(events: list[dict], steps: int, wall_us_per_step: float) -> dict:
    """Per step: GPU busy and idle time, kernels, copies by direction, and the kernels by name."""
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    kernels = [e for e in gpu if e["cat"] == "kernel"]
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in kernels:
        by_name[kernel_name(e["name"])].append(float(e["dur"]))
    copies: dict[str, dict] = defaultdict(lambda: {"count": 0, "bytes": 0, "us": 0.0})
    for e in gpu:
        if e["cat"] == "gpu_memcpy":
            c = copies[copy_direction(e)]
            c["count"] += 1
            c["bytes"] += int((e.get("args") or {}).get("bytes", 0))
            c["us"] += float(e["dur"])
    busy = busy_us([(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in gpu]) / steps
    short = sum(d for ds in by_name.values() for d in ds if d < SHORT_KERNEL_US) / steps
    rows = sorted(({"kernel": name, "calls_per_step": len(ds) / steps, "us_per_step": sum(ds) / steps,
                    "us_per_call": statistics.fmean(ds)} for name, ds in by_name.items()),
                  key=lambda r: -r["us_per_step"])
    for r in rows:
        r["percent_of_busy"] = 100.0 * r["us_per_step"] / busy if busy else 0.0
    return {"steps": steps, "wall_us_per_step": wall_us_per_step, "gpu_busy_us_per_step": busy,
            "gpu_idle_us_per_step": max(0.0, wall_us_per_step - busy),
            "kernels_per_step": len(kernels) / steps, "short_kernel_us_per_step": short,
            "copies_per_step": {k: {"count": v["count"] / steps, "bytes": v["bytes"] / steps, "us": v["us"] / steps}
                                for k, v in sorted(copies.items())},
            "memsets_per_step": sum(e["cat"] == "gpu_memset" for e in gpu) / steps, "kernels": rows}


def format_summary(s: dict, top: int = 30) -> str:
    lines = [f"decode step: {s['wall_us_per_step'] / 1000:.3f} ms wall (median), GPU busy "
             f"{s['gpu_busy_us_per_step'] / 1000:.3f} ms, GPU idle {s['gpu_idle_us_per_step'] / 1000:.3f} ms; "
             f"{s['kernels_per_step']:.0f} kernels and {s['memsets_per_step']:.0f} memsets a step; kernels under "
             f"{SHORT_KERNEL_US:.0f} us: {s['short_kernel_us_per_step'] / 1000:.3f} ms a step"]
    copies = s["copies_per_step"]
    lines.append("copies a step: " + (", ".join(f"{d} {c['count']:.1f} ({c['bytes']:.0f} B, {c['us']:.1f} us)"
                                                 for d, c in copies.items()) if copies else "none"))
    lines += ["", "| kernel | calls a step | us a step | us a call | % of GPU busy |", "|---|---|---|---|---|"]
    for r in s["kernels"][:top]:
        lines.append(f"| {r['kernel'][:90]} | {r['calls_per_step']:.1f} | {r['us_per_step']:.1f} | "
                     f"{r['us_per_call']:.2f} | {r['percent_of_busy']:.1f}% |")
    rest = s["kernels"][top:]
    if rest:
        lines.append(f"| ({len(rest)} other kernels) | {sum(r['calls_per_step'] for r in rest):.1f} | "
                     f"{sum(r['us_per_step'] for r in rest):.1f} | | "
                     f"{sum(r['percent_of_busy'] for r in rest):.1f}% |")
    return "\n".join(lines)


def trace_decode(bundle: Path, *, profile: str, variant: str, context: int, steps: int,
                 profiler_warmup: bool = False, session_config: dict[str, str] | None = None) -> dict:
    """`profiler_warmup`: start and stop the profiler once before the session exists. PyTorch
    documents trouble tracing a CUDA graph recorded before the profiler's first use (its
    own `_init_for_cuda_graphs` does this, "for CUDA < 12"); one report has the warm-up
    losing every kernel on CUDA 13, so it is a retry, not the default."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile as torch_profile
    except ImportError as exc:
        raise SystemExit(f"the kernel trace needs PyTorch with CUDA ({exc})") from exc
    if not torch.cuda.is_available():
        raise SystemExit("PyTorch sees no CUDA device: the kernel trace needs PyTorch built for CUDA")
    if profiler_warmup:
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]):
            pass
    engine = load_engine(bundle, profile, variant, session_config)
    d, vocab = engine.decoder, engine.bundle.architecture.vocab_size
    cache = d.new_cache(context + 2 * steps + 4)
    token = int(np.argmax(d.prefill(cache, prompt_ids(context, vocab, 2))[-1]))
    for _ in range(3):  # the first steps allocate; onnxruntime records the CUDA graph on the second
        token = int(np.argmax(d.decode(cache, token)))
    stepper = Stepper(lambda t: int(np.argmax(d.decode(cache, t))), token)
    wall = time_steps(stepper, steps)  # as peers.py times a step
    token = stepper.token
    torch.cuda.synchronize()
    # CPU activity too: PyTorch's profiler wants it beside CUDA's; its events are left out below
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            token = int(np.argmax(d.decode(cache, token)))
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = load_trace(trace)
    summary = summarize(events, steps, statistics.median(wall) * 1e6)
    if not summary["kernels"]:
        raise SystemExit("the trace holds no kernels: CUPTI did not see onnxruntime's launches")
    return {"bundle": str(bundle), "variant": variant, "precision": engine.bundle.precision, "context": context,
            **summary}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--profile", default=PROFILE)
    p.add_argument("--variant", choices=VARIANTS, default="cuda")
    p.add_argument("--session-config", type=session_config_item, action="append", default=[], metavar="KEY=VALUE",
                   help="an onnxruntime session config entry added to the profile's (repeatable)")
    p.add_argument("--context", type=int, default=128, help="tokens held when the traced steps run")
    p.add_argument("--steps", type=int, default=16, help="decode steps timed, then as many traced")
    p.add_argument("--top", type=int, default=30, help="kernels listed (the rest summed in one row)")
    p.add_argument("--json", type=Path, help="write the summary to this file")
    p.add_argument("--profiler-warmup", action="store_true",
                   help="start and stop the profiler once before the session records a CUDA graph")
    a = p.parse_args(argv)
    if not (a.bundle / "bundle.json").is_file():
        raise SystemExit(f"--bundle {a.bundle}: no bundle.json there")
    result = trace_decode(a.bundle, profile=a.profile, variant=a.variant, context=a.context, steps=a.steps,
                          profiler_warmup=a.profiler_warmup, session_config=dict(a.session_config))
    config = "".join(f", {k}={v}" for k, v in a.session_config)
    print(f"{a.bundle.name} ({result['precision']}), {a.variant}{config}, {a.context} tokens of context, {a.steps} steps")
    print(format_summary(result, a.top))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    from edge_runtime.cli import run_script

    sys.exit(run_script(main))
