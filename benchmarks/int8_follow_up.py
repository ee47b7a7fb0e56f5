"""Where the int8 KV cache's two attention paths cross: S new tokens after P cached ones
(a follow-up over the prompt cache) through the float branch (the cache dequantized, float
attention, the new rows requantized) against onnxruntime's int8 kernel in place, on an
int8-cache bundle of the fused graph. The graph's rule (export/kv_cache_quant.py,
INT8_STEP_ROWS_MAX) sends up to 32 rows after cached ones to the kernel; this measures both
paths everywhere by two in-memory copies of the graph with that threshold set to 1 (always float)
and to a huge value (always the kernel).

    python benchmarks/int8_follow_up.py --bundle ~/.cache/edge-runtime/peers-bench/edge-runtime \\
        [--past 100 500 1900] [--new 8 32 64 100] [--threads 2] [--repeats 3]

Prints one table: P, S, best-of-repeats milliseconds of each path, the faster one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

THRESHOLD = "kv_cache.step_rows_max"  # the initializer the graph's If condition compares S with


def graph_with_threshold(bundle: Path, value: int) -> bytes:
    """The bundle's graph, weights inlined, with the int8 kernel's row limit set to `value`
    (onnxruntime refuses external data outside the model's folder, so no copy on disk)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(bundle / "model.onnx"))
    found = [i for i, t in enumerate(model.graph.initializer) if t.name == THRESHOLD]
    if not found:
        raise SystemExit(f"{bundle} has no {THRESHOLD}: not an int8-cache bundle of this version (re-export it)")
    model.graph.initializer[found[0]].CopyFrom(numpy_helper.from_array(np.array([value], np.int64), THRESHOLD))
    # since graph revision 5 the metadata records the share too, and the decoder binds a run's
    # outputs by it (the float branch returns only the new rows): it must say the same
    from edge_runtime.gqa_decoder import META_INT8_KERNEL_ROWS

    for prop in model.metadata_props:
        if prop.key == META_INT8_KERNEL_ROWS:
            prop.value = str(value)
    return model.SerializeToString()


def time_follow_ups(graph: bytes, arch, *, past: list[int], new: list[int], threads: int,
                    repeats: int) -> dict[tuple[int, int], float]:
    import onnxruntime as ort

    from edge_runtime.gqa_decoder import SharedKVDecoder, graph_max_length
    from edge_runtime.memory_fit import PREFILL_CHUNK

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    # the buffers as the engine has them: the graph's full length (the float branch pads its output
    # to it), prompts in the engine's chunks
    length = max(graph_max_length(session) or 0, max(past) + max(new) + 1)
    decoder = SharedKVDecoder(ort, session, arch, device="cpu", max_length=length, prefill_chunk=PREFILL_CHUNK)
    rng = np.random.default_rng(0)
    times = {}
    for p in past:
        for s in new:
            ids = rng.integers(100, arch.vocab_size - 100, p + s)
            decoder.prefill(decoder.new_cache(p + s), ids[:p])  # the past, once
            best = float("inf")
            for _ in range(repeats):
                cache = decoder.new_cache(p + s, ids)  # keeps all but the last id of ids[:p + s] ...
                cache.length = p  # ... of which the first p: the follow-up is s rows
                t0 = time.perf_counter()
                decoder.prefill(cache, ids[p:])
                best = min(best, time.perf_counter() - t0)
            times[(p, s)] = best * 1000
    return times


def main(argv: list[str] | None = None) -> int:
    from edge_runtime.bundle import load_bundle

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="an int8-KV-cache bundle of the fused graph")
    parser.add_argument("--past", type=int, nargs="+", default=[100, 500, 1900])
    parser.add_argument("--new", type=int, nargs="+", default=[8, 32, 64, 100])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    bundle = load_bundle(args.bundle)
    results = {}
    for path, threshold in (("float branch", 1), ("int8 kernel", 1 << 30)):
        results[path] = time_follow_ups(graph_with_threshold(bundle.root, threshold), bundle.architecture,
                                        past=args.past, new=args.new, threads=args.threads, repeats=args.repeats)
    print(f"{bundle.root.name}: S new tokens after P cached ones, best of {args.repeats}, {args.threads} threads")
    print("| P | S | float branch | int8 kernel | faster |")
    print("|---|---|---|---|---|")
    for p, s in results["float branch"]:
        f, k = results["float branch"][(p, s)], results["int8 kernel"][(p, s)]
        print(f"| {p} | {s} | {f:.0f} ms | {k:.0f} ms | {'int8 kernel' if k < f else 'float branch'} |")
    return 0


if __name__ == "__main__":
    from edge_runtime.cli import run_script

    sys.exit(run_script(main))
