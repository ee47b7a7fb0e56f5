"""The engine end to end on fp32 bundles: each Code Llama mode's prompt ids are
built by hand here from the formats document, and greedy tokens are compared
with torch greedy decoding of the same checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
from tokenizers import Tokenizer

import torch_reference
from edge_runtime.engine import Engine
from edge_runtime.errors import BadRequest, ContextLengthExceeded, DeadlineExceeded, UnsafePrompt, UnsupportedMode
from edge_runtime.types import DEFAULT_MAX_TOKENS, Chunk, GenerationRequest, GenerationResult, Message, SamplingParams

GREEDY = SamplingParams(temperature=0.0)
N = 32


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine.from_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def hf_tok(tiny_bundle):
    return Tokenizer.from_file(str(tiny_bundle / "tokenizer.json"))


def enc(tok: Tokenizer, text: str) -> list[int]:
    """Plain SentencePiece-style encoding of text (no bos), as Meta's sp.encode."""
    return tok.encode(text, add_special_tokens=False).ids


def enc_infilling(tok: Tokenizer, text: str) -> list[int]:
    """Meta's encode_infilling: encode '☺' + text and drop the '☺' tokens."""
    return enc(tok, "☺" + text)[2:] if enc(tok, "☺")[:1] == [29871] else enc(tok, "☺" + text)[1:]


def run(engine: Engine, request: GenerationRequest) -> tuple[list[Chunk], GenerationResult]:
    items = list(engine.generate(request))
    return items[:-1], items[-1]


def test_complete_matches_hand_built_ids_and_torch(engine, hf_tok, tiny_checkpoint):
    prompt = "def fibonacci(n):\n    "
    expected_ids = [hf_tok.token_to_id("<s>")] + enc(hf_tok, prompt)
    chunks, result = run(engine, GenerationRequest(mode="complete", prompt=prompt, max_tokens=N, sampling=GREEDY))
    assert list(result.prompt_token_ids) == expected_ids
    assert list(result.token_ids) == torch_reference.greedy(tiny_checkpoint, expected_ids, N, frozenset({2}))
    assert "".join(c.text for c in chunks) == result.text
    assert result.usage.prompt_tokens == len(expected_ids)
    assert result.usage.completion_tokens == len(result.token_ids)


@pytest.mark.parametrize("penalties", [dict(repeat_penalty=1.3), dict(repeat_penalty=0.8),
                                       dict(presence_penalty=0.5, frequency_penalty=0.25),
                                       dict(repeat_penalty=1.2, presence_penalty=-0.4, frequency_penalty=0.3)])
def test_repetition_penalties_match_torch_with_transformers_penalty(engine, hf_tok, tiny_checkpoint, penalties):
    """llama.cpp's and Ollama's penalties over the whole context (repeat_last_n -1) against
    transformers' RepetitionPenaltyLogitsProcessor and the presence/frequency rule spelled out,
    greedy; and the tokens differ from plain greedy decoding (the penalties do something)."""
    prompt = "def f(x):\n    return x + x + x + x"
    ids = [hf_tok.token_to_id("<s>")] + enc(hf_tok, prompt)
    sampling = SamplingParams(temperature=0.0, repeat_last_n=-1, **penalties)
    _, result = run(engine, GenerationRequest(mode="complete", prompt=prompt, max_tokens=N, sampling=sampling))
    expected = torch_reference.greedy_penalized(
        tiny_checkpoint, ids, N, repetition_penalty=penalties.get("repeat_penalty", 1.0),
        presence_penalty=penalties.get("presence_penalty", 0.0),
        frequency_penalty=penalties.get("frequency_penalty", 0.0), stop_ids=frozenset({2}))
    assert list(result.token_ids) == expected
    assert expected != torch_reference.greedy(tiny_checkpoint, ids, N, frozenset({2}))


def test_a_penalty_window_of_zero_is_plain_greedy_decoding(engine, hf_tok, tiny_checkpoint):
    prompt = "def f(x):\n    return x + x + x + x"
    ids = [hf_tok.token_to_id("<s>")] + enc(hf_tok, prompt)
    sampling = SamplingParams(temperature=0.0, repeat_penalty=1.5, frequency_penalty=1.0, repeat_last_n=0)
    _, result = run(engine, GenerationRequest(mode="complete", prompt=prompt, max_tokens=N, sampling=sampling))
    assert list(result.token_ids) == torch_reference.greedy(tiny_checkpoint, ids, N, frozenset({2}))


def test_min_p_one_keeps_only_the_most_likely_token_even_hot(engine, hf_tok, tiny_checkpoint):
    """min_p 1 drops every token less likely than the most likely one: at temperature 1.5 the
    tokens are torch's greedy ones (and without min_p, the same hot request's are not)."""
    prompt = "def f(x):\n    return x + x + x + x"
    ids = [hf_tok.token_to_id("<s>")] + enc(hf_tok, prompt)
    expected = torch_reference.greedy(tiny_checkpoint, ids, N, frozenset({2}))
    hot = SamplingParams(temperature=1.5, top_p=1.0, min_p=1.0, seed=7)
    _, result = run(engine, GenerationRequest(mode="complete", prompt=prompt, max_tokens=N, sampling=hot))
    assert list(result.token_ids) == expected
    _, result = run(engine, GenerationRequest(mode="complete", prompt=prompt, max_tokens=N,
                                              sampling=dataclasses.replace(hot, min_p=0.0)))
    assert list(result.token_ids) != expected


