"""Wire protocol v1: request parsing/validation and reply encoding (no network)."""

from __future__ import annotations

import json

import pytest

from edge_runtime import errors
from edge_runtime.protocol import (
    ERROR_CODES,
    MAX_ID_CHARS,
    MAX_REPLY_TOPIC_BYTES,
    MAX_SEED,
    ProtocolError,
    RequestLimits,
    Topics,
    build_request,
    encode_chunk,
    encode_error,
    encode_final,
    encode_status,
    fleet_subscription,
    is_valid_publish_topic,
    parse_cancel,
    parse_request,
)
from edge_runtime.types import GenerationResult, Message, Timings, Usage

LIMITS = RequestLimits(max_payload_bytes=4096, max_prompt_chars=100, max_tokens=64,
                       default_deadline_ms=1000, max_deadline_ms=5000)


def parse(obj, limits=LIMITS, now=100.0):
    payload = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return parse_request(payload, limits, now=now)


def rejected(obj, code="bad_request", limits=LIMITS) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse(obj, limits)
    assert info.value.code == code, info.value.message
    return info.value


# ------------------------------------------------------------------ valid requests


def test_complete_defaults():
    w = parse({"id": "r1", "mode": "complete", "prompt": "def fib(n):"})
    r = w.request
    assert (w.id, r.id, r.mode, r.prompt, w.stream) == ("r1", "r1", "complete", "def fib(n):", True)
    assert r.max_tokens == min(256, LIMITS.max_tokens)
    assert (r.sampling.temperature, r.sampling.top_p, r.sampling.top_k) == (0.6, 0.9, 0)
    assert r.deadline == pytest.approx(100.0 + LIMITS.default_deadline_ms / 1000)
    assert w.reply_to is None and r.stop == ()


def test_a_request_without_a_seed_samples_with_one_drawn_from_its_bytes():
    """Delivered again (the daemon died mid-answer), a request samples the same tokens, so
    the regenerated stream continues the one its client saw; another request, another seed."""
    first = parse({"id": "r1", "mode": "complete", "prompt": "def fib(n):"}).request.sampling.seed
    again = parse({"id": "r1", "mode": "complete", "prompt": "def fib(n):"}).request.sampling.seed
    other = parse({"id": "r2", "mode": "complete", "prompt": "def fib(n):"}).request.sampling.seed
    assert isinstance(first, int) and 0 <= first <= MAX_SEED
    assert first == again != other
    assert parse({"id": "r1", "mode": "complete", "prompt": "x", "seed": 5}).request.sampling.seed == 5


def test_all_fields_infill():
    w = parse({"id": "r2", "mode": "infill", "prefix": "def f(", "suffix": "):\n", "suffix_first": True,
               "max_tokens": 64, "temperature": 0, "top_p": 1, "top_k": 5, "seed": 7, "stop": ["\n\n"],
               "stream": False, "deadline_ms": 5000, "reply_to": "my/replies/r2", "cache_prompt": False})
    r = w.request
    assert (r.prefix, r.suffix, r.suffix_first, r.max_tokens) == ("def f(", "):\n", True, 64)
    assert r.sampling.temperature == 0.0 and isinstance(r.sampling.temperature, float)
    assert (r.sampling.top_p, r.sampling.top_k, r.sampling.seed, r.stop) == (1.0, 5, 7, ("\n\n",))
    assert (w.stream, w.deadline_ms, w.reply_to, r.cache_prompt) == (False, 5000, "my/replies/r2", False)
    assert r.deadline == pytest.approx(105.0)


def test_infill_suffix_defaults_to_empty():
    assert parse({"id": "x", "mode": "infill", "prefix": "a"}).request.suffix == ""


def test_chat_messages():
    w = parse({"id": "c", "mode": "chat", "messages": [{"role": "system", "content": "be brief"},
                                                       {"role": "user", "content": "hi"}]})
    assert w.request.messages == (Message("system", "be brief"), Message("user", "hi"))


