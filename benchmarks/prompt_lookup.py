"""Prompt lookup (edge_runtime/prompt_lookup.py): what a run of a token and its drafts costs,
and what the drafts save on code that repeats its context.

    python benchmarks/prompt_lookup.py [--bundle B | --checkpoint DIR] [--demo-bundle B]
        [--max-tokens 128] [--threads 2] [--contexts 128 2048] [--ngram-min 3] [--json OUT]

1. The cost, on ``--bundle``, or on the int4 bundle (cpu-x86_64's layout, rounded to nearest:
   the same bytes and kernels) exported once into ``--workdir`` from ``--checkpoint`` (by
   default the CPU peers benchmark's 8-layer, 2048-wide random checkpoint,
   ``benchmarks/peers.py``, built here if missing): after a prompt of each ``--contexts``
   tokens (128 by default; the projection uses the first), the time of one
   decode step and of one ``verify`` run of S = 2..9 ids, alternated, the best of
   ``--rounds``; each as a multiple of the step.
2. The saving, on the trained demo model's int4 bundle (``--demo-bundle``; by default
   exported here from the cached demo model): greedy requests, and requests sampled as the
   protocol's default does (temperature 0.6, top-p 0.9, seed 0), with prompt lookup on and off
   on a few prompts -- code that repeats its context (a function restated, a class mirroring
   the one above it) and code that does not -- their tokens (the same?), the drafts made and
   confirmed, the runs, and the wall-clock tokens/s both ways (after an untimed run each, then
   timed twice in both orders, the faster kept; the demo model is small: a
   step is mostly the loop's fixed cost, so this is not a 7B's speed).
3. The projection: each prompt's runs (ids per run, from part 2) priced with part 1's costs:
   the decode time prompt lookup would take at the bundle's shape against one step per token.
4. The same requests on part 1's bundle itself (random weights: what it generates repeats
   only by chance), timed with prompt lookup on and off: the wall-clock effect at that shape,
   and what drafting costs where little is confirmed. Their tokens differ: random weights
   leave near-ties everywhere, and a run's kernels round differently from a step's.

Random weights (part 1) do not repeat anything, so part 2 needs the trained model; the
projection assumes the bigger model confirms what the demo model does, which a real Code
Llama on real edits would rather exceed (it copies more faithfully).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from edge_runtime.prompt_lookup import NGRAM_MIN, PromptLookup
from edge_runtime.types import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompt_cache import profile_with_threads  # noqa: E402  (the bundle's profile with N threads)

HERE = Path(__file__).resolve().parent
# greedy, and the protocol's default sampling (temperature 0.6, top-p 0.9) with a fixed seed
SAMPLINGS = {"greedy": SamplingParams(temperature=0.0),
             "t0.6 p0.9": SamplingParams(temperature=0.6, top_p=0.9, seed=0)}
SAMPLING = HERE.parent / "edge_runtime" / "sampling.py"


def prompts() -> dict[str, str]:
    source = SAMPLING.read_text()
    body = source[source.index("def softmax"):source.index("def top_p_filter")]
    return {
        "restated function": f"{body}\n\n# the same, unchanged:\n{body[:60]}",
        "repeated block": "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n    return a + b\n\n\ndef add(",
        "continue a file": source[:1200],
        "new code": "import os\nimport sys\n\n\ndef main():\n",
    }


def cost_table(bundle: Path, sizes: list[int], rounds: int, threads: int, context: int = 128) -> dict[int, float]:
    """Seconds of a decode step (S=1) and of verify runs of S ids, after a `context`-token prompt."""
    from edge_runtime.engine import Engine

    engine = Engine.from_bundle(bundle, profile=profile_with_threads(bundle, threads))
    d = engine.decoder
    if not d.verify_rows_max:
        raise SystemExit(f"{bundle}: its graph has no logits_start input (exported before prompt lookup)")
    rng = np.random.default_rng(0)
    cache = d.new_cache(context + max(sizes) + 8)
    d.prefill(cache, rng.integers(100, 30000, context))
    base = cache.length
    best = {s: float("inf") for s in [1, *sizes]}
    for _ in range(rounds):
        for s in best:
            ids = rng.integers(100, 30000, s)
            t = time.perf_counter()
            if s == 1:
                d.decode(cache, int(ids[0]))
            else:
                d.verify(cache, ids)
            best[s] = min(best[s], time.perf_counter() - t)
            cache.rewind(cache.length - base)
    return best


def cost_bundle(checkpoint: Path, out: Path) -> Path:
    """The benchmark shape's int4 bundle (exported once; the checkpoint built if missing)."""
    if (out / "bundle.json").is_file():
        return out
    from edge_export.pipeline import ExportOptions, run_export
    from edge_export.progress import Progress

    if not (checkpoint / "config.json").is_file():
        from edge_export.synthetic import build_checkpoint_streamed

        build_checkpoint_streamed(checkpoint, hidden_size=2048, intermediate_size=5504, num_layers=8, num_heads=16,
                                  num_kv_heads=16, seed=0, dtype="float16", max_position_embeddings=16384)
    run_export(ExportOptions(checkpoint=checkpoint, profile="cpu-x86_64", output=out, precision="int4",
                             algorithm="rtn", skip_fidelity=True, max_context=4096), Progress(5))
    return out


