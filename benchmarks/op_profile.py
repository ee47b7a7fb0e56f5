"""Where a decode step's time goes: onnxruntime's profiler over decode steps of a bundle.

    python benchmarks/op_profile.py --bundle B                      # contexts 128 and 2048, 2 threads
    python benchmarks/op_profile.py --bundle B --contexts 512 --threads 1 --steps 32

For each context it fills the KV cache with a random prompt of that length (one prefill,
profiled too), then profiles ``--steps`` decode steps (the engine's decoder, I/O binding,
argmax after each) and prints, per operator type, milliseconds per step and the share of
the kernels' time -- e.g. MatMulNBits (the weights) against GroupQueryAttention (the KV
cache), which tells whether a step is bound by the weights or by the context -- and the
same for the prefill. A second table takes the weights' nodes (MatMul, MatMulNBits) one
projection at a time (q/k/v, o, gate, up, down over all layers, lm_head): milliseconds per
step, the bytes of weights they read, the rate they read them at and that rate as a share
of the machine's bandwidth, measured first as ``benchmarks/peers.py`` does: the copy
bandwidth (bytes read + written, the issue's roofline) and the read bandwidth (a max over
the array, which only reads, as the weights' nodes do). A share of the read bandwidth well
below 100 % on every projection means the kernel, not memory, bounds the step. The
profiler adds a little overhead to every node: compare shares, and take tokens/s from the
benchmarks that do not profile. ``--json FILE`` writes the bandwidth and the rows.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # decode_graphs, beside this file


CONTROL_FLOW = ("If", "Loop", "Scan")
WEIGHT_OPS = ("MatMul", "MatMulNBits")


def weight_bytes_by_node(graph_path: Path) -> dict[str, int]:
    """Bytes of the initializers each MatMul / MatMulNBits node on weights reads (weights,
    scales, zero points), from the graph's tensor headers (the data stays on disk)."""
    from edge_runtime.onnx_proto_scan import scan_graph

    scan = scan_graph(graph_path)
    sizes = {name: t.nbytes for name, t in scan.initializers.items()}
    read = {n.name: sum(sizes.get(i, 0) for i in n.inputs) for n in scan.nodes if n.op_type in WEIGHT_OPS}
    return {name: nbytes for name, nbytes in read.items() if nbytes}  # not the two-pass head's rows x activations


def projection(node_name: str) -> str:
    """'/model/layers.3/mlp/down_proj/MatMul_Q4' -> 'down_proj'; '/lm_head/MatMul_Q8' -> 'lm_head'."""
    parts = [p for p in node_name.split("/") if p]
    return parts[-2] if len(parts) > 1 else node_name


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
    decode_ops, prefill_ops, weight_nodes = op_times(events, first_step)
    step_us = sum(r["dur"] for r in runs[prefill_runs:]) / steps
    prefill_us = sum(r["dur"] for r in runs[:prefill_runs])
    return {"context": context, "steps": steps, "threads": threads, "step_ms": round(step_us / 1000, 3),
            "kernels_ms": round(sum(decode_ops.values()) / steps / 1000, 3), "ops": _shares(decode_ops, steps),
            "prefill_ms": round(prefill_us / 1000, 3), "prefill_ops": _shares(prefill_ops, 1),
            "weights": _weight_rates(weight_nodes, weight_bytes_by_node(bundle.graph_path), steps)}


def op_times(events: list[dict], first_step: float) -> tuple[dict, dict, dict]:
    """Microseconds by operator type of the decode steps (from `first_step` on) and of the
    prefill before them, and of each weight node in the decode steps. A control-flow node's
    (an int8-cache graph's If, export/kv_cache_quant.py) branch nodes have events of their
    own, counted under their types; the node itself counts what its event spans beyond them,
    as "If (own)": running a branch costs that much besides the branch's kernels."""
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    inner = sorted((e["ts"], e["dur"]) for e in kernels if e["args"]["op_name"] not in CONTROL_FLOW)
    starts = [ts for ts, _ in inner]
    decode_ops: dict[str, float] = collections.Counter()
    prefill_ops: dict[str, float] = collections.Counter()
    weight_nodes: dict[str, float] = collections.Counter()  # decode time of each weight node
    for e in kernels:
        op, ops = e["args"]["op_name"], decode_ops if e["ts"] >= first_step else prefill_ops
        if op in CONTROL_FLOW:
            lo, hi = bisect.bisect_left(starts, e["ts"]), bisect.bisect_left(starts, e["ts"] + e["dur"])
            ops[f"{op} (own)"] += max(0.0, e["dur"] - sum(d for _, d in inner[lo:hi]))
            continue
        ops[op] += e["dur"]
        if e["ts"] >= first_step and op in WEIGHT_OPS:
            weight_nodes[e["name"].removesuffix("_kernel_time")] += e["dur"]
    return decode_ops, prefill_ops, weight_nodes


