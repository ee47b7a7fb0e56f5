"""Do CUDA-graph replays give plain CUDA's logits? Teacher-forced, step by step, on a GPU.

    python benchmarks/gpu_graph_replay.py --bundle B [--bundle B2] [--steps 40]

For each bundle (an nvidia-gpu export, e.g. of the demo model), two engines as the daemon
runs them, plain CUDA and CUDA graphs (benchmarks/gpu_decode.py's ``load_engine``), take a
short prompt and then a 701-token one (700 tokens of edge_runtime/sampling.py after BOS).
The graphed engine records its decode step during the short prompt, so the long one
replays a recording made at another length. Each prompt is prefilled, then `--steps`
decode steps are fed plain CUDA's own greedy tokens on both engines; the script prints
the largest |logit difference| at each step and the steps whose argmax differs (with plain
CUDA's margin between its two best logits there). A correct replay prints 0.000 or
rounding noise throughout; a replay that keeps a stale sequence length drifts by whole
logits within a few steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import load_engine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def teacher_forced(engine, ids: np.ndarray, forced: list[int]) -> np.ndarray:
    """Logits [1 + len(forced), V]: the prompt's last position, then after each forced token."""
    d = engine.decoder
    cache = d.new_cache(len(ids) + len(forced))
    steps = [d.prefill(cache, ids)[-1].copy()]
    steps += [np.array(d.decode(cache, t), dtype=np.float32) for t in forced]
    return np.stack(steps)


def greedy_continuation(engine, ids: np.ndarray, n: int) -> list[int]:
    d = engine.decoder
    cache = d.new_cache(len(ids) + n)
    token, out = int(d.prefill(cache, ids)[-1].argmax()), []
    for _ in range(n):
        out.append(token)
        token = int(np.asarray(d.decode(cache, token)).argmax())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, action="append", required=True)
    p.add_argument("--profile", default="nvidia-gpu")
    p.add_argument("--steps", type=int, default=40)
    a = p.parse_args()
    for bundle in a.bundle:
        plain, graphed = (load_engine(bundle, a.profile, v) for v in ("cuda", "cuda-graph"))
        tok = plain.tokenizer
        prompts = {"short": [tok.bos_id] + tok.encode("def fibonacci(n):\n    "),
                   "long": [tok.bos_id] + tok.encode((REPO / "edge_runtime" / "sampling.py").read_text())[:700]}
        for name, ids in prompts.items():
            ids = np.asarray(ids)
            forced = greedy_continuation(plain, ids, a.steps)
            want, got = teacher_forced(plain, ids, forced), teacher_forced(graphed, ids, forced)
            diff = np.abs(want - got).max(axis=1)
            print(f"{bundle} {name} prompt ({len(ids)} ids), |plain - graph| at each step: "
                  + " ".join(f"{x:.3f}" for x in diff))
            for i in np.flatnonzero(want.argmax(axis=1) != got.argmax(axis=1)):
                top2 = np.sort(want[i])[-2:]
                print(f"  step {i}: argmax {want[i].argmax()} vs {got[i].argmax()} "
                      f"(plain's top-2 margin {top2[1] - top2[0]:.4f})")


if __name__ == "__main__":
    from edge_runtime.cli import run_script

    sys.exit(run_script(main))
