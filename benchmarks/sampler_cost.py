"""What the sampler costs a token, beside a decode step: `Sampler.sample` on one logits row
of a Code Llama vocabulary (32016), for greedy decoding, the default nucleus sampling
(temperature 0.6, top-p 0.9), top-k 40 and the repetition penalties.

    python benchmarks/sampler_cost.py [--vocab 32016] [--tokens 3000] [--spread 4]

Logits are normal with standard deviation `--spread` (a trained model's next-token
logits spread about so: the nucleus holds a few to a few dozen tokens); the sampler's
cost does not depend on the model, only on the vocabulary and the nucleus's size.
Prints microseconds a token (median of 5 blocks)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from edge_runtime.sampling import Sampler
from edge_runtime.types import SamplingParams

CASES = {
    "greedy": SamplingParams(temperature=0.0),
    "temperature 0.6, top-p 0.9 (default)": SamplingParams(seed=1),
    "temperature 0.8, top-k 40, top-p 0.95": SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=1),
    "default + repeat_penalty 1.1 (last 64)": SamplingParams(seed=1, repeat_penalty=1.1),
    "greedy + repeat_penalty 1.1 (last 64)": SamplingParams(temperature=0.0, repeat_penalty=1.1),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32016)
    ap.add_argument("--tokens", type=int, default=3000, help="tokens a block (5 blocks)")
    ap.add_argument("--spread", type=float, default=4.0, help="standard deviation of the logits")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((64, args.vocab)) * args.spread).astype(np.float32)
    context = rng.integers(0, args.vocab, 512).tolist()
    print(f"vocabulary {args.vocab}, logits N(0, {args.spread:g}^2), {args.tokens} tokens x 5 blocks")
    print(f"{'sampler':<42} {'us/token':>9}")
    for name, params in CASES.items():
        sampler = Sampler(params, context)
        blocks = []
        for _ in range(5):
            start = time.perf_counter()
            for i in range(args.tokens):
                sampler.sample(rows[i % len(rows)])
            blocks.append((time.perf_counter() - start) / args.tokens * 1e6)
        print(f"{name:<42} {statistics.median(blocks):9.1f}")
    return 0


if __name__ == "__main__":
    from edge_runtime.cli import run_script

    sys.exit(run_script(main))
