"""What an operator policy's output rules cost per generated token.

    python benchmarks/policy_scan.py [--policy deploy/policy/unattended.toml] [--tokens 2000] [--repeats 5]

Feeds the text of code (this repository's Python sources, cut into the real Code Llama
tokenizer's tokens, as the engine streams them) through the guard's `OutputWatch` for
the policy's output rules, and prints the median microseconds a token over `--repeats`
runs, per rule and for all of them together (what the daemon adds to every decode step
when that policy is loaded). Nothing matches in this text, so every rule is searched at
every token, as in a normal answer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from tokenizers import Tokenizer

from edge_runtime.policy import OutputWatch, load_policy

REPO = Path(__file__).resolve().parents[1]


def token_deltas(n: int) -> list[str]:
    """`n` tokens of Python source, each as the text it adds to the output."""
    tokenizer = Tokenizer.from_file(str(REPO / "export" / "assets" / "codellama-tokenizer.json"))
    text = "".join(p.read_text(encoding="utf-8") for p in sorted((REPO / "edge_runtime").glob("*.py")))
    ids = tokenizer.encode(text, add_special_tokens=False).ids[:n]
    deltas, before = [], ""
    for i in range(1, len(ids) + 1):  # incremental decoding, as the detokenizer streams it
        now = tokenizer.decode(ids[:i])
        deltas.append(now[len(before):])
        before = now
    return deltas


def time_feed(rules, window: int, deltas: list[str]) -> float:
    watch = OutputWatch(rules, window)
    t0 = time.perf_counter()
    for delta in deltas:
        if watch.feed(delta):
            raise SystemExit(f"a rule matched this text: {[r.name for r in rules]}")
    return (time.perf_counter() - t0) / len(deltas) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policy", type=Path, default=REPO / "deploy" / "policy" / "unattended.toml")
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mode", default="complete")
    p.add_argument("--client", default="any-client")
    a = p.parse_args()
    policy = load_policy(a.policy)
    rules = policy.rules_for("output", a.mode, a.client)
    if not rules:
        raise SystemExit(f"{a.policy} has no output rules for mode {a.mode}")
    deltas = token_deltas(a.tokens)
    print(f"{a.policy.name}: {len(rules)} output rules, window {policy.output_window_chars} characters, "
          f"{len(deltas)} tokens ({sum(map(len, deltas))} characters)")
    for name, subset in [(r.name, (r,)) for r in rules] + [("all output rules", tuple(rules))]:
        runs = [time_feed(subset, policy.output_window_chars, deltas) for _ in range(a.repeats)]
        print(f"  {name}: {statistics.median(runs):.1f} µs a token (median of {a.repeats})")


if __name__ == "__main__":
    from edge_runtime.cli import run_script

    sys.exit(run_script(main))
