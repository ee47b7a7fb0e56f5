"""The prompt cache in a conversation: time to first token of each turn of an instruct
chat about a code file, with the engine's prompt cache (`prompt_cache = "client"`, the
default) and without it (`"off"`), same bundle, same greedy turns.

Turn 1 sends a system prompt and the file with a first question; each later turn sends
the whole conversation again (as every chat client does: the protocol is stateless) with
the previous answer and a new question. With the cache, a turn runs only what the
previous request had not: the previous answer as re-tokenized text, from where its ids
part from the ones generated, and the new question.

    python benchmarks/prompt_cache.py --bundle ~/.cache/edge-runtime/peers-bench/edge-runtime \\
        [--file CODE] [--turns 4] [--max-tokens 32] [--threads 2] [--json OUT] \\
        [--llama-cpp ~/.cache/edge-runtime/peers-bench/llama.cpp/model-q4_0.gguf [--peer-python PY]]

With `--llama-cpp` (a GGUF of the same checkpoint, as `benchmarks/peers.py` makes it), the
same turns' prompt ids also go to llama-cpp-python's `Llama.generate` in the peers'
environment: it keeps the longest common start of the previous evaluation too (llama.cpp's
server does the same with `cache_prompt`), so its TTFT per turn is the peer's figure.
It generates its own answers, which the next prompt (built from ours) does not hold: it
keeps the previous prompt, not the answer, and runs the answer again.

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
import subprocess
import sys
import time
from pathlib import Path

from peers import DEFAULT_PEER_PYTHON

QUESTIONS = ("What does this module do? Answer in two sentences.",
             "Which function would you test first, and how?",
             "Rewrite the slowest part with numpy.",
             "Add type hints to the function you changed.",
             "Write a docstring for it.",
             "Summarize your changes as a commit message.")


def conversation(engine, source: str, turns: int, max_tokens: int, *, cache_prompt: bool = True) -> list:
    from edge_runtime.types import GenerationRequest, Message, SamplingParams

    messages = [Message("system", "You are a careful Python reviewer."),
                Message("user", f"Here is some code:\n```python\n{source}\n```\n{QUESTIONS[0]}")]
    results = []
    for turn in range(turns):
        if turn:
            messages += [Message("assistant", results[-1].text), Message("user", QUESTIONS[turn % len(QUESTIONS)])]
        results.append(engine.complete(GenerationRequest(mode="chat", messages=tuple(messages), max_tokens=max_tokens,
                                                         sampling=SamplingParams(temperature=0.0),
                                                         client_id="bench", cache_prompt=cache_prompt)))
    return results


def llama_cpp_turns(gguf: str, turns: list[list[int]], *, max_tokens: int, threads: int) -> list[dict]:
    """In the peers' environment: each turn's ids through `Llama.generate` (greedy), timed to
    its first token; how many ids it kept, by its own rule (the longest common start with
    what it evaluated before, less one when that is the whole prompt)."""
    import llama_cpp

    n_ctx = max(len(t) for t in turns) + max_tokens + 8
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads or None,
                          n_threads_batch=threads or None, verbose=False)
    for _ in zip(range(2), llm.generate([1, 822, 5870], top_k=1, temp=0.0)):  # warm-up
        pass
    llm.reset()
    rows = []
    for ids in turns:
        held = list(llm.input_ids[:llm.n_tokens])
        kept = 0
        while kept < min(len(held), len(ids)) and held[kept] == ids[kept]:
            kept += 1
        kept -= kept == len(ids)
        t0 = time.perf_counter()
        tokens = llm.generate(ids, top_k=1, temp=0.0)
        next(tokens)
        ttft = time.perf_counter() - t0
        for _ in zip(range(max_tokens - 1), tokens):
            pass
        rows.append({"prompt_tokens": len(ids), "kept": kept, "ttft_ms": ttft * 1000, "total_ms":
                     (time.perf_counter() - t0) * 1000})
    return rows


def run_llama_cpp(python: str, gguf: str, turns: list[list[int]], *, max_tokens: int, threads: int) -> list[dict]:
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--step-llama-cpp", gguf, "--max-tokens",
                           str(max_tokens), "--threads", str(threads)], input=json.dumps(turns),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llama.cpp run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="the bundle to run (required)")
    parser.add_argument("--file", default=str(Path(__file__).resolve().parents[1] / "export" / "assets" /
                                              "fidelity-corpus.txt"),
                        help="the code the conversation is about (default: the fidelity corpus, which stays put)")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: the profile's)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--llama-cpp", metavar="GGUF", help="also run the turns through llama-cpp-python")
    parser.add_argument("--peer-python", default=str(DEFAULT_PEER_PYTHON),
                        help="the interpreter that has llama_cpp (scripts/install-peers.sh)")
    parser.add_argument("--step-llama-cpp", metavar="GGUF", help=argparse.SUPPRESS)  # in the peers' environment
    args = parser.parse_args(argv)
    if args.step_llama_cpp:
        turns = json.loads(sys.stdin.read())
        print(json.dumps(llama_cpp_turns(args.step_llama_cpp, turns, max_tokens=args.max_tokens,
                                         threads=args.threads)))
        return 0
    if not args.bundle:
        parser.error("--bundle is required")
    from edge_runtime.engine import Engine

    source = Path(args.file).read_text()
    engine = Engine.from_bundle(args.bundle, profile=profile_with_threads(args.bundle, args.threads))
    conversation(engine, "def warm_up(): pass", 1, 2)  # first-run costs (allocation, kernels) out of turn 1
    off = conversation(engine, source, args.turns, args.max_tokens, cache_prompt=False)  # as prompt_cache = "off"
    engine.forget_prompt_cache()  # turn 1 runs its whole prompt
    on = conversation(engine, source, args.turns, args.max_tokens)
    peer = (run_llama_cpp(args.peer_python, args.llama_cpp, [list(r.prompt_token_ids) for r in on],
                          max_tokens=args.max_tokens, threads=args.threads) if args.llama_cpp else None)
    print(f"{Path(args.bundle).name}: {args.turns}-turn chat about {Path(args.file).name}, "
          f"{args.max_tokens} tokens an answer, greedy")
    head = ["turn", "prompt tokens", "kept from the turn before", "TTFT without the cache", "TTFT with it",
            "speed-up", "same tokens"] + (["llama.cpp kept", "llama.cpp TTFT"] if peer else [])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    table = []
    for i, (a, b) in enumerate(zip(off, on)):
        row = {"turn": i + 1, "prompt_tokens": b.usage.prompt_tokens,
               "cached_prompt_tokens": b.usage.cached_prompt_tokens, "ttft_ms_off": a.timings.ttft_ms,
               "ttft_ms_on": b.timings.ttft_ms, "same_tokens": a.token_ids == b.token_ids}
        cells = [row["turn"], row["prompt_tokens"], row["cached_prompt_tokens"], f"{a.timings.ttft_ms:.0f} ms",
                 f"{b.timings.ttft_ms:.0f} ms", f"{a.timings.ttft_ms / b.timings.ttft_ms:.1f}x",
                 "yes" if row["same_tokens"] else "no"]
        if peer:
            row["llama_cpp"] = peer[i]
            cells += [peer[i]["kept"], f"{peer[i]['ttft_ms']:.0f} ms"]
        table.append(row)
        print("| " + " | ".join(map(str, cells)) + " |")
    totals = {"total_s_off": sum(r.timings.total_ms for r in off) / 1000,
              "total_s_on": sum(r.timings.total_ms for r in on) / 1000}
    line = f"whole conversation: {totals['total_s_off']:.1f} s without the cache, {totals['total_s_on']:.1f} s with it"
    if peer:
        totals["total_s_llama_cpp"] = sum(r["total_ms"] for r in peer) / 1000
        line += f", llama.cpp {totals['total_s_llama_cpp']:.1f} s"
    print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"bundle": str(args.bundle), "turns": table, **totals}, indent=2))
    return 0


def profile_with_threads(bundle: str | Path, threads: int):
    """The bundle's own profile (None: the engine's default), or it with `threads` intra-op threads."""
    if not threads:
        return None
    from edge_runtime.bundle import read_manifest
    from edge_runtime.profiles import load_profile

    name = read_manifest(Path(bundle))[0]["profile"]["name"]
    return dataclasses.replace(load_profile(name), intra_op_threads=threads)


if __name__ == "__main__":
    from edge_runtime.cli import run_script

    sys.exit(run_script(main))