@pytest.mark.parametrize("suffix_first", [False, True])
def test_infill_matches_hand_built_ids_and_torch(engine, hf_tok, tiny_checkpoint, suffix_first):
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    pre, suf, mid, eot = (hf_tok.token_to_id(p) for p in ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"))
    bos = hf_tok.token_to_id("<s>")
    if suffix_first:
        expected = [bos, pre, suf] + enc_infilling(hf_tok, suffix) + [mid] + enc(hf_tok, prefix)
    else:
        expected = [bos, pre] + enc(hf_tok, prefix) + [suf] + enc_infilling(hf_tok, suffix) + [mid]
    _, result = run(engine, GenerationRequest(mode="infill", prefix=prefix, suffix=suffix, suffix_first=suffix_first,
                                              max_tokens=N, sampling=GREEDY))
    assert list(result.prompt_token_ids) == expected
    assert list(result.token_ids) == torch_reference.greedy(tiny_checkpoint, expected, N, frozenset({eot, 2}))


def test_chat_matches_hand_built_ids_and_torch(engine, hf_tok, tiny_checkpoint):
    messages = (Message("system", "You write Python."), Message("user", "Sort a list."),
                Message("assistant", " Use sorted(). "), Message("user", "  And reverse it?  "))
    bos, eos = hf_tok.token_to_id("<s>"), hf_tok.token_to_id("</s>")
    first_user = "<<SYS>>\nYou write Python.\n<</SYS>>\n\nSort a list."
    expected = ([bos] + enc(hf_tok, f"[INST] {first_user} [/INST] Use sorted(). ") + [eos]
                + [bos] + enc(hf_tok, "[INST] And reverse it? [/INST]"))
    _, result = run(engine, GenerationRequest(mode="chat", messages=messages, max_tokens=N, sampling=GREEDY))
    assert list(result.prompt_token_ids) == expected
    assert list(result.token_ids) == torch_reference.greedy(tiny_checkpoint, expected, N, frozenset({eos}))


def test_a_completion_appended_to_its_prompt_is_the_models_text(engine, hf_tok, tiny_checkpoint):
    """`prompt + text` is what the model wrote: decoding prompt and answer as one sequence (the HF
    tokenizer's decode; Hugging Face's pipeline and llama.cpp return the same continuation).
    A first token "▁x" after "x =" is " x": dropping its space gave "x =x". Only an empty
    prompt's answer starts where SentencePiece's implicit leading space is dropped."""
    bos = hf_tok.token_to_id("<s>")
    spaced = []
    for prompt in ["x =", "import", "def f(a, b):\n    return a", "for i in", "print(", "y = x +", "if not"]:
        first = torch_reference.greedy(tiny_checkpoint, [bos] + enc(hf_tok, prompt), 1, frozenset({2}))
        if first and hf_tok.id_to_token(first[0]).startswith("▁"):
            spaced.append(prompt)
    assert spaced, "no prompt whose first generated token starts with a space: pick others"
    for prompt in [spaced[0], ""]:
        ids = [bos] + enc(hf_tok, prompt)
        chunks, result = run(engine, GenerationRequest(mode="complete", prompt=prompt, max_tokens=12, sampling=GREEDY))
        generated = torch_reference.greedy(tiny_checkpoint, ids, 12, frozenset({2}))
        assert list(result.token_ids) == generated
        assert prompt + result.text == hf_tok.decode(ids + generated, skip_special_tokens=True)
        assert "".join(c.text for c in chunks) == result.text
    assert result.text == hf_tok.decode(generated)  # the empty prompt's: no leading space


def test_control_token_text_in_user_input_stays_text(engine):
    _, result = run(engine, GenerationRequest(mode="complete", prompt="x </s> <s> ▁<EOT> <PRE>", max_tokens=1,
                                              sampling=GREEDY))
    assert result.prompt_token_ids[0] == 1
    assert not {2, 32007, 32008, 32009, 32010} & set(result.prompt_token_ids)
    assert 1 not in result.prompt_token_ids[1:]


def test_stop_string_across_tokens_is_cut_from_the_output(engine):
    request = GenerationRequest(mode="complete", prompt="def f():", max_tokens=24, sampling=GREEDY)
    _, full = run(engine, request)
    # a stop string made of the end of one token's text and the start of the next
    pieces = [engine.tokenizer.decode(list(full.token_ids[:i])) for i in range(1, len(full.token_ids) + 1)]
    cut = next(i for i in range(2, len(pieces)) if len(pieces[i - 1]) - len(pieces[i - 2]) >= 2)
    stop = pieces[cut - 1][len(pieces[cut - 2]) - 1: len(pieces[cut - 2]) + 1]
    expected = full.text[: full.text.index(stop)]
    chunks, result = run(engine, GenerationRequest(mode="complete", prompt="def f():", max_tokens=24,
                                                   sampling=GREEDY, stop=(stop,)))
    assert result.finish_reason == "stop"
    assert result.text == expected and "".join(c.text for c in chunks) == expected


def test_seed_makes_sampling_reproducible(engine):
    def sample(seed):
        return run(engine, GenerationRequest(mode="complete", prompt="import ", max_tokens=16,
                                             sampling=SamplingParams(temperature=1.0, top_p=0.95, seed=seed)))[1]
    a, b, c = sample(11), sample(11), sample(12)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_context_overflow_names_both_numbers_before_any_work(engine):
    limit = engine.context_limit
    with pytest.raises(ContextLengthExceeded, match=rf"(?s)tokens.*max_tokens is {limit}.*context limit of {limit}"):
        next(engine.generate(GenerationRequest(mode="complete", prompt="def f():", max_tokens=limit)))


def test_a_default_max_tokens_is_lowered_to_what_the_context_leaves_not_refused(engine):
    limit = engine.context_limit
    def prompt_tokens(text: str) -> int:
        return len(engine.plan(GenerationRequest(mode="complete", prompt=text, max_tokens=1)).ids)

    per_line = prompt_tokens("x = 1\n" * 11) - prompt_tokens("x = 1\n" * 10)
    prompt = "x = 1\n" * ((limit - 40) // per_line)
    left = limit - prompt_tokens(prompt)
    assert 5 <= left <= 60
    asked = GenerationRequest(mode="complete", prompt=prompt, max_tokens=left + 1, sampling=GREEDY)
    with pytest.raises(ContextLengthExceeded):  # a max_tokens the client asked for stands
        next(engine.generate(asked))
    result = engine.complete(dataclasses.replace(asked, max_tokens_is_default=True))
    assert result.usage.completion_tokens <= left and result.usage.prompt_tokens + left == limit
    assert f"max_tokens lowered from the default {left + 1} to {left}" in result.warnings[-1]
    # a GenerationRequest made in Python without max_tokens: the default, lowered as the protocol's and the CLI's
    unasked = engine.complete(GenerationRequest(mode="complete", prompt=prompt, sampling=GREEDY))
    assert f"max_tokens lowered from the default {DEFAULT_MAX_TOKENS} to {left}" in unasked.warnings[-1]


def test_a_prompt_that_fills_the_context_is_refused_without_blaming_a_default_max_tokens(engine, hf_tok):
    """With max_tokens left to its default, a prompt that leaves no room is the prompt's fault:
    the error must not say "max_tokens is 256" (the user never asked for it, and --max-tokens 1
    would fail too)."""
    limit = engine.context_limit
    prompt = " ".join(["transformations"] * (limit - 1))
    assert 1 + len(enc(hf_tok, prompt)) == limit  # bos + one token a word: the whole context
    request = GenerationRequest(mode="complete", prompt=prompt, max_tokens_is_default=True)
    with pytest.raises(ContextLengthExceeded) as refused:
        next(engine.generate(request))
    message = str(refused.value)
    assert "max_tokens" not in message and f"the prompt has {limit} tokens" in message, message
    assert f"context limit of {limit}" in message and "nothing to generate" in message, message
    with pytest.raises(ContextLengthExceeded, match=f"max_tokens is 1: {limit + 1} tokens"):  # one asked for: named
        next(engine.generate(dataclasses.replace(request, max_tokens=1, max_tokens_is_default=False)))


@pytest.mark.parametrize("mode", ["complete", "infill", "chat"])
def test_a_huge_prompt_is_refused_from_its_length_before_it_is_tokenized(engine, mode):
    """Megabytes of text (a file piped in by mistake) are refused at once: no token covers more
    characters than the vocabulary's longest piece, so the length alone proves the overflow.
    Tokenized, these 8 million characters would take seconds and a GiB before the same answer."""
    text = "x = 1\n" * 1_400_000
    request = {"complete": GenerationRequest(mode="complete", prompt=text),
               "infill": GenerationRequest(mode="infill", prefix=text, suffix="\n"),
               "chat": GenerationRequest(mode="chat", messages=(Message("user", text),))}[mode]
    start = time.perf_counter()
    chars = {"complete": len(text), "infill": len(text) + 1, "chat": len(text.strip())}[mode]  # chat strips
    with pytest.raises(ContextLengthExceeded, match=rf"{chars} characters.* at least \d+ tokens"
                                                    rf".*context limit of {engine.context_limit}"):
        next(engine.generate(request))
    assert time.perf_counter() - start < 1.0


def test_a_chat_message_padded_with_whitespace_is_not_refused_for_its_padding(engine):
    """The chat formats strip each message: 100,000 spaces around a question are no tokens."""
    padding = " " * 50_000
    request = GenerationRequest(mode="chat", messages=(Message("user", f"{padding}Sort a list.{padding}"),),
                                max_tokens=2, sampling=GREEDY)
    assert engine.complete(request).usage.prompt_tokens < 20


def test_the_densest_text_right_at_the_limit_still_runs(engine, hf_tok):
    """The length rule above never refuses a prompt that fits: the vocabulary's longest piece,
    one token per 16 characters, up to the last free position."""
    limit = engine.context_limit
    words = ["transformations"] * (limit - 2)
    prompt = " ".join(words)
    assert len(enc(hf_tok, prompt)) == limit - 2  # one token a word: bos + prompt + 1 generated = the limit
    result = engine.complete(GenerationRequest(mode="complete", prompt=prompt, max_tokens=1, sampling=GREEDY))
    assert result.usage.prompt_tokens + result.usage.completion_tokens == limit


@pytest.mark.parametrize("field, request_", [
    ("max_tokens", GenerationRequest(mode="complete", prompt="x", max_tokens=0)),
    ("max_tokens must be an integer", GenerationRequest(mode="complete", prompt="x", max_tokens=5.5)),  # type: ignore
    ("seed must be an integer between 0 and 9223372036854775807",
     GenerationRequest(mode="complete", prompt="x", sampling=SamplingParams(seed=2**70))),
    # the wire's sampling fields as a dict (messages may be dicts): an AttributeError before
    ("sampling must be a SamplingParams, got dict",
     GenerationRequest(mode="complete", prompt="x", sampling={"temperature": 0})),  # type: ignore[arg-type]
    # a wall-clock string compared after the first token: a TypeError mid-stream before
    ("deadline must be a time.monotonic", GenerationRequest(mode="complete", prompt="x", deadline="10s")),  # type: ignore
])
def test_bad_request_fields_are_bad_requests_as_over_mqtt(engine, field, request_):
    with pytest.raises(BadRequest, match=field):
        next(engine.generate(request_))


def test_an_unknown_mode_is_unsupported_as_over_mqtt(engine):
    with pytest.raises(UnsupportedMode, match="mode must be one of"):
        next(engine.generate(GenerationRequest(mode="summarize", prompt="x")))  # type: ignore[arg-type]


def test_local_requests_take_the_wires_defaults_and_forms(engine):
    """Infill without a suffix is an empty suffix, and chat messages may be the wire's
    {"role", "content"} dicts, as over MQTT."""
    infill = engine.complete(GenerationRequest(mode="infill", prefix="def f(", max_tokens=4, sampling=GREEDY))
    again = engine.complete(GenerationRequest(mode="infill", prefix="def f(", suffix="", max_tokens=4,
                                              sampling=GREEDY))
    assert infill.token_ids == again.token_ids and infill.prompt_token_ids == again.prompt_token_ids
    as_dicts = engine.complete(GenerationRequest(mode="chat", messages=({"role": "user", "content": "hi"},),  # type: ignore
                                                 max_tokens=4, sampling=GREEDY))
    as_messages = engine.complete(GenerationRequest(mode="chat", messages=(Message("user", "hi"),), max_tokens=4,
                                                    sampling=GREEDY))
    assert as_dicts.prompt_token_ids == as_messages.prompt_token_ids and as_dicts.text == as_messages.text


def test_a_stream_waits_for_the_open_one_until_it_is_closed(engine):
    """One request at a time: a stream read halfway holds the engine; another, on another
    thread (or a pool's worker that read the first), waits until the first is closed."""
    first = engine.generate(GenerationRequest(mode="complete", prompt="x", max_tokens=8, sampling=GREEDY))
    next(first)  # the first stream holds the engine
    done = threading.Event()

    def second() -> None:
        engine.complete(GenerationRequest(mode="complete", prompt="y", max_tokens=2))
        done.set()

    worker = threading.Thread(target=second)
    worker.start()
    assert not done.wait(0.5)  # waiting for the engine
    first.close()  # closing the first frees it
    assert done.wait(30)
    worker.join()


def test_a_request_whose_deadline_passed_while_it_waited_for_the_engine_runs_nothing(engine):
    """A web app's requests queued behind an open stream: one whose deadline passed meanwhile
    raises DeadlineExceeded before its prompt runs (it ran the prompt and a token first)."""
    holder_prompt, late_prompt = "def first(a, b):\n    return", "import os\nimport sys\n\ndef main():\n"
    holder = engine.generate(GenerationRequest(mode="complete", prompt=holder_prompt, max_tokens=8, sampling=GREEDY))
    next(holder)  # the engine is held
    raised: list[BaseException] = []

    def late() -> None:
        try:
            engine.complete(GenerationRequest(mode="complete", prompt=late_prompt, max_tokens=8, sampling=GREEDY,
                                              deadline=time.monotonic() + 0.2))
        except BaseException as exc:
            raised.append(exc)

    worker = threading.Thread(target=late)
    worker.start()
    time.sleep(0.5)  # its deadline passes while it waits
    holder.close()
    worker.join(30)
    assert len(raised) == 1 and isinstance(raised[0], DeadlineExceeded)
    assert "waited for the engine" in str(raised[0])
    # the cache still holds the holder's prompt, which shares only <s> with the late one's
    again = engine.complete(GenerationRequest(mode="complete", prompt=late_prompt, max_tokens=8, sampling=GREEDY))
    assert again.usage.cached_prompt_tokens == 1


def test_the_loop_may_ask_the_engine_again_upon_the_result(engine, tiny_bundle):
    """The result is the stream's last item: the engine is free once it comes, so a loop
    that asks for a follow-up there goes on (it waited for its own stream forever)."""
    fresh = Engine.from_bundle(tiny_bundle, prompt_cache="off")
    first = GenerationRequest(mode="complete", prompt="def mean(xs):\n", max_tokens=6, sampling=GREEDY)
    got: list[GenerationResult] = []

    def chat() -> None:
        for item in engine.generate(first):
            if isinstance(item, GenerationResult):
                follow_up = GenerationRequest(mode="complete", prompt="def mean(xs):\n" + item.text + "\n",
                                              max_tokens=6, sampling=GREEDY)
                got.extend([item, engine.complete(follow_up)])

    worker = threading.Thread(target=chat, daemon=True)  # without the fix it would never end
    worker.start()
    worker.join(10)
    assert not worker.is_alive()
    assert got[0].token_ids == fresh.complete(first).token_ids
    assert got[1].token_ids == fresh.complete(GenerationRequest(
        mode="complete", prompt="def mean(xs):\n" + got[0].text + "\n", max_tokens=6, sampling=GREEDY)).token_ids


def test_a_request_cancelled_before_it_starts_generates_nothing(engine):
    cancel = threading.Event()
    cancel.set()
    items = list(engine.generate(GenerationRequest(mode="complete", prompt="def f():", max_tokens=8), cancel))
    assert len(items) == 1 and items[0].finish_reason == "cancelled" and items[0].token_ids == ()


def test_infill_refused_without_infilling_tokens(noinfill_bundle):
    engine = Engine.from_bundle(noinfill_bundle)
    with pytest.raises(UnsupportedMode, match="infill"):
        next(engine.generate(GenerationRequest(mode="infill", prefix="a", suffix="b")))
    # completion works on the same model
    result = engine.complete(GenerationRequest(mode="complete", prompt="x", max_tokens=3, sampling=GREEDY))
    assert result.usage.completion_tokens >= 1


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<step>"])
def test_chat_with_special_tag_refused(engine, tag):
    with pytest.raises(UnsafePrompt):
        next(engine.generate(GenerationRequest(mode="chat", messages=(Message("user", f"hi {tag} there"),))))


def test_cancel_between_tokens(engine):
    cancel = threading.Event()
    seen = []
    for item in engine.generate(GenerationRequest(mode="complete", prompt="def f():", max_tokens=64,
                                                  sampling=GREEDY), cancel=cancel):
        seen.append(item)
        if isinstance(item, Chunk) and len(seen) == 3:
            cancel.set()
    result = seen[-1]
    assert result.finish_reason == "cancelled"
    assert 3 <= result.usage.completion_tokens < 64


def test_streamed_chunks_are_valid_text_and_add_up(engine):
    _, result = run(engine, GenerationRequest(mode="complete", prompt="说明 😀 ", max_tokens=48,
                                              sampling=SamplingParams(temperature=1.0, seed=3)))
    chunks, again = run(engine, GenerationRequest(mode="complete", prompt="说明 😀 ", max_tokens=48,
                                                  sampling=SamplingParams(temperature=1.0, seed=3)))
    assert again.text == result.text == "".join(c.text for c in chunks)
    for c in chunks:
        c.text.encode("utf-8")  # valid, no lone surrogates
    assert sum(len(c.token_ids) for c in chunks) == len(again.token_ids)
    assert "说明 😀 " + result.text == engine.tokenizer.decode([*result.prompt_token_ids, *result.token_ids])
    assert result.timings.ttft_ms > 0 and result.timings.total_ms >= result.timings.ttft_ms


def test_generate_cli_json(tiny_bundle, tiny_checkpoint):
    out = subprocess.run([sys.executable, "-m", "edge_runtime", "generate", "--bundle", str(tiny_bundle),
                          "--prompt", "def f():", "--max-tokens", "8", "--temperature", "0", "--json"],
                         capture_output=True, text=True, check=True)
    reply = json.loads(out.stdout)
    assert set(reply) >= {"text", "token_ids", "prompt_token_ids", "finish_reason", "usage", "timings"}
    assert reply["token_ids"] == torch_reference.greedy(tiny_checkpoint, reply["prompt_token_ids"], 8, frozenset({2}))
    assert set(reply["timings"]) == {"ttft_ms", "decode_tokens_per_s", "total_ms"}


def test_one_token_has_no_decode_speed_null_in_json_not_zero(tiny_bundle):
    run = [sys.executable, "-m", "edge_runtime", "generate", "--bundle", str(tiny_bundle), "--prompt", "def f():",
           "--max-tokens", "1", "--temperature", "0"]
    reply = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True, check=True).stdout)
    assert reply["usage"]["completion_tokens"] == 1 and reply["timings"]["decode_tokens_per_s"] is None
    assert reply["timings"]["ttft_ms"] > 0
    assert "decode speed n/a]" in subprocess.run(run, capture_output=True, text=True, check=True).stderr


