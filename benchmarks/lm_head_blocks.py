"""The lm_head alone: onnxruntime's MatMulNBits at batch 1 for each bit width and block size,
cache-cold, as a decode step meets it (docs/performance.md, "The lm_head's blocks").

    python benchmarks/lm_head_blocks.py                    # K 2048, N 32016 (the peers' checkpoint)
    python benchmarks/lm_head_blocks.py --k 4096           # a 7B's lm_head
    python benchmarks/lm_head_blocks.py --layouts 8:32 8:128 --threads 1

A decode step reads the lm_head after every layer's weights, so it comes from memory, not
from the cache: each layout is built ``--copies`` times (together larger than the last-level
cache) and the copies are run in turn, every layout in every round. Random codes and scales: the time does not depend on
the values. Prints one row per layout: the bytes read (codes + float32 scales), the median
milliseconds per run and the bytes per second that makes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def matmul_nbits_session(k: int, n: int, bits: int, block: int, accuracy_level: int, threads: int,
                         rng: np.random.Generator):
    """A one-node graph: Y[1, n] = X[1, k] @ W, W as symmetric MatMulNBits blocks."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    k_blocks = -(-k // block)
    codes = rng.integers(0, 256, size=(n, k_blocks, block * bits // 8), dtype=np.uint8)
    scales = (rng.random(n * k_blocks, dtype=np.float32) * 0.01).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["X", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=accuracy_level)
    graph = helper.make_graph(
        [node], "lm_head", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor("B", TensorProto.UINT8, codes.shape, codes.tobytes(), raw=True),
         helper.make_tensor("S", TensorProto.FLOAT, scales.shape, scales.tobytes(), raw=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # many sessions live at once here: idle pools that spin would take the cores from the one running
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, codes.nbytes + scales.nbytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=2048, help="hidden size (default 2048)")
    parser.add_argument("--n", type=int, default=32016, help="vocabulary (default 32016)")
    parser.add_argument("--layouts", nargs="+", default=["4:32", "8:32", "8:64", "8:128", "8:256"],
                        metavar="BITS:BLOCK", help="default: 4:32 8:32 8:64 8:128 8:256")
    parser.add_argument("--accuracy-level", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--copies", type=int, default=6, help="copies run in turn (default 6)")
    parser.add_argument("--runs", type=int, default=40, help="rounds over the copies (default 40)")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    x = rng.random((1, args.k), dtype=np.float32)
    print(f"lm_head K {args.k}, N {args.n}, accuracy level {args.accuracy_level}, {args.threads} threads, "
          f"{args.copies} copies run in turn, median of {args.runs * args.copies} runs")
    print(f"{'bits':>4} {'block':>5} {'MiB read':>9} {'ms':>7} {'GB/s':>6}")
    layouts = [tuple(int(v) for v in layout.split(":")) for layout in args.layouts]
    built = {layout: [matmul_nbits_session(args.k, args.n, *layout, args.accuracy_level, args.threads, rng)
                      for _ in range(args.copies)] for layout in layouts}
    for sessions in built.values():  # first runs: onnxruntime's prepacking
        for session, _ in sessions:
            session.run(None, {"X": x})
    times: dict[tuple[int, int], list[float]] = {layout: [] for layout in layouts}
    for _ in range(args.runs):  # the layouts in turn in every round: a busy moment hits them alike
        for layout, sessions in built.items():
            for session, _ in sessions:
                start = time.perf_counter()
                session.run(None, {"X": x})
                times[layout].append(time.perf_counter() - start)
    for (bits, block), sessions in built.items():
        nbytes = sessions[0][1]
        ms = statistics.median(times[(bits, block)]) * 1e3
        print(f"{bits:>4} {block:>5} {nbytes / 2**20:>9.1f} {ms:>7.2f} {nbytes / ms / 1e6:>6.1f}")
    return 0


if __name__ == "__main__":
    from edge_runtime.cli import run_script

    sys.exit(run_script(main))