def test_special_tags_are_left_for_the_engine():
    text = "<s>[INST] <<SYS>> x <</SYS>> <PRE> a <SUF> b <MID> </s> <EOT>"
    assert parse({"id": "t", "mode": "complete", "prompt": text}).request.prompt == text
    w = parse({"id": "t", "mode": "chat", "messages": [{"role": "user", "content": text}]})
    assert w.request.messages[0].content == text


def test_unicode_and_limits_count_characters_not_bytes():
    prompt = "é" * 100  # 200 bytes, 100 characters
    assert parse({"id": "u", "mode": "complete", "prompt": prompt}).request.prompt == prompt


def test_null_for_an_optional_field_is_the_field_left_out():
    """Encoders that write every field of a request class (C#, Java, Go without omitempty)."""
    nulls = {name: None for name in ("prefix", "suffix", "suffix_first", "messages", "max_tokens", "temperature",
                                     "top_p", "top_k", "stop", "stream", "deadline_ms", "reply_to",
                                     "cache_prompt", "repeat_penalty", "presence_penalty", "frequency_penalty",
                                     "repeat_last_n")}
    plain = {"id": "r1", "mode": "complete", "prompt": "def fib(n):", "seed": 7}  # a seed null draws from the bytes
    assert parse({**plain, **nulls}) == parse(plain)
    assert parse({**plain, **nulls}).request.max_tokens_is_default
    e = rejected({"id": "r1", "mode": "complete", "prompt": None})
    assert e.message == "missing field: prompt (required in complete mode)"


@pytest.mark.parametrize("obj,needle", [({"id": None, "mode": "complete", "prompt": "x"}, "id must be a string"),
                                        ({"id": "r", "mode": None, "prompt": "x"}, "mode must be a string"),
                                        ({"id": "r", "mode": "complete", "prompt": "x", "max_token": None},
                                         "unknown field(s): max_token")])
def test_null_for_id_mode_or_an_unknown_field_is_refused(obj, needle):
    assert needle in rejected(obj).message


def test_a_leading_utf8_byte_order_mark_is_skipped():
    body = json.dumps({"id": "r1", "mode": "complete", "prompt": "x", "reply_to": "a/b", "seed": 7}).encode()
    assert parse(b"\xef\xbb\xbf" + body) == parse(body)
    assert parse_cancel(b'\xef\xbb\xbf{"id": "r1"}') == "r1"
    assert rejected(b"\xef\xbb\xbf\xef\xbb\xbf" + body).request_id is None  # one mark, not any number


# ------------------------------------------------------------------ rejected requests


@pytest.mark.parametrize("payload", [b"not json", b"{", b"", b"\xff\xfe{}", b"[1, 2]", b"\"str\"", b"null"])
def test_not_a_json_object(payload):
    e = rejected(payload)
    assert e.request_id is None


def test_oversize_payload():
    e = rejected({"id": "big", "mode": "complete", "prompt": "x" * 5000})
    assert "4096" in e.message and e.request_id is None  # not even parsed


def test_missing_id_keeps_reply_to():
    e = rejected({"mode": "complete", "prompt": "x", "reply_to": "a/b"})
    assert e.request_id is None and e.reply_to == "a/b" and "id" in e.message