def test_generate_cli_bad_input_is_one_line_error(tiny_bundle, tmp_path):
    bad = tmp_path / "m.json"
    bad.write_text('[{"role": "user"}]')
    out = subprocess.run([sys.executable, "-m", "edge_runtime", "generate", "--bundle", str(tiny_bundle),
                          "--messages", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("error:")


@pytest.mark.parametrize("flags", [("--temperature", "nan"), ("--top-p", "1.5"), ("--top-k", "-1"),
                                   ("--max-tokens", "0"), ("--temperature", "inf"), ("--stop", "")])
def test_generate_cli_refuses_out_of_range_sampling_flags_before_the_load(flags):
    out = subprocess.run([sys.executable, "-m", "edge_runtime", "generate", "--bundle", "/nonexistent",
                          "--prompt", "x", *flags], capture_output=True, text=True)
    assert out.returncode == 2 and f"argument {flags[0]}: expected" in out.stderr and "Traceback" not in out.stderr


def test_generate_cli_into_a_closed_pipe_ends_quietly(tiny_bundle):
    """`edge-runtime generate ... | head -c 1`: no traceback when the reader has gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first token
    try:
        out = subprocess.run([sys.executable, "-m", "edge_runtime", "generate", "--bundle", str(tiny_bundle),
                              "--prompt", "def f():", "--max-tokens", "8", "--temperature", "0"],
                             stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert out.returncode == 141 and out.stderr == "", out.stderr  # 128 + SIGPIPE, as `head` leaves a shell tool


def test_generate_cli_writes_utf8_whatever_the_locale_says(tiny_bundle):
    """Code is UTF-8 and so is the stream, as llama.cpp writes it: an ASCII locale
    (PYTHONIOENCODING=ascii, LANG=en_US.ISO-8859-1) stopped at the first character it could
    not encode with a UnicodeEncodeError traceback, in text and in --json alike."""
    run = [sys.executable, "-m", "edge_runtime", "generate", "--bundle", str(tiny_bundle), "--prompt", "x",
           "--max-tokens", "12", "--temperature", "0"]
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    reply = json.loads(subprocess.run([*run, "--json"], capture_output=True, check=True).stdout.decode("utf-8"))
    assert not reply["text"].isascii()  # the random model's first tokens hold Cyrillic and Thai
    for flags in ([], ["--json"]):
        out = subprocess.run([*run, *flags], capture_output=True, env=env, timeout=120)
        assert out.returncode == 0 and b"Traceback" not in out.stderr, out.stderr.decode()
        text = out.stdout.decode("utf-8")
        assert (json.loads(text)["text"] if flags else text) == reply["text"] + ("" if flags else "\n")


def test_generate_cli_penalty_flags_reach_the_sampler(tiny_bundle, hf_tok, tiny_checkpoint):
    """--repeat-penalty, --presence-penalty, --frequency-penalty and --repeat-last-n give the
    tokens torch gives with the same penalties; out of range, they stop at the command line."""
    prompt = "def f(x):\n    return x + x + x + x"
    base = [sys.executable, "-m", "edge_runtime", "generate", "--bundle", str(tiny_bundle), "--prompt", prompt,
            "--max-tokens", "16", "--temperature", "0"]
    out = subprocess.run([*base, "--json", "--repeat-penalty", "1.3", "--presence-penalty", "0.2",
                          "--frequency-penalty", "0.1", "--repeat-last-n", "-1"],
                         capture_output=True, text=True, timeout=120, check=True)
    ids = [hf_tok.token_to_id("<s>")] + enc(hf_tok, prompt)
    assert json.loads(out.stdout)["token_ids"] == torch_reference.greedy_penalized(
        tiny_checkpoint, ids, 16, repetition_penalty=1.3, presence_penalty=0.2, frequency_penalty=0.1,
        stop_ids=frozenset({2}))
    for flag, value in [("--repeat-penalty", "0"), ("--presence-penalty", "2.5"), ("--repeat-last-n", "-2")]:
        bad = subprocess.run([*base, flag, value], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and f"argument {flag}" in bad.stderr, bad.stderr


def test_generate_cli_interrupted_mid_stream_ends_the_text_line_before_the_error(tiny_bundle):
    """Ctrl-C while the answer streams: the partial text, a newline, then `error: interrupted`
    on a line of its own (it followed the text on the same line), exit 130."""
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime", "generate", "--bundle", str(tiny_bundle),
                             "--prompt", "def f(x):", "--max-tokens", "2000", "--temperature", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(1)  # the answer has begun
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    assert first and proc.returncode == 130, (proc.returncode, err.decode())
    assert (first + rest).endswith(b"\n") and err.decode().splitlines()[-1] == "error: interrupted"


def test_generate_cli_into_a_full_disk_says_so_without_a_traceback(tiny_bundle):
    with open("/dev/full", "w") as full:  # every write fails with ENOSPC
        out = subprocess.run([sys.executable, "-m", "edge_runtime", "generate", "--bundle", str(tiny_bundle),
                              "--prompt", "def f():", "--max-tokens", "4", "--temperature", "0"],
                             stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr == "error: cannot write the output: No space left on device\n", \
        out.stderr


def test_generate_cli_runs_a_gpu_bundle_on_the_cpu_only_when_told(gpu_fp16_bundle):
    run = [sys.executable, "-m", "edge_runtime", "generate", "--bundle", str(gpu_fp16_bundle), "--prompt", "def f():",
           "--max-tokens", "3", "--temperature", "0", "--json"]
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():  # (on a GPU machine it just runs)
        refused = subprocess.run(run, capture_output=True, text=True)
        assert refused.returncode == 2 and "--allow-cpu-fallback on `generate`" in refused.stderr, refused.stderr
    done = subprocess.run([*run, "--allow-cpu-fallback"], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["usage"]["completion_tokens"] == 3


def test_generate_cli_request_errors_carry_the_protocols_code(tiny_bundle):
    """A request the model cannot take: exit 1, `error: CODE: message` as `ask` prints it,
    and with --json the error reply on stdout for scripts."""
    run = [sys.executable, "-m", "edge_runtime", "generate", "--bundle", str(tiny_bundle),
           "--prompt", "def f(): pass\n" * 3000, "--max-tokens", "4"]  # far past the tiny bundle's context
    out = subprocess.run(run, capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.startswith("error: context_length_exceeded: "), out.stderr
    out = subprocess.run([*run, "--json"], capture_output=True, text=True)
    assert out.returncode == 1 and json.loads(out.stdout)["error"]["code"] == "context_length_exceeded"
    # the numbers as fields: refused by its 42,000 characters before it was tokenized, so no prompt_tokens
    error = json.loads(out.stdout)["error"]
    limit = json.loads((tiny_bundle / "bundle.json").read_text())["context_limit"]
    assert {k: v for k, v in error.items() if k not in ("code", "message")} == {"max_tokens": 4, "context_limit": limit}


def test_generate_cli_chat_from_stdin_streams_text_and_warns_on_a_base_bundle(tiny_bundle):
    messages = json.dumps([{"role": "user", "content": "Reverse a list"}])
    run = [sys.executable, "-m", "edge_runtime", "generate", "--bundle", str(tiny_bundle), "--messages", "-",
           "--max-tokens", "6", "--temperature", "0"]
    text = subprocess.run(run, input=messages, capture_output=True, text=True, check=True)
    reply = json.loads(subprocess.run([*run, "--json"], input=messages, capture_output=True, text=True,
                                      check=True).stdout)
    assert text.stdout == reply["text"] + "\n"
    assert reply["warnings"] and f"warning: {reply['warnings'][0]}" in text.stderr.splitlines()


def test_cli_bad_log_level_is_a_usage_error_not_a_traceback():
    out = subprocess.run([sys.executable, "-m", "edge_runtime", "--log-level", "LOUD", "profiles"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "invalid choice: 'LOUD'" in out.stderr and "Traceback" not in out.stderr
    assert subprocess.run([sys.executable, "-m", "edge_runtime", "--log-level", "info", "profiles"],
                          capture_output=True, text=True).returncode == 0


def test_optimum_graph_bundle_equals_torch_in_each_mode(tiny_checkpoint, tmp_path, hf_tok, exporter):
    """The `optimum-kv-concat` flavour (optimum's exporter, `--graph optimum`) through the same
    engine; the fixtures' bundles have the default flavour, the fused `gqa-shared-kv`."""
    fused = Engine.from_bundle(exporter(tiny_checkpoint, tmp_path / "optimum", graph="optimum"))
    assert fused.bundle.graph_flavour == "optimum-kv-concat"
    requests = [GenerationRequest(mode="complete", prompt="def f(x):", max_tokens=N, sampling=GREEDY),
                GenerationRequest(mode="infill", prefix="x = ", suffix="\n", max_tokens=N, sampling=GREEDY),
                GenerationRequest(mode="chat", messages=(Message("user", "hi"),), max_tokens=N, sampling=GREEDY)]
    stops = {"complete": {2}, "infill": {2, hf_tok.token_to_id("▁<EOT>")}, "chat": {2}}
    for request in requests:
        result = fused.complete(request)
        expected = torch_reference.greedy(tiny_checkpoint, list(result.prompt_token_ids), N,
                                          frozenset(stops[request.mode]))
        assert list(result.token_ids) == expected, request.mode


def test_a_gpu_profile_without_its_gpu_provider_refuses_unless_the_fallback_is_allowed(tiny_bundle, monkeypatch):
    import onnxruntime

    from edge_runtime.errors import ConfigError

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ConfigError, match="allow_cpu_fallback = true in the daemon config's \\[model\\] table"):
        Engine.from_bundle(tiny_bundle, "nvidia-gpu")
    with pytest.raises(ConfigError):
        Engine.from_bundle(tiny_bundle, "nvidia-gpu", allow_cpu_fallback=False)
    engine = Engine.from_bundle(tiny_bundle, "nvidia-gpu", allow_cpu_fallback=True)  # the config's override
    assert engine.info.profile == "nvidia-gpu" and engine.info.provider == "CPUExecutionProvider"
    result = engine.complete(GenerationRequest(mode="complete", prompt="def f():", max_tokens=4, sampling=GREEDY))
    assert result.usage.completion_tokens == 4


@pytest.mark.parametrize("profile, says, never", [
    # PyPI's onnxruntime-gpu is not built for Tegra: a Jetson needs NVIDIA's JetPack wheel
    ("jetson-orin-nano", "install NVIDIA's onnxruntime-gpu wheel for this JetPack release", "pip install"),
    ("jetson-orin-agx", "install NVIDIA's onnxruntime-gpu wheel for this JetPack release", "pip install"),
    ("nvidia-gpu", "pip install onnxruntime-gpu, not onnxruntime", "JetPack"),
])
def test_a_gpu_profile_without_its_gpu_provider_says_how_to_install_it_for_that_device(tiny_bundle, monkeypatch,
                                                                                      profile, says, never):
    """The start-up error names the install that gives this device its GPU provider, as
    `profiles --detect` does, and the way to allow the CPU fallback."""
    import onnxruntime

    from edge_runtime.errors import ConfigError

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ConfigError) as refused:
        Engine.from_bundle(tiny_bundle, profile)
    message = str(refused.value)
    assert says in message and never not in message, message
    assert "allow_cpu_fallback = true in the daemon config's [model] table" in message


@pytest.fixture(scope="module")
def gpu_fp16_bundle(tiny_checkpoint, tmp_path_factory, exporter):
    """The tiny checkpoint exported for the nvidia-gpu profile: float16 activations and KV cache."""
    return exporter(tiny_checkpoint, tmp_path_factory.mktemp("gpu") / "fp16", precision="fp16", profile="nvidia-gpu",
                    skip_fidelity=True, allow_degraded=True)


def test_a_float32_cache_bundle_is_refused_for_the_gpu_before_its_session_is_made(tiny_bundle, monkeypatch):
    import onnxruntime

    from edge_runtime.errors import ConfigError

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession",
                        lambda *a, **k: pytest.fail("made the session (weights on the GPU) before refusing"))
    with pytest.raises(ConfigError, match="KV cache is float32, and on the GPU the fused graph's attention runs in "
                                          "float16 only"):
        Engine.from_bundle(tiny_bundle, "nvidia-gpu")


