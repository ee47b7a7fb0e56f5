"""A chat assistant's long conversation near the context limit, as a clinic's or a factory's
assistant sends it to the daemon: the whole history with each turn (a system prompt, code
blocks, answers cut by max_tokens or a stop string), until it no longer fits; then the client
drops its oldest turns by the numbers the error gives and sends it again.

References: the prompt ids are built here by hand from Meta's format with the checkpoint's own
tokenizer.json (the `tokenizers` package, no code of ours), the answers are torch's greedy
tokens (tests/torch_reference.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from tokenizers import Tokenizer

import torch_reference
from edge_runtime.client import EdgeClient
from edge_runtime.errors import ContextLengthExceeded

DEVICE = "ward-chat"
CONTEXT = 256
SYSTEM = "You are the ward's coding assistant. Answer with Python code."
BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def small_context_bundle(tiny_checkpoint, tmp_path_factory, exporter):
    """The tiny checkpoint as an Instruct bundle with a 256-token context: a few turns fill it."""
    return exporter(tiny_checkpoint, tmp_path_factory.mktemp("bundle") / "tiny-instruct-256", max_context=CONTEXT,
                    variant="instruct")


@pytest.fixture
def daemon(small_context_bundle, broker, tmp_path):
    log = open(tmp_path / "daemon.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime", "serve", "--bundle", str(small_context_bundle),
                             "--broker", broker.url, "--device-id", DEVICE, "--state-dir", str(tmp_path / "state")],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        with EdgeClient(broker.url, DEVICE) as client:
            deadline = time.monotonic() + 60
            while (client.status(timeout=1.0) or {}).get("state") != "online":
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
        yield proc
    finally:
        proc.kill()
        proc.wait(10)
        log.close()


def meta_chat_ids(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """Meta's llama/generation.py chat_completion, spelled out: the system prompt folded into the
    first user message; each answered turn `<s>[INST] u [/INST] a </s>`; the last `<s>[INST] u [/INST]`."""
    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    turns = [m["content"] for m in messages[1:]]
    turns[0] = f"<<SYS>>\n{messages[0]['content']}\n<</SYS>>\n\n{turns[0]}"
    ids: list[int] = []
    for user, answer in zip(turns[0:-1:2], turns[1::2]):
        ids += [BOS, *encode(f"[INST] {user.strip()} [/INST] {answer.strip()} "), EOS]
    return ids + [BOS, *encode(f"[INST] {turns[-1].strip()} [/INST]")]


def question(turn: int) -> str:
    return (f"Turn {turn}: the line-{turn} sensor reader fails. Fix it:\n```python\n"
            f"def read_{turn}(port):\n    return port.read({turn})\n```")


def test_a_chat_past_the_context_is_told_its_counts_and_fits_again_without_its_oldest_turns(
        daemon, broker, tiny_checkpoint):
    tokenizer = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    history = [{"role": "system", "content": SYSTEM}]
    max_tokens = 24
    refused = None
    with EdgeClient(broker.url, DEVICE, client_id="ward-7") as client:
        for turn in range(20):
            history.append({"role": "user", "content": question(turn)})
            try:
                final = client.generate(mode="chat", messages=history, max_tokens=max_tokens, temperature=0.0,
                                        stream=False, timeout=60).result()
            except ContextLengthExceeded as exc:
                refused = exc
                break
            assert final["usage"]["prompt_tokens"] == len(meta_chat_ids(tokenizer, history))
            history.append({"role": "assistant", "content": final["text"]})
        assert refused is not None, "the conversation never reached the context limit"
        # the numbers a client acts on, as fields of the error (and attributes of the exception)
        needed = len(meta_chat_ids(tokenizer, history))
        assert (refused.prompt_tokens, refused.max_tokens, refused.context_limit) == (needed, max_tokens, CONTEXT)
        assert needed + max_tokens > CONTEXT
        # what a chat client without a tokenizer does: count the history on the device ("count_tokens",
        # answered at once, nothing generated) and drop the oldest question and answer until it fits
        count = client.count_tokens(mode="chat", messages=history, max_tokens=max_tokens, timeout=60)
        assert count == {"prompt_tokens": needed, "max_tokens": max_tokens, "context_limit": CONTEXT, "fits": False}
        dropped = 0
        while not count["fits"]:
            history, dropped = [history[0], *history[3:]], dropped + 1
            count = client.count_tokens(mode="chat", messages=history, max_tokens=max_tokens, timeout=60)
            assert count["prompt_tokens"] == len(meta_chat_ids(tokenizer, history))
            assert count["fits"] == (count["prompt_tokens"] + max_tokens <= CONTEXT)
        assert dropped >= 1
        # without max_tokens: the default (256) lowered to what the context leaves
        assert client.count_tokens(mode="chat", messages=history, timeout=60)["max_tokens"] == \
            CONTEXT - count["prompt_tokens"]
        final = client.generate(mode="chat", messages=history, max_tokens=max_tokens, temperature=0.0,
                                stream=False, timeout=60).result()
    ids = meta_chat_ids(tokenizer, history)
    assert final["usage"]["prompt_tokens"] == len(ids) <= CONTEXT - max_tokens
    expected = torch_reference.greedy(tiny_checkpoint, ids, max_tokens, frozenset({EOS}))
    assert final["text"] == tokenizer.decode(expected)


def test_ask_prints_the_counts_in_the_error_object_and_counts_without_generating(daemon, broker, small_context_bundle,
                                                                                 tmp_path):
    """`edge-runtime ask --messages ... --json`: the error reply as the daemon sent it, counts included."""
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": "\n".join(question(t) for t in range(12))}]
    (tmp_path / "chat.json").write_text(json.dumps(messages))
    out = subprocess.run([sys.executable, "-m", "edge_runtime", "ask", "--broker", broker.url, "--device-id", DEVICE,
                          "--messages", str(tmp_path / "chat.json"), "--max-tokens", "8", "--json",
                          "--timeout", "60"], capture_output=True, text=True)
    assert out.returncode == 1, out.stderr
    error = json.loads(out.stdout)["error"]
    tokenizer = Tokenizer.from_file(str(small_context_bundle / "tokenizer.json"))
    assert error["code"] == "context_length_exceeded"
    assert {k: error[k] for k in ("prompt_tokens", "max_tokens", "context_limit")} == {
        "prompt_tokens": len(meta_chat_ids(tokenizer, messages)), "max_tokens": 8, "context_limit": CONTEXT}
    # `ask --count-tokens`: the same numbers, counted without generating
    counted = subprocess.run([sys.executable, "-m", "edge_runtime", "ask", "--broker", broker.url, "--device-id",
                              DEVICE, "--messages", str(tmp_path / "chat.json"), "--max-tokens", "8",
                              "--count-tokens", "--timeout", "60"], capture_output=True, text=True)
    assert counted.returncode == 0, counted.stderr
    assert counted.stdout == (f"{error['prompt_tokens']} prompt tokens + max_tokens 8 of the context limit "
                              f"{CONTEXT}: does not fit\n")


def test_each_turn_of_a_long_chat_is_metas_prompt_and_torchs_tokens_with_cut_answers_in_its_history(
        small_context_bundle, tiny_checkpoint):
    """The Python Engine API, one client's conversation: answers cut by max_tokens (finish_reason
    "length") or by a stop string stay in the history; the oldest turns are dropped when the
    error's counts say so. Every turn: the prompt is Meta's ids, the answer torch's greedy tokens
    (fp32), and the prompt cache kept exactly the common start of the ids the turn before left."""
    from edge_runtime import Engine, GenerationRequest, SamplingParams

    tokenizer = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    history = [{"role": "system", "content": SYSTEM}]
    held: list[int] = []  # the ids whose keys and values the previous turn left
    seen = {"length": 0, "stop": 0, "dropped": 0}
    with Engine.from_bundle(small_context_bundle) as engine:
        for turn in range(12):
            history.append({"role": "user", "content": question(turn)})
            max_tokens, stop = (5, 40, 3, 16)[turn % 4], ("e",) if turn % 3 == 2 else ()
            while True:
                request = GenerationRequest(mode="chat", messages=tuple(history), max_tokens=max_tokens, stop=stop,
                                            sampling=SamplingParams(temperature=0.0), client_id="ward-7")
                count = engine.count_tokens(request)
                assert count.prompt_tokens == len(meta_chat_ids(tokenizer, history))
                try:
                    result = engine.complete(request)
                    assert count.fits
                    break
                except ContextLengthExceeded as exc:
                    assert not count.fits
                    assert exc.prompt_tokens == len(meta_chat_ids(tokenizer, history))
                    assert exc.context_limit == CONTEXT and exc.max_tokens == max_tokens
                    history = [history[0], *history[3:]]
                    seen["dropped"] += 1
            ids = list(result.prompt_token_ids)
            assert ids == meta_chat_ids(tokenizer, history)
            got = list(result.token_ids)
            expected = torch_reference.greedy(tiny_checkpoint, ids, max_tokens, frozenset({EOS}))
            if result.finish_reason == "length":
                assert got == expected and len(got) == max_tokens
            else:  # a stop string in the last token's text, or </s> before max_tokens
                assert result.finish_reason == "stop" and got == expected[:len(got)]
                assert (stop and stop[0] in tokenizer.decode(got)) or got == expected
            common = 0
            while common < min(len(held), len(ids) - 1) and held[common] == ids[common]:
                common += 1
            assert result.usage.cached_prompt_tokens == common
            # the loop feeds every token but the last one sampled (</s> or the one a stop string ended on)
            ended_by_eos = result.finish_reason == "stop" and got == expected and len(got) < max_tokens
            held = ids + (got if ended_by_eos else got[:-1])
            seen[result.finish_reason] += 1
            history.append({"role": "assistant", "content": result.text})
    assert seen["length"] and seen["stop"] and seen["dropped"], seen