def demo_bundle(out: Path) -> Path:
    """The demo model's int4 bundle for this machine's CPU profile (exported once)."""
    if (out / "bundle.json").is_file():
        return out
    from edge_export.demo_model import ensure_demo_model
    from edge_export.pipeline import ExportOptions, run_export
    from edge_export.progress import Progress

    run_export(ExportOptions(checkpoint=ensure_demo_model(), profile="cpu-x86_64", output=out, precision="int4",
                             skip_fidelity=True), Progress(5, enabled=False))
    return out


def savings(bundle: Path, max_tokens: int, threads: int, ngram_min: int = NGRAM_MIN) -> list[dict]:
    """Per prompt: greedy with prompt lookup and without; tokens, drafts, runs, tokens/s."""
    from edge_runtime import generator
    from edge_runtime.engine import Engine
    from edge_runtime.types import GenerationRequest

    profile = profile_with_threads(bundle, threads)
    # one engine, prompt lookup switched per request: two sessions in one process would each keep
    # their own spinning thread pool, and whichever ran second would pay for the other's
    engine = Engine.from_bundle(bundle, profile=profile)
    runs: list[list[tuple[int, int, bool]]] = []
    original = generator.generate

    def recording(*args, drafts=None, **kwargs):  # the drafter's runs, for the projection
        if drafts is not None and ngram_min != NGRAM_MIN:  # --ngram-min: the engine's drafter, matching fewer ids
            drafts = PromptLookup(drafts.context, draft_max=drafts.draft_max, ngram_min=ngram_min)
        try:
            yield from original(*args, drafts=drafts, **kwargs)
        finally:  # also when the engine stops reading (a stop string)
            if drafts is not None:
                runs.append(list(drafts.runs))

    if not engine.prompt_lookup:
        raise SystemExit(f"{bundle}: no prompt lookup here (a GPU profile's bundle, or one exported before it)")

    def run(request, lookup: bool):
        engine.prompt_lookup = lookup
        return engine.complete(request)

    generator.generate = recording
    rows = []
    try:
        for (name, prompt), (how, sampling) in itertools.product(prompts().items(), SAMPLINGS.items()):
            request = GenerationRequest(mode="complete", prompt=prompt, max_tokens=max_tokens, sampling=sampling)
            untimed, best = {True, False}, {}
            for lookup in (True, False, False, True, True, False):  # the first of each untimed, then both orders
                result = run(request, lookup)
                if lookup in untimed:
                    untimed.discard(lookup)
                elif lookup not in best or result.timings.decode_tokens_per_s > best[lookup].timings.decode_tokens_per_s:
                    best[lookup] = result
            a, b = best[True], best[False]
            rows.append({"prompt": name, "sampling": how, "tokens": len(a.token_ids),
                         # sampled, the draws differ with drafting on: only greedy tokens compare
                         "same_tokens": a.token_ids == b.token_ids if how == "greedy" else None,
                         "drafted": sum(drafted for drafted, _, _ in runs[-1]), "accepted": a.usage.accepted_draft_tokens,
                         "runs": runs[-1], "tokens_per_s_on": a.timings.decode_tokens_per_s,
                         "tokens_per_s_off": b.timings.decode_tokens_per_s})
    finally:
        generator.generate = original
    return rows


def same(row: dict) -> str:
    return "n/a" if row["same_tokens"] is None else "yes" if row["same_tokens"] else "NO"