def test_a_gpu_provider_that_onnxruntime_lists_but_cannot_start_is_not_a_silent_cpu_run(gpu_fp16_bundle,
                                                                                        monkeypatch):
    """onnxruntime-gpu lists the CUDA provider even when the CUDA libraries it needs are
    missing; the session then quietly has the CPU provider alone. (A CPU onnxruntime told
    the provider is available behaves the same way.)"""
    import onnxruntime

    from edge_runtime.errors import ConfigError

    tiny_bundle = gpu_fp16_bundle

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    real_session = onnxruntime.InferenceSession

    def cuda_cannot_start(path, sess_options=None, providers=None, **kwargs):  # as on a GPU machine without cuBLAS
        return real_session(path, sess_options=sess_options, providers=["CPUExecutionProvider"], **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", cuda_cannot_start)
    with pytest.raises(ConfigError, match="could not start CUDAExecutionProvider .*only CPUExecutionProvider") as no:
        Engine.from_bundle(tiny_bundle, "nvidia-gpu")
    # the other cause, under systemd: a unit without the GPU drop-in hides the device nodes (CUDA finds no GPU)
    assert "edge-runtime.service.d/gpu.conf" in str(no.value) and "install-service --profile" in str(no.value)
    engine = Engine.from_bundle(tiny_bundle, "nvidia-gpu", allow_cpu_fallback=True)
    assert engine.info.provider == "CPUExecutionProvider" and engine.decoder.device == "cpu"
    result = engine.complete(GenerationRequest(mode="complete", prompt="def f():", max_tokens=4, sampling=GREEDY))
    assert result.usage.completion_tokens == 4


def test_a_jetson_profiles_tensorrt_cache_folder_that_cannot_be_made_drops_tensorrt_keeping_cudas_options(
        gpu_fp16_bundle, tmp_path, monkeypatch, caplog):
    """TensorRT's provider throws at creation when its engine cache folder cannot be made (a user
    other than the service's, where /var/cache/edge-runtime is not theirs); onnxruntime's Python
    then quietly makes the session again with a bare CUDA provider, losing the profile's CUDA
    options (the arena that does not grow in powers of two on a Jetson's shared memory). The
    engine makes the folder itself, or runs CUDA with its options and says which folder and why."""
    import onnxruntime

    from edge_runtime.profiles import profile_text

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    profile = tmp_path / "jetson-orin-nano.toml"
    profile.write_text(profile_text("jetson-orin-nano").replace("/var/cache/edge-runtime/trt", str(blocked / "trt")))
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    real_session, asked = onnxruntime.InferenceSession, []

    def session_on_the_cpu(path, sess_options=None, providers=None, **kwargs):
        asked.append(providers)
        return real_session(path, sess_options=sess_options, providers=["CPUExecutionProvider"], **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session_on_the_cpu)
    with caplog.at_level("WARNING", logger="edge_runtime"):
        Engine.from_bundle(gpu_fp16_bundle, profile, allow_cpu_fallback=True)
    assert asked[0] == [("CUDAExecutionProvider", {"device_id": "0", "arena_extend_strategy": "kSameAsRequested"}),
                        ("CPUExecutionProvider", {})]
    assert f"cannot make TensorRT's engine cache folder {blocked / 'trt'}" in caplog.text

    roomy = tmp_path / "cache" / "edge-runtime" / "trt"  # a folder this user can make: made, TensorRT kept
    profile.write_text(profile_text("jetson-orin-nano").replace("/var/cache/edge-runtime/trt", str(roomy)))
    Engine.from_bundle(gpu_fp16_bundle, profile, allow_cpu_fallback=True)
    assert roomy.is_dir() and [name for name, _ in asked[1]] == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                                 "CPUExecutionProvider"]


