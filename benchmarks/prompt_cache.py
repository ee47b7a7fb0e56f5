"""The prompt cache in a conversation: time to first token of each turn of an instruct
chat about a code file, with the engine's prompt cache (`prompt_cache = "client"`, the
default) and without it (`"off"`), same bundle, same greedy turns.

Turn 1 sends a system prompt and the file with a first question; each later turn sends
the whole conversation again (as every chat client does: the protocol is stateless) with
the previous answer and a new question. With the cache, a turn runs only what the
previous request had not: the previous answer as re-tokenized text, from where its ids
part from the ones generated, and the new question.

    python benchmarks/prompt_cache.py --bundle ~/.cache/edge-runtime/peers-bench/edge-runtime \\
        [--file edge_runtime/sampling.py] [--turns 4] [--max-tokens 32] [--threads 2] [--json OUT]

Prints one table (turn, prompt tokens, tokens kept, TTFT with and without the cache, and
whether both runs generated the same tokens). They may differ where logits are nearly tied
(random weights): a kept row of the previous answer holds what its decode step computed,
and, with an int8 KV cache, the decode step attended over the int8 codes where a prompt
run attends in float (kv_cache_quant.py). With the cache a turn sees exactly what it would
had the conversation been generated in one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from edge_runtime.engine import Engine
from edge_runtime.profiles import load_profile
from edge_runtime.types import GenerationRequest, GenerationResult, Message, SamplingParams

QUESTIONS = ("What does this module do? Answer in two sentences.",
             "Which function would you test first, and how?",
             "Rewrite the slowest part with numpy.",
             "Add type hints to the function you changed.",
             "Write a docstring for it.",
             "Summarize your changes as a commit message.")


def conversation(engine: Engine, source: str, turns: int, max_tokens: int) -> list[GenerationResult]:
    messages = [Message("system", "You are a careful Python reviewer."),
                Message("user", f"Here is a file:\n```python\n{source}\n```\n{QUESTIONS[0]}")]
    results = []
    for turn in range(turns):
        if turn:
            messages += [Message("assistant", results[-1].text), Message("user", QUESTIONS[turn % len(QUESTIONS)])]
        results.append(engine.complete(GenerationRequest(mode="chat", messages=tuple(messages), max_tokens=max_tokens,
                                                         sampling=SamplingParams(temperature=0.0),
                                                         client_id="bench")))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--file", default=str(Path(__file__).resolve().parents[1] / "edge_runtime" / "sampling.py"),
                        help="the code file the conversation is about")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: the profile's)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    source = Path(args.file).read_text()
    rows = {}
    engine = None
    for scope in ("off", "client"):
        engine = Engine.from_bundle(args.bundle, profile=_profile(args.bundle, args.threads), prompt_cache=scope)
        conversation(engine, "def warm_up(): pass", 1, 2)  # first-run costs (allocation, kernels) out of turn 1
        engine.decoder.new_cache(1)  # forget the warm-up's prompt
        rows[scope] = conversation(engine, source, args.turns, args.max_tokens)
        del engine
    off, on = rows["off"], rows["client"]
    same = [a.token_ids == b.token_ids for a, b in zip(off, on)]
    print(f"{Path(args.bundle).name}: {args.turns}-turn chat about {Path(args.file).name}, "
          f"{args.max_tokens} tokens an answer, greedy")
    print("| turn | prompt tokens | kept from the turn before | TTFT without the cache | TTFT with it | speed-up "
          "| same tokens |")
    print("|---|---|---|---|---|---|---|")
    table = []
    for i, (a, b) in enumerate(zip(off, on), 1):
        table.append({"turn": i, "prompt_tokens": b.usage.prompt_tokens,
                      "cached_prompt_tokens": b.usage.cached_prompt_tokens,
                      "ttft_ms_off": a.timings.ttft_ms, "ttft_ms_on": b.timings.ttft_ms, "same_tokens": same[i - 1]})
        print(f"| {i} | {b.usage.prompt_tokens} | {b.usage.cached_prompt_tokens} | {a.timings.ttft_ms:.0f} ms "
              f"| {b.timings.ttft_ms:.0f} ms | {a.timings.ttft_ms / b.timings.ttft_ms:.1f}x "
              f"| {'yes' if same[i - 1] else 'no'} |")
    total_off = sum(r.timings.total_ms for r in off) / 1000
    total_on = sum(r.timings.total_ms for r in on) / 1000
    print(f"whole conversation: {total_off:.1f} s without the cache, {total_on:.1f} s with it")
    if args.json:
        Path(args.json).write_text(json.dumps({"bundle": str(args.bundle), "turns": table,
                                               "total_s_off": total_off, "total_s_on": total_on}, indent=2))
    return 0


def _profile(bundle: str, threads: int):
    profile = load_profile(json.loads((Path(bundle) / "bundle.json").read_text())["profile"]["name"])
    return dataclasses.replace(profile, intra_op_threads=threads) if threads else profile


if __name__ == "__main__":
    sys.exit(main())