def projection(row: dict, cost: dict[int, float]) -> float:
    """Decode time with prompt lookup over decode time without, at part 1's costs: the tokens
    after the first cost one step each without; with it, each run costs its S ids' time and
    the tokens no run covered one step each."""
    # the feeds a run covers: its first token's and each confirmed draft's, but the request's last token's
    # (a run that made it) none: the last token is never fed
    verified = sum(1 + accepted - ended for _, accepted, ended in row["runs"])
    fed_in_runs = [1 + drafted for drafted, _, _ in row["runs"]]
    plain_steps = max(row["tokens"] - 1 - verified, 0)
    sizes = sorted(cost)
    price = np.interp(fed_in_runs, sizes, [cost[s] for s in sizes]) if fed_in_runs else np.zeros(0)
    with_lookup = float(price.sum()) + plain_steps * cost[1]
    return (row["tokens"] - 1) * cost[1] / with_lookup if with_lookup else 1.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache = Path.home() / ".cache/edge-runtime"
    p.add_argument("--bundle", type=Path, help="part 1's bundle (default: exported into --workdir)")
    p.add_argument("--checkpoint", type=Path, default=cache / "peers-bench/checkpoint")
    p.add_argument("--workdir", type=Path, default=cache / "prompt-lookup")
    p.add_argument("--demo-bundle", type=Path, help="part 2's bundle (default: the demo model's, in --workdir)")
    p.add_argument("--sizes", type=int, nargs="+", default=list(range(2, 10)), help="ids per verify run (part 1)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--ngram-min", type=int, default=NGRAM_MIN,
                   help=f"parts 2-4: draft after this many matching ids (the engine's: {NGRAM_MIN})")
    p.add_argument("--contexts", type=int, nargs="+", default=[128], help="part 1: tokens held when the runs run")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime threads (0: the profile's)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if a.bundle is not None and not (a.bundle / "bundle.json").is_file():
        from edge_runtime.errors import BundleError

        raise BundleError(f"--bundle {a.bundle}: no bundle.json there (not a bundle folder)")
    a.bundle = a.bundle or cost_bundle(a.checkpoint, a.workdir / "int4")
    costs = {c: cost_table(a.bundle, a.sizes, a.rounds, a.threads, c) for c in a.contexts}
    cost = costs[a.contexts[0]]
    print(f"1. a run of S ids against one decode step, {a.bundle.name}, at {', '.join(map(str, a.contexts))} "
          "tokens of context:")
    print("| S | " + " | ".join(f"ms @{c} | × a step @{c}" for c in a.contexts) + " |")
    print("|---|" + "---|---|" * len(a.contexts))
    for s in cost:
        print(f"| {s} | " + " | ".join(f"{costs[c][s] * 1e3:.1f} | {costs[c][s] / costs[c][1]:.2f}"
                                       for c in a.contexts) + " |")
    rows = savings(a.demo_bundle or demo_bundle(a.workdir / "demo-int4"), a.max_tokens, a.threads, a.ngram_min)
    print(f"\n2. {a.max_tokens} tokens at most, greedy and sampled, the demo model (int4), prompt lookup on and off; "
          "3. the decode time it would save at part 1's costs:")
    print("| prompt | sampling | tokens | same tokens | drafted | kept | runs | tok/s on | tok/s off | "
          "projected speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["projected_speedup"] = projection(r, cost)
        print(f"| {r['prompt']} | {r['sampling']} | {r['tokens']} | {same(r)} | {r['drafted']} | {r['accepted']} | "
              f"{len(r['runs'])} | {r['tokens_per_s_on']:.0f} | {r['tokens_per_s_off']:.0f} | "
              f"{r['projected_speedup']:.2f}× |")
    shape = savings(a.bundle, a.max_tokens, a.threads, a.ngram_min)
    print(f"\n4. the same requests on {a.bundle} (random weights), timed:")
    print("| prompt | sampling | tokens | same tokens | drafted | kept | runs | tok/s on | tok/s off | on ÷ off |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in shape:
        print(f"| {r['prompt']} | {r['sampling']} | {r['tokens']} | {same(r)} | {r['drafted']} | {r['accepted']} | "
              f"{len(r['runs'])} | {r['tokens_per_s_on']:.1f} | {r['tokens_per_s_off']:.1f} | "
              f"{r['tokens_per_s_on'] / r['tokens_per_s_off']:.2f}× |")
    if a.json:
        a.json.write_text(json.dumps({"cost_s": {str(c): v for c, v in costs.items()}, "rows": rows,
                                      "shape_rows": shape}, indent=2))
    print("(Random weights leave near-ties everywhere: a run's kernels for several rows round differently from a "
          "step's, so the picks part early; the trained model's do not, part 2.)")
    return 0 if all(r["same_tokens"] is not False for r in rows) else 1


if __name__ == "__main__":
    from edge_runtime.cli import run_script

    sys.exit(run_script(main))