def test_each_bundle_has_its_own_tensorrt_engine_cache_folder(gpu_fp16_bundle, tmp_path, monkeypatch):
    """onnxruntime names a cached TensorRT engine by the graph's file name, input and node output
    names and its own, CUDA's and TensorRT's versions, never the weights: a second bundle of the
    same graph (the model exported again after an upgrade, or fine-tuned) in the profile's one
    folder loaded the first one's engines, its weights baked in. Each bundle's engines go in a
    folder named by its bundle.json's SHA-256; the timing cache (no weights) stays shared."""
    import onnxruntime

    from edge_runtime.bundle import load_bundle
    from edge_runtime.profiles import profile_text

    cache = tmp_path / "cache" / "trt"
    profile = tmp_path / "jetson-orin-nano.toml"
    profile.write_text(profile_text("jetson-orin-nano").replace("/var/cache/edge-runtime/trt", str(cache)))
    again = shutil.copytree(gpu_fp16_bundle, tmp_path / "exported-again")  # the same graph: another bundle.json
    manifest = json.loads((again / "bundle.json").read_text())
    (again / "bundle.json").write_text(json.dumps({**manifest, "created": "2027-01-01T00:00:00Z"}))
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    real_session, asked = onnxruntime.InferenceSession, []

    def session_on_the_cpu(path, sess_options=None, providers=None, **kwargs):
        asked.append(dict(providers)["TensorrtExecutionProvider"])
        return real_session(path, sess_options=sess_options, providers=["CPUExecutionProvider"], **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session_on_the_cpu)
    for bundle in (gpu_fp16_bundle, again, gpu_fp16_bundle):
        Engine.from_bundle(bundle, profile, allow_cpu_fallback=True)
    first, second = (str(cache / load_bundle(b).manifest_sha256[:16]) for b in (gpu_fp16_bundle, again))
    assert [opts["trt_engine_cache_path"] for opts in asked] == [first, second, first]
    assert {opts["trt_timing_cache_path"] for opts in asked} == {str(cache)}
    assert (cache / load_bundle(again).manifest_sha256[:16]).is_dir()