def _weight_rates(node_us: dict[str, float], node_bytes: dict[str, int], runs: int) -> list[dict]:
    """Per projection, then all of them: nodes, ms per step, MiB read per step, GB/s."""
    us: dict[str, float] = collections.Counter()
    nbytes: dict[str, int] = collections.Counter()
    nodes: dict[str, int] = collections.Counter()
    for name, t in node_us.items():
        if name not in node_bytes:  # a MatMul of two activations (the two-pass lm_head's second pass)
            continue
        key = projection(name)
        us[key] += t / runs
        nbytes[key] += node_bytes[name]
        nodes[key] += 1
    rows = [{"weight": k, "nodes": nodes[k], "ms_per_step": round(us[k] / 1000, 3),
             "mib": round(nbytes[k] / 2**20, 2), "gb_per_s": round(nbytes[k] / (us[k] * 1e3), 2) if us[k] else 0.0}
            for k in sorted(us, key=lambda k: -us[k])]
    total_us, total_bytes = sum(us.values()), sum(nbytes.values())
    if rows:
        rows.append({"weight": "all", "nodes": sum(nodes.values()), "ms_per_step": round(total_us / 1000, 3),
                     "mib": round(total_bytes / 2**20, 2),
                     "gb_per_s": round(total_bytes / (total_us * 1e3), 2) if total_us else 0.0})
    return rows


def _shares(per_op: dict[str, float], runs: int) -> list[dict]:
    total = sum(per_op.values()) or 1.0
    return [{"op": op, "ms_per_step": round(us / runs / 1000, 3), "share": round(us / total, 4)}
            for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])]


def format_rows(rows: list[dict], bandwidth: dict | None = None) -> str:
    """The tables; ``bandwidth`` is ``peers.step_bandwidth``'s result (or None: no shares)."""
    lines = []
    if bandwidth:
        lines.append(f"memory bandwidth: copy {bandwidth['bandwidth'] / 1e9:.1f} GB/s (numpy, read + write), "
                     f"read {bandwidth['read_bandwidth'] / 1e9:.1f} GB/s (numpy max)\n")

    def share(w: dict) -> str:
        if not bandwidth:
            return ""
        rate = w["gb_per_s"] * 1e9
        return f" {100 * rate / bandwidth['bandwidth']:.0f} % | {100 * rate / bandwidth['read_bandwidth']:.0f} % |"

    for r in rows:
        lines.append(f"context {r['context']}, {r['threads']} threads: {r['step_ms']:.2f} ms a step "
                     f"({r['kernels_ms']:.2f} ms in kernels), {r['steps']} steps")
        lines.append("| operator | ms per step | share of kernel time |\n|---|---|---|")
        lines += [f"| {o['op']} | {o['ms_per_step']:.3f} | {100 * o['share']:.1f} % |" for o in r["ops"]]
        lines.append("\n| weights | nodes | ms per step | MiB read per step | GB/s |"
                     + (" of copy bandwidth | of read bandwidth |\n|---|---|---|---|---|---|---|" if bandwidth
                        else "\n|---|---|---|---|---|"))
        lines += [f"| {w['weight']} | {w['nodes']} | {w['ms_per_step']:.3f} | {w['mib']:.1f} | {w['gb_per_s']:.1f} |"
                  + share(w) for w in r["weights"]]
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
    p.add_argument("--bandwidth-mib", type=int, default=512,
                   help="array copied to measure the memory bandwidth (0: do not measure)")
    p.add_argument("--json", type=Path, help="write the rows to this file")
    args = p.parse_args(argv)
    if args.steps < 1 or any(c < 1 for c in args.contexts) or args.bandwidth_mib < 0:
        p.error("--steps and --contexts must be positive, --bandwidth-mib 0 or more")
    bandwidth = None
    if args.bandwidth_mib:
        from peers import step_bandwidth

        bandwidth = step_bandwidth(argparse.Namespace(bandwidth_mib=args.bandwidth_mib, threads=args.threads))
    rows = [profile_decode(args.bundle, context=c, steps=args.steps, threads=args.threads) for c in args.contexts]
    print(format_rows(rows, bandwidth))
    if args.json:
        args.json.write_text(json.dumps({"bandwidth": bandwidth, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    from edge_runtime.cli import run_script

    sys.exit(run_script(main))