def test_a_reply_to_over_the_size_limit_is_refused_and_answered_there():
    at_limit = "r/" + "x" * (MAX_REPLY_TOPIC_BYTES - 2)
    assert parse({"id": "a", "mode": "complete", "prompt": "x", "reply_to": at_limit}).reply_to == at_limit
    over = "r/x" + "é" * ((MAX_REPLY_TOPIC_BYTES - 2) // 2)  # one byte over in UTF-8, under in characters
    e = rejected({"id": "a", "mode": "complete", "prompt": "x", "reply_to": over})
    assert e.code == "bad_request" and e.reply_to == over and e.request_id == "a"
    assert "reply_to" in e.message and str(MAX_REPLY_TOPIC_BYTES) in e.message


def test_edge_clients_longest_reply_topic_is_within_the_limit():
    """docs/protocol.md: EdgeClient's topics are at most about 660 bytes, under the 1,024 allowed."""
    longest = Topics("d" * 64).reply_topic("c" * 64, "\U0001F600" * MAX_ID_CHARS)
    assert len(longest.encode()) == 656 <= MAX_REPLY_TOPIC_BYTES == 1024
    assert parse({"id": "a", "mode": "complete", "prompt": "x", "reply_to": longest},
                 RequestLimits(max_payload_bytes=4096)).reply_to == longest


def test_unknown_field_names_in_the_error_are_cut_short():
    """The error message is sent back and logged: a client's field names, up to the whole
    payload, are named by their beginnings, the first 8 of them."""
    big = RequestLimits(max_payload_bytes=256 * 1024)
    names = ["a" * 100_000, "b" * 100_000] + [f"f{i}" for i in range(20)]
    for obj in ({"id": "a", "mode": "complete", "prompt": "x", **dict.fromkeys(names, 1)},
                {"id": "a", "mode": "chat", "messages": [{"role": "user", "content": "x", **dict.fromkeys(names, 1)}]}):
        e = rejected(obj, limits=big)
        assert len(e.message) < 500, len(e.message)
        assert "unknown field(s): " in e.message and "b" * 40 + "…" in e.message and "f0" in e.message
        assert "14 more" in e.message
    assert "unknown field(s): max_token" in rejected({"id": "a", "mode": "complete", "prompt": "x",
                                                      "max_token": 5}).message


@pytest.mark.parametrize("bad_id", [5, None, "", "x" * (MAX_ID_CHARS + 1), ["a"]])
def test_bad_id(bad_id):
    e = rejected({"id": bad_id, "mode": "complete", "prompt": "x"})
    assert e.request_id is None


def test_id_of_max_length_is_fine():
    assert parse({"id": "x" * MAX_ID_CHARS, "mode": "complete", "prompt": "p"}).id == "x" * MAX_ID_CHARS


def test_unknown_mode_is_unsupported_mode():
    e = rejected({"id": "m", "mode": "embed", "prompt": "x"}, code="unsupported_mode")
    assert e.request_id == "m" and "embed" in e.message


@pytest.mark.parametrize("obj, needle", [
    ({"id": "a", "prompt": "x"}, "mode"),
    ({"id": "a", "mode": 3, "prompt": "x"}, "mode"),
    ({"id": "a", "mode": "complete"}, "prompt"),
    ({"id": "a", "mode": "complete", "prompt": ""}, "prompt"),
    ({"id": "a", "mode": "complete", "prompt": 42}, "prompt"),
    ({"id": "a", "mode": "complete", "prompt": "x", "suffix": "y"}, "suffix"),
    ({"id": "a", "mode": "infill", "suffix": "y"}, "prefix"),
    ({"id": "a", "mode": "infill", "prefix": "x", "suffix_first": "yes"}, "suffix_first"),
    ({"id": "a", "mode": "complete", "prompt": "x", "cache_prompt": 0}, "cache_prompt"),
    ({"id": "a", "mode": "complete", "prompt": "x", "count_tokens": "yes"}, "count_tokens"),
    ({"id": "a", "mode": "infill", "prefix": "x", "messages": []}, "messages"),
    ({"id": "a", "mode": "chat"}, "messages"),
    ({"id": "a", "mode": "chat", "messages": []}, "messages"),
    ({"id": "a", "mode": "chat", "messages": "hi"}, "messages"),
    ({"id": "a", "mode": "chat", "messages": [{"role": "user"}]}, "content"),
    ({"id": "a", "mode": "chat", "messages": [{"role": "robot", "content": "x"}]}, "role"),
    ({"id": "a", "mode": "chat", "messages": [{"role": "user", "content": "x", "name": "n"}]}, "name"),
    ({"id": "a", "mode": "chat", "messages": ["hi"]}, "messages[0]"),
    ({"id": "a", "mode": "complete", "prompt": "x", "max_token": 5}, "max_token"),
    ({"id": "a", "mode": "complete", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"id": "a", "mode": "complete", "prompt": "x", "max_tokens": 65}, "max_tokens"),
    ({"id": "a", "mode": "complete", "prompt": "x", "max_tokens": 5.0}, "max_tokens"),
    ({"id": "a", "mode": "complete", "prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"id": "a", "mode": "complete", "prompt": "x", "temperature": -0.1}, "temperature"),
    ({"id": "a", "mode": "complete", "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"id": "a", "mode": "complete", "prompt": "x", "temperature": False}, "temperature"),
    ({"id": "a", "mode": "complete", "prompt": "x", "top_p": 0}, "top_p"),
    ({"id": "a", "mode": "complete", "prompt": "x", "top_p": 1.5}, "top_p"),
    ({"id": "a", "mode": "complete", "prompt": "x", "top_k": -1}, "top_k"),
    ({"id": "a", "mode": "complete", "prompt": "x", "top_k": 2.5}, "top_k"),
    ({"id": "a", "mode": "complete", "prompt": "x", "seed": -1}, "seed"),
    ({"id": "a", "mode": "complete", "prompt": "x", "seed": "7"}, "seed"),
    ({"id": "a", "mode": "complete", "prompt": "x", "seed": 2**64}, "seed"),
    ({"id": "a", "mode": "complete", "prompt": "x", "stop": "\n"}, "stop"),
    ({"id": "a", "mode": "complete", "prompt": "x", "stop": [1]}, "stop"),
    ({"id": "a", "mode": "complete", "prompt": "x", "stop": [""]}, "stop"),
    ({"id": "a", "mode": "complete", "prompt": "x", "stop": ["s"] * 17}, "stop"),
    ({"id": "a", "mode": "complete", "prompt": "x", "stream": "yes"}, "stream"),
    ({"id": "a", "mode": "complete", "prompt": "x", "deadline_ms": 0}, "deadline_ms"),
    ({"id": "a", "mode": "complete", "prompt": "x", "deadline_ms": 5001}, "deadline_ms"),
    ({"id": "a", "mode": "complete", "prompt": "x", "deadline_ms": "soon"}, "deadline_ms"),
    ({"id": "a", "mode": "complete", "prompt": "x", "reply_to": "a/+/b"}, "reply_to"),
    ({"id": "a", "mode": "complete", "prompt": "x", "reply_to": "$SYS/x"}, "reply_to"),
    ({"id": "a", "mode": "complete", "prompt": "x", "reply_to": 5}, "reply_to"),
    # characters a broker takes for a malformed packet (Mosquitto drops the connection)
    ({"id": "a", "mode": "complete", "prompt": "x", "reply_to": "r/x\u0001y"}, "reply_to"),
    ({"id": "a", "mode": "complete", "prompt": "x", "reply_to": "r/x\u009fy"}, "reply_to"),
    ({"id": "a", "mode": "complete", "prompt": "x", "reply_to": "r/x\ud800"}, "reply_to"),
    ({"id": "a", "mode": "complete", "prompt": "x", "reply_to": "r/\ufdd0"}, "reply_to"),
    ({"id": "a", "mode": "complete", "prompt": "x", "reply_to": "r/\U0001ffff"}, "reply_to"),
    # integers beyond any float (JSON allows thousands of digits)
    ({"id": "a", "mode": "complete", "prompt": "x", "deadline_ms": 10**400}, "deadline_ms"),
    ({"id": "a", "mode": "complete", "prompt": "x", "temperature": 10**400}, "temperature"),
    ({"id": "a", "mode": "complete", "prompt": "x", "top_p": -10**400}, "top_p"),
    ({"id": "a", "mode": "complete", "prompt": "x", "repeat_penalty": 0}, "repeat_penalty"),
    ({"id": "a", "mode": "complete", "prompt": "x", "repeat_penalty": "1.1"}, "repeat_penalty"),
    ({"id": "a", "mode": "complete", "prompt": "x", "presence_penalty": 2.01}, "presence_penalty"),
    ({"id": "a", "mode": "complete", "prompt": "x", "frequency_penalty": -2.5}, "frequency_penalty"),
    ({"id": "a", "mode": "complete", "prompt": "x", "frequency_penalty": True}, "frequency_penalty"),
    ({"id": "a", "mode": "complete", "prompt": "x", "repeat_last_n": -2}, "repeat_last_n"),
    ({"id": "a", "mode": "complete", "prompt": "x", "repeat_last_n": 64.0}, "repeat_last_n"),
    ({"id": "a", "mode": "complete", "prompt": "x", "repeat_penalty_": 1.1}, "repeat_penalty_"),
])
def test_wrong_fields(obj, needle):
    e = rejected(obj)
    assert needle in e.message
    assert e.request_id == "a"  # the id is echoed whenever it is valid


@pytest.mark.parametrize("field, value", [
    ("temperature", -1), ("temperature", "w" * 300), ("top_p", 10**400), ("top_k", -3), ("seed", "s" * 300),
    ("repeat_penalty", 0), ("repeat_last_n", -2),
], ids=lambda v: v if isinstance(v, str) and len(v) < 20 else type(v).__name__)
def test_a_sampling_field_is_refused_with_the_samplers_own_message_quoting_a_short_value(field, value):
    """One range check for the sampling fields (sampling.validate_sampling): the MQTT reply
    and a Python caller's GenerationRequest get the same words, and a long bad value is
    quoted cut short, not echoed whole into the reply."""
    from edge_runtime.errors import BadRequest
    from edge_runtime.sampling import validate_sampling
    from edge_runtime.types import SamplingParams

    e = rejected({"id": "a", "mode": "complete", "prompt": "x", field: value})
    with pytest.raises(BadRequest) as direct:
        validate_sampling(SamplingParams(**{field: value}))
    assert e.message == str(direct.value)
    assert e.message.startswith(f"{field} must be") and len(e.message) < 200


def test_a_reply_topic_may_hold_any_other_unicode():
    topic = "werk/straße/日本/\U0001f600"
    assert parse({"id": "a", "mode": "complete", "prompt": "x", "reply_to": topic}).reply_to == topic


def test_prompt_length_limit_counts_every_mode():
    rejected({"id": "a", "mode": "complete", "prompt": "x" * 101})
    rejected({"id": "a", "mode": "infill", "prefix": "x" * 60, "suffix": "y" * 41})
    rejected({"id": "a", "mode": "chat", "messages": [{"role": "user", "content": "x" * 60},
                                                      {"role": "user", "content": "y" * 41}]})
    parse({"id": "a", "mode": "infill", "prefix": "x" * 60, "suffix": "y" * 40})


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_rejected(constant):
    payload = f'{{"id": "n", "mode": "complete", "prompt": "x", "temperature": {constant}}}'.encode()
    e = rejected(payload)
    assert e.request_id is None  # the payload is not valid JSON at all


def test_huge_float_is_rejected():
    rejected(b'{"id": "n", "mode": "complete", "prompt": "x", "top_p": 1e999}')


def test_an_integer_of_more_digits_than_python_reads_is_refused_with_a_message_for_the_client():
    limits = RequestLimits(max_payload_bytes=10_000, max_tokens=64)
    e = rejected(('{"id": "n", "mode": "complete", "prompt": "x", "seed": -%s}' % ("9" * 5000)).encode(),
                 limits=limits)
    assert e.message == "payload has a number of 5000 digits; at most 4300 are read"  # not Python's advice
    assert rejected(('{"id": "n", "mode": "complete", "prompt": "x", "seed": %s}' % ("9" * 4300)).encode(),
                    limits=limits).message.startswith("seed must be an integer between")  # read, out of range


def test_deeply_nested_json_is_a_bad_request():
    rejected(b"[" * 100000 + b"]" * 100000, limits=RequestLimits(max_payload_bytes=10**6))


def test_cancel_parsing():
    assert parse_cancel(b'{"id": "r1"}') == "r1"
    for bad in (b"x", b"{}", b'{"id": 3}', b"[]"):
        with pytest.raises(ProtocolError):
            parse_cancel(bad)


# ------------------------------------------------------------------ error codes


def test_every_error_code_matches_a_typed_error():
    classes = [errors.BadRequest, errors.UnsupportedMode, errors.ContextLengthExceeded, errors.UnsafePrompt,
               errors.PolicyViolation, errors.RateLimited, errors.Busy, errors.DeadlineExceeded, errors.Cancelled, errors.EdgeRuntimeError]
    assert {c.code for c in classes} == set(ERROR_CODES)
    for code in ERROR_CODES:
        reply = json.loads(encode_error("r", code, "why"))
        assert reply == {"id": "r", "done": True, "error": {"code": code, "message": "why"}}


def test_error_with_unknown_id_and_unknown_code():
    reply = json.loads(encode_error(None, "config_error", "x"))
    assert reply["id"] is None and reply["error"]["code"] == "internal"


# ------------------------------------------------------------------ encoding


def result(**kw) -> GenerationResult:
    base = dict(text="a b", token_ids=(1, 2), prompt_token_ids=(3,), finish_reason="stop",
                usage=Usage(1, 2), timings=Timings(12.3456, 33.3333, 50.0))
    base.update(kw)
    return GenerationResult(**base)


def test_chunk_and_final_encoding():
    assert json.loads(encode_chunk("r", 0, "dé")) == {"id": "r", "seq": 0, "delta": "dé", "done": False}
    assert "dé" in encode_chunk("r", 0, "dé").decode("utf-8")  # UTF-8, not \u escapes
    assert json.loads(encode_chunk("r", 3, "x", run="a1b2")) == {"id": "r", "seq": 3, "delta": "x", "done": False,
                                                                 "run": "a1b2"}
    final = json.loads(encode_final("r", result()))
    assert final == {"id": "r", "done": True, "text": "a b", "finish_reason": "stop",
                     "usage": {"prompt_tokens": 1, "completion_tokens": 2, "cached_prompt_tokens": 0,
                               "draft_tokens": 0, "accepted_draft_tokens": 0},
                     "timings": {"ttft_ms": 12.346, "decode_tokens_per_s": 33.333, "total_ms": 50.0}}
    usage = Usage(9, 2, cached_prompt_tokens=8, draft_tokens=3, accepted_draft_tokens=1)
    assert json.loads(encode_final("r", result(usage=usage)))["usage"] == {
        "prompt_tokens": 9, "completion_tokens": 2, "cached_prompt_tokens": 8, "draft_tokens": 3,
        "accepted_draft_tokens": 1}
    final = json.loads(encode_final("r", result(warnings=("w1",),
                                                timings=Timings(1.0, float("inf"), float("nan")))))
    assert final["warnings"] == ["w1"]
    assert final["timings"]["decode_tokens_per_s"] is None and final["timings"]["total_ms"] is None


def test_status_encoding():
    class Info:
        model_name, profile, precision, bundle_sha256 = "m", "p", "int4", "ab" * 32
        context_limit, supports_infill, chat_format, provider = 4096, True, "llama2", "CPUExecutionProvider"

    s = json.loads(encode_status("online", device_id="d1", model_info=Info(), queue_depth=2, queue_limit=8,
                                 version="0.2.0"))
    assert s["state"] == "online" and s["model"] == "m" and s["profile"] == "p"
    assert s["bundle_sha256"] == "ab" * 32 and s["queue_depth"] == 2 and s["version"] == "0.2.0"
    with pytest.raises(ValueError):
        encode_status("sleeping", device_id="d", model_info=None, queue_depth=0, queue_limit=1, version="x")


def test_build_request_round_trips_through_the_parser():
    obj = build_request(request_id="b1", mode="chat", messages=[Message("user", "hi")], max_tokens=8,
                        stop="\n", seed=3, stream=False, reply_to="r/b1", cache_prompt=False)
    w = parse(obj)
    assert w.request.messages == (Message("user", "hi"),) and w.request.stop == ("\n",)
    assert not w.request.cache_prompt and parse(build_request(request_id="b2", mode="complete",
                                                              prompt="x")).request.cache_prompt
    assert w.reply_to == "r/b1" and not w.stream
    assert "temperature" not in obj  # unset fields are left to the daemon


def test_the_repetition_penalties_default_off_and_round_trip():
    """llama.cpp's and Ollama's field names and defaults: repeat_penalty 1, presence and
    frequency 0 (off), a window of the last 64 tokens."""
    off = parse({"id": "p0", "mode": "complete", "prompt": "x"}).request.sampling
    assert (off.repeat_penalty, off.presence_penalty, off.frequency_penalty, off.repeat_last_n) == (1.0, 0.0, 0.0, 64)
    assert not off.penalizes
    obj = build_request(request_id="p1", mode="complete", prompt="x", repeat_penalty=1.1, presence_penalty=-0.5,
                        frequency_penalty=2, repeat_last_n=-1)
    on = parse(obj).request.sampling
    assert (on.repeat_penalty, on.presence_penalty, on.frequency_penalty, on.repeat_last_n) == (1.1, -0.5, 2.0, -1)
    assert on.penalizes and isinstance(on.frequency_penalty, float)
    with pytest.raises(errors.BadRequest, match="repeat_penalty must be a finite number"):
        build_request(request_id="p2", mode="complete", prompt="x", repeat_penalty=float("nan"))


def test_min_p_defaults_off_and_round_trips():
    """llama.cpp's and Ollama's `min_p`: 0 (off) unless given; an integer 0 or 1 is a number; out of
    [0, 1] a bad_request naming it."""
    assert parse({"id": "m0", "mode": "complete", "prompt": "x"}).request.sampling.min_p == 0.0
    on = parse(build_request(request_id="m1", mode="complete", prompt="x", min_p=0.05)).request.sampling
    assert on.min_p == 0.05
    one = parse({"id": "m2", "mode": "complete", "prompt": "x", "min_p": 1}).request.sampling
    assert one.min_p == 1.0 and isinstance(one.min_p, float)
    for bad in (1.01, -0.5, "0.1", True):
        e = rejected({"id": "m3", "mode": "complete", "prompt": "x", "min_p": bad})
        assert e.code == "bad_request" and "min_p must be a number in [0, 1]" in e.message
    with pytest.raises(errors.BadRequest, match="min_p must be a finite number"):
        build_request(request_id="m4", mode="complete", prompt="x", min_p=float("nan"))


# ------------------------------------------------------------------ topics


def test_topics():
    t = Topics("jetson-01")
    assert t.generate == "edge/jetson-01/v1/generate"
    assert t.cancel == "edge/jetson-01/v1/cancel"
    assert t.status == "edge/jetson-01/v1/status"
    assert t.reply_topic("cli-1", "abc") == "edge/jetson-01/v1/reply/cli-1/abc"
    assert t.client_reply_filter("cli-1") == "edge/jetson-01/v1/reply/cli-1/+"
    assert fleet_subscription("lab") == "$share/lab/edge/fleet/v1/generate"
    fleet = Topics("fleet")
    assert fleet.is_fleet and not t.is_fleet
    assert fleet.generate == "edge/fleet/v1/generate"
    assert fleet.reply_topic("c", "r") == "edge/fleet/v1/reply/c/r"
    for bad in ("", "a/b", "a+b", "#", "x" * 65, " a"):
        with pytest.raises(ValueError):
            Topics(bad)
    with pytest.raises(ValueError):
        t.reply_topic("cli", "a/b")


def test_control_topics_are_recognised():
    from edge_runtime.protocol import is_control_topic

    for topic in ("edge/d/v1/generate", "edge/fleet/v1/generate", "edge/x/v1/cancel", "edge/x/v1/status"):
        assert is_control_topic(topic)
    for topic in ("edge/d/v1/reply/c/r", "edge/d/v1/generate/x", "replies/1", "edge/d/v2/generate"):
        assert not is_control_topic(topic)


def test_publish_topic_validation():
    assert is_valid_publish_topic("a/b/c")
    for bad in ("", "a/#", "a/+/b", "$SYS/x", "a\x00b", None, 5):
        assert not is_valid_publish_topic(bad)