def test_onnxruntimes_own_fallback_to_the_next_provider_after_a_failed_run_is_off(engine):
    """onnxruntime's Python session, when its provider fails a run (EPFail), makes itself again
    on the next providers and runs there, saying so only on stdout: a GPU profile's session would
    go on on the CPU, the silent fallback the profiles forbid. The engine turns that off, so a
    failed run fails."""
    assert engine.session._enable_fallback is False


def test_the_gpu_profiles_cuda_graphs_are_off_for_a_bundle_whose_kv_cache_grows(tiny_checkpoint, tmp_path,
                                                                                  exporter, monkeypatch, caplog):
    """nvidia-gpu turns CUDA graphs on; a recorded step needs the fused graph's fixed KV buffers,
    so an optimum-graph bundle runs without them, with a warning that says how to get them."""
    import onnxruntime

    from edge_runtime.profiles import load_profile

    cuda = dict(load_profile("nvidia-gpu").ort_providers())["CUDAExecutionProvider"]
    assert cuda["enable_cuda_graph"] == "1"
    bundle = exporter(tiny_checkpoint, tmp_path / "optimum", graph="optimum")
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    real_session, asked = onnxruntime.InferenceSession, []

    def session_on_the_cpu(path, sess_options=None, providers=None, **kwargs):
        asked.append(providers)
        return real_session(path, sess_options=sess_options, providers=["CPUExecutionProvider"], **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session_on_the_cpu)
    with caplog.at_level("WARNING", logger="edge_runtime.engine"):
        Engine.from_bundle(bundle, "nvidia-gpu", allow_cpu_fallback=True)
    assert dict(asked[0])["CUDAExecutionProvider"] == {**cuda, "enable_cuda_graph": "0"}
    assert "run without them (export it with --graph fused" in caplog.text


