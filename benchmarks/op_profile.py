"""Where a decode step's time goes: onnxruntime's profiler over decode steps of a bundle.

    python benchmarks/op_profile.py --bundle B                      # contexts 128 and 2048, 2 threads
    python benchmarks/op_profile.py --bundle B --contexts 512 --threads 1 --steps 32

For each context it fills the KV cache with a random prompt of that length (one prefill,
profiled too), then profiles ``--steps`` decode steps (the engine's decoder, I/O binding,
argmax after each) and prints, per operator type, milliseconds per step and the share of
the kernels' time -- e.g. MatMulNBits (the weights) against GroupQueryAttention (the KV
cache), which tells whether a step is bound by the weights or by the context -- and the
same for the prefill. The profiler adds a
little overhead to every node: compare shares, and take tokens/s from the benchmarks that
do not profile. ``--json FILE`` writes the rows.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # decode_graphs, beside this file


CONTROL_FLOW = ("If", "Loop", "Scan")


def profile_decode(bundle_dir: Path, *, context: int, steps: int, threads: int) -> dict:
    import numpy as np

    from decode_graphs import cpu_decoder
    from edge_runtime.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    with tempfile.TemporaryDirectory(prefix="op-profile-") as tmp:
        decoder, session, _ = cpu_decoder(bundle.graph_path, bundle.architecture, bundle.graph_flavour,
                                          threads=threads, max_length=context + steps + 1,
                                          profile_prefix=str(Path(tmp) / "decode"))
        cache = decoder.new_cache(context + steps + 1)
        rng = np.random.default_rng(0)
        prompt = np.asarray([1, *rng.integers(100, bundle.architecture.vocab_size - 16, size=context - 1)])
        token = int(np.argmax(decoder.prefill(cache, prompt)[-1]))
        for _ in range(steps):
            token = int(np.argmax(decoder.decode(cache, token)))
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    prefill_runs = len(runs) - steps  # the prompt's run(s) come first
    first_step = runs[prefill_runs]["ts"]
    decode_ops: dict[str, float] = collections.Counter()
    prefill_ops: dict[str, float] = collections.Counter()
    for e in events:
        # an If's time is its branch's nodes, which have events of their own: count those only
        if (e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                and e["args"]["op_name"] not in CONTROL_FLOW):
            (decode_ops if e["ts"] >= first_step else prefill_ops)[e["args"]["op_name"]] += e["dur"]
    step_us = sum(r["dur"] for r in runs[prefill_runs:]) / steps
    prefill_us = sum(r["dur"] for r in runs[:prefill_runs])
    return {"context": context, "steps": steps, "threads": threads, "step_ms": round(step_us / 1000, 3),
            "kernels_ms": round(sum(decode_ops.values()) / steps / 1000, 3), "ops": _shares(decode_ops, steps),
            "prefill_ms": round(prefill_us / 1000, 3), "prefill_ops": _shares(prefill_ops, 1)}


def _shares(per_op: dict[str, float], runs: int) -> list[dict]:
    total = sum(per_op.values()) or 1.0
    return [{"op": op, "ms_per_step": round(us / runs / 1000, 3), "share": round(us / total, 4)}
            for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])]


def format_rows(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        lines.append(f"context {r['context']}, {r['threads']} threads: {r['step_ms']:.2f} ms a step "
                     f"({r['kernels_ms']:.2f} ms in kernels), {r['steps']} steps")
        lines.append("| operator | ms per step | share of kernel time |\n|---|---|---|")
        lines += [f"| {o['op']} | {o['ms_per_step']:.3f} | {100 * o['share']:.1f} % |" for o in r["ops"]]
        lines.append(f"\nprefill of {r['context']} tokens: {r['prefill_ms']:.1f} ms")
        lines.append("| operator | ms | share of kernel time |\n|---|---|---|")
        lines += [f"| {o['op']} | {o['ms_per_step']:.1f} | {100 * o['share']:.1f} % |" for o in r["prefill_ops"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 2048], help="tokens held when the steps run")
    p.add_argument("--steps", type=int, default=40, help="decode steps profiled per context")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", type=Path, help="write the rows to this file")
    args = p.parse_args(argv)
    if args.steps < 1 or any(c < 1 for c in args.contexts):
        p.error("--steps and --contexts must be positive")
    rows = [profile_decode(args.bundle, context=c, steps=args.steps, threads=args.threads) for c in args.contexts]
    print(format_rows(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
