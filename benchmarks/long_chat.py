"""A long instruct chat against the real daemon, past its context: what each turn costs,
and whether anything grows with the conversation.

A chat assistant sends the whole history with each turn (a system prompt, a question with a
code block, the answers so far). When the history no longer fits, the daemon answers
`context_length_exceeded` with the counts (docs/protocol.md, "Errors") and the client drops
turns and sends the rest again, in one of two ways (`--trim`):

* `oldest`: drop the oldest question and answer, and another while the daemon refuses;
* `half`: drop the oldest half of the questions and answers.

Meta's format folds the system prompt into the first question, so a dropped oldest turn
changes the prompt right after the system prompt: the prompt cache keeps only `<s>[INST]
<<SYS>>...` of the turn before, and the turn runs the whole rest of its prompt again. `oldest`
pays that at every turn once the context is full; `half` at every few turns.

    python benchmarks/long_chat.py --bundle B [--turns 50] [--trim oldest|half] [--max-tokens 48] [--clients 1]

`--clients N`: N such conversations (terminals, each its own client id), their turns taken in
turn; the daemon keeps the keys and values of the last request only, so a turn whose client is
not the previous request's keeps nothing.

`edge-runtime serve` runs as a process of its own behind a Mosquitto on loopback (`mosquitto`
on the PATH); the client is `EdgeClient`. Prints a line every 5 turns (prompt tokens, tokens
kept by the prompt cache, time to first token, the daemon's resident memory, the state
directory's bytes) and a summary: prompt tokens run, TTFT summed, memory at the first and
last turn.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mqtt_overhead import start_broker

SYSTEM = "You are the line-3 maintenance assistant. Answer with short Python code."


def question(turn: int) -> str:
    return (f"Turn {turn}: the station {turn} sensor reader fails. Fix it:\n```python\n"
            f"def read_{turn}(port):\n    return port.read({turn})\n```")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def trimmed(history: list[dict], how: str, refused) -> list[dict]:
    """The history without its oldest turns: `oldest` drops the oldest question and answer (the
    client sends the rest again and drops another while the daemon refuses), `half` the oldest
    half of them."""
    pairs = (len(history) - 2) // 2  # answered turns before the last question
    if pairs < 1:
        raise SystemExit(f"error: the last question alone does not fit: {refused}")
    drop = max(1, pairs // 2) if how == "half" else 1
    return [history[0], *history[1 + 2 * drop:]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--trim", choices=("oldest", "half"), default="oldest")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--clients", type=int, default=1, help="conversations taken in turn, one client id each")
    parser.add_argument("--json", help="write every turn's figures here")
    args = parser.parse_args(argv)
    if not (Path(args.bundle) / "bundle.json").is_file():
        print(f"error: no bundle at {args.bundle} (bundle.json not found)", file=sys.stderr)
        return 2

    from edge_runtime.client import EdgeClient
    from edge_runtime.errors import ContextLengthExceeded

    with tempfile.TemporaryDirectory(prefix="long-chat-") as tmp:
        work = Path(tmp)
        broker, port = start_broker(work)
        url = f"mqtt://127.0.0.1:{port}"
        log = open(work / "daemon.log", "w")
        daemon = subprocess.Popen([sys.executable, "-m", "edge_runtime", "serve", "--bundle", args.bundle,
                                   "--broker", url, "--device-id", "chat-bench", "--state-dir", str(work / "state")],
                                  stdout=log, stderr=subprocess.STDOUT)
        rows: list[dict] = []
        refusals = 0
        try:
            with contextlib.ExitStack() as stack:
                clients = [stack.enter_context(EdgeClient(url, "chat-bench", client_id=f"line-{i + 3}"))
                           for i in range(args.clients)]
                deadline = time.monotonic() + 120
                while (clients[0].status(timeout=1.0) or {}).get("state") != "online":
                    if daemon.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"error: the daemon did not come online:\n{(work / 'daemon.log').read_text()}")
                histories = [[{"role": "system", "content": SYSTEM}] for _ in clients]
                for turn in range(args.turns):
                    client, history = clients[turn % len(clients)], histories[turn % len(clients)]
                    history.append({"role": "user", "content": question(turn // len(clients))})
                    while True:
                        try:
                            final = client.generate(mode="chat", messages=history, max_tokens=args.max_tokens,
                                                    temperature=0.0, stream=False, timeout=600).result()
                            break
                        except ContextLengthExceeded as exc:
                            refusals += 1
                            history[:] = trimmed(history, args.trim, exc)
                    history.append({"role": "assistant", "content": final["text"]})
                    usage = final["usage"]
                    rows.append({"turn": turn, "prompt_tokens": usage["prompt_tokens"],
                                 "cached_prompt_tokens": usage["cached_prompt_tokens"],
                                 "completion_tokens": usage["completion_tokens"],
                                 "ttft_ms": final["timings"]["ttft_ms"], "rss_mib": rss_mib(daemon.pid),
                                 "state_bytes": folder_bytes(work / "state"), "turns_kept": (len(history) - 1) // 2})
                    if turn % 5 == 4 or turn == args.turns - 1:
                        r = rows[-1]
                        print(f"turn {turn + 1:3d}: prompt {r['prompt_tokens']:5d} tokens, "
                              f"kept {r['cached_prompt_tokens']:5d}, TTFT {r['ttft_ms']:8.1f} ms, daemon RSS {r['rss_mib']:6.1f} MiB, "
                              f"state {r['state_bytes'] / 1024:7.1f} KiB, turns in the history {r['turns_kept']}",
                              flush=True)
        finally:
            daemon.terminate()
            daemon.wait(60)
            log.close()
            broker.terminate()
            broker.wait(10)
    run = sum(r["prompt_tokens"] - r["cached_prompt_tokens"] for r in rows)
    total = sum(r["prompt_tokens"] for r in rows)
    print(f"{len(rows)} turns of {args.clients} client(s), trim {args.trim}: {refusals} refused requests; "
          f"prompt tokens run {run} of {total} ({run / total:.0%}); TTFT summed {sum(r['ttft_ms'] for r in rows) / 1000:.2f} s; daemon RSS "
          f"{rows[0]['rss_mib']:.1f} MiB after turn 1, {max(r['rss_mib'] for r in rows):.1f} at most, "
          f"{rows[-1]['rss_mib']:.1f} after the last")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