@pytest.mark.parametrize("words", [
    # onnxruntime 1.32's wording (its Fail exception), then the older releases'
    "This session cannot use the graph capture feature as requested by the user  as all compute graph nodes have "
    "not been partitioned to the CUDAExecutionProvider",
    "This session cannot use the CUDA Graph feature as requested by the user as all compute graph nodes have not "
    "been partitioned to the CUDA EP.",
])
def test_a_fused_bundle_whose_nodes_cannot_all_be_recorded_runs_without_cuda_graphs(gpu_fp16_bundle, monkeypatch,
                                                                                      caplog, words):
    """onnxruntime refuses, at load, CUDA graphs for a session whose nodes are not all on CUDA
    (an operator without a CUDA kernel in the installed version): the engine loads it again
    without them and says so, rather than not starting."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    real_session, asked = onnxruntime.InferenceSession, []

    def refusing_graphs(path, sess_options=None, providers=None, **kwargs):
        asked.append(dict(providers)["CUDAExecutionProvider"]["enable_cuda_graph"])
        if asked[-1] == "1":
            from onnxruntime.capi.onnxruntime_pybind11_state import Fail

            raise Fail(words)
        return real_session(path, sess_options=sess_options, providers=["CPUExecutionProvider"], **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", refusing_graphs)
    with caplog.at_level("WARNING", logger="edge_runtime.engine"):
        engine = Engine.from_bundle(gpu_fp16_bundle, "nvidia-gpu", allow_cpu_fallback=True)
    assert asked == ["1", "0"]  # the fused graph asks for them first
    assert "cannot record CUDA graphs" in caplog.text and not engine.decoder.cuda_graph


@pytest.mark.parametrize("version, blamed", [("1.32.0", False), ("1.31.1", True)])
def test_an_int8_cache_bundle_that_fails_to_load_blames_the_version_only_when_it_is_older(
        demo_int4_bundle, monkeypatch, version, blamed):
    """A session that fails to open on an onnxruntime with the int8 cache kernel (1.32) says
    onnxruntime's own reason (memory, a damaged graph), not "upgrade to the version you have"."""
    import onnxruntime

    def failing(*args, **kwargs):
        raise RuntimeError("Failed to allocate memory for requested buffer of size 123")

    monkeypatch.setattr(onnxruntime, "InferenceSession", failing)
    monkeypatch.setattr(onnxruntime, "__version__", version)
    with pytest.raises(Exception) as caught:
        Engine.from_bundle(demo_int4_bundle)
    assert "Failed to allocate memory" in str(caught.value)
    assert ("needs onnxruntime 1.32 or newer" in str(caught.value)) == blamed


@pytest.mark.parametrize("version, blamed", [("1.20.0", False), ("1.16.3", True)])
def test_a_gpu_session_that_fails_on_an_onnxruntime_older_than_the_gpu_extras_says_so(
        gpu_fp16_bundle, monkeypatch, version, blamed):
    """A Jetson installs onnxruntime-gpu outside the gpu extra (NVIDIA's wheel), so pip does not hold
    it to the extra's floor (1.20); JetPack 5's older wheels fail at load on the graph's operators
    or the profile's options. The error says which version the GPU profiles need; on a version at
    or above it, onnxruntime's own reason stands alone."""
    import onnxruntime

    def failing(*args, **kwargs):
        raise RuntimeError("Invalid TensorRT EP option: trt_timing_cache_path")

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", failing)
    monkeypatch.setattr(onnxruntime, "__version__", version)
    with pytest.raises(Exception) as caught:
        Engine.from_bundle(gpu_fp16_bundle)
    assert "Invalid TensorRT EP option: trt_timing_cache_path" in str(caught.value)
    assert ("the GPU profiles need onnxruntime-gpu 1.20 or newer" in str(caught.value)) == blamed, caught.value


def test_the_gpu_onnxruntime_floor_is_the_gpu_extras():
    import re
    from pathlib import Path

    from edge_runtime.engine import GPU_ONNXRUNTIME

    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    floor = re.search(r'^gpu = \["onnxruntime-gpu>=(\d+)\.(\d+)"\]', pyproject, re.MULTILINE)
    assert floor and tuple(map(int, floor.groups())) == GPU_ONNXRUNTIME


def test_a_profiles_session_config_reaches_the_onnxruntime_session(tiny_bundle, monkeypatch):
    """[session_config] entries (settings of the session and its kernels that are not provider
    options, such as the CUDA provider's int4 kernel choice) are set on the session's options,
    booleans as onnxruntime's "1"/"0"; the session still loads and generates."""
    import onnxruntime

    from edge_runtime.profiles import load_profile

    profile = load_profile("cpu-x86_64").with_session_config(
        {"ep.cuda.fpa_intb_gemm": True, "session.intra_op.allow_spinning": "0"})
    real_session, options = onnxruntime.InferenceSession, []

    def recording(path, sess_options=None, providers=None, **kwargs):
        options.append(sess_options)
        return real_session(path, sess_options=sess_options, providers=providers, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording)
    engine = Engine.from_bundle(tiny_bundle, profile)
    assert options[0].get_session_config_entry("ep.cuda.fpa_intb_gemm") == "1"
    assert options[0].get_session_config_entry("session.intra_op.allow_spinning") == "0"
    result = engine.complete(GenerationRequest(mode="complete", prompt="def f():", max_tokens=3, sampling=GREEDY))
    assert result.usage.completion_tokens == 3


def test_the_provider_reported_is_the_one_the_session_started():
    """A Jetson profile asks for TensorRT, then CUDA: where TensorRT cannot start, the engine
    reports CUDA (what runs), not TensorRT; where neither starts, it refuses."""
    from edge_runtime.engine import check_session_providers
    from edge_runtime.errors import ConfigError
    from edge_runtime.profiles import load_profile
    from edge_runtime.providers import ProviderChoice

    class Session:
        def __init__(self, providers):
            self.providers = providers

        def get_providers(self):
            return self.providers

    choice = ProviderChoice([("TensorrtExecutionProvider", {}), ("CUDAExecutionProvider", {}),
                             ("CPUExecutionProvider", {})], "cuda", "execution providers: all three")
    profile = load_profile("jetson-orin-agx")
    got = check_session_providers(Session(["CUDAExecutionProvider", "CPUExecutionProvider"]), choice, profile)
    assert [name for name, _ in got.providers] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert got.device == "cuda" and "TensorrtExecutionProvider could not start" in got.note
    assert check_session_providers(Session([n for n, _ in choice.providers]), choice, profile) is choice
    with pytest.raises(ConfigError, match="could not start TensorrtExecutionProvider, CUDAExecutionProvider"):
        check_session_providers(Session(["CPUExecutionProvider"]), choice, profile)


class _SaysIds:
    """A decoder whose every step's logits make greedy decoding pick the next of `ids` (the
    engine's own loop, detokenizer and stop strings then run on chosen ids)."""

    verify_rows_max = 0

    def __init__(self, ids: list[int], vocab_size: int) -> None:
        self.ids, self.vocab_size, self.step = ids, vocab_size, 0

    def new_cache(self, capacity, prompt=None):
        self.step = 0
        return type("Cache", (), {"length": 0})()

    def _logits(self):
        import numpy as np

        row = np.zeros(self.vocab_size, dtype=np.float32)
        row[self.ids[min(self.step, len(self.ids) - 1)]] = 1.0
        self.step += 1
        return row

    def prefill(self, cache, ids, interrupted=None):
        return self._logits()[None, :]

    def decode(self, cache, token):
        return self._logits()


def test_a_stop_string_completed_by_a_cut_off_character_at_the_end_is_a_stop(tiny_bundle, hf_tok):
    """max_tokens ends the answer inside a byte-fallback character: the flush gives U+FFFD, as
    tokenizers' decode does, and a stop string that it completes ends the text there, so the
    finish reason is "stop", not "length"."""
    said = Engine.from_bundle(tiny_bundle, prompt_lookup=False)
    x, e2, x82 = hf_tok.token_to_id("▁x"), 3 + 0xE2, 3 + 0x82  # "€" is E2 82 AC: cut after two bytes
    said.decoder = _SaysIds([x, e2, x82], said.tokenizer.vocab_size)
    request = GenerationRequest(mode="complete", prompt="a", max_tokens=3, sampling=GREEDY)
    chunks, result = run(said, request)
    # the reference: tokenizers' decode of prompt and answer is the prompt followed by the text
    assert hf_tok.decode([*result.prompt_token_ids, x, e2, x82]) == "a" + result.text
    assert "".join(c.text for c in chunks) == result.text == " x\ufffd\ufffd"
    assert result.finish_reason == "length"
    chunks, result = run(said, dataclasses.replace(request, stop=("x\ufffd",)))
    assert "".join(c.text for c in chunks) == result.text == " "
    assert result.finish_reason == "stop" and result.token_ids == (x, e2, x82)
