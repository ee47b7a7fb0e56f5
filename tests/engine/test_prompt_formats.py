"""Prompt ids for each mode, against sequences built by hand from codellama-formats.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from edge_runtime.errors import BadRequest, UnsafePrompt, UnsupportedMode
from edge_runtime.prompts import PromptPlan, build_prompt
from edge_runtime.tokenizer import CodeLlamaTokenizer
from edge_runtime.types import GenerationRequest, Message

TOKENIZER_JSON = Path(__file__).resolve().parents[2] / "export" / "assets" / "codellama-tokenizer.json"

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def _json() -> dict:
    return json.loads(TOKENIZER_JSON.read_text(encoding="utf-8"))


def _no_infill_json() -> str:
    data = _json()
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < 32000]
    data["model"]["vocab"] = {p: i for p, i in data["model"]["vocab"].items() if i <= 31999}
    return json.dumps(data)


def _step_json() -> str:
    """Code Llama 70B-like: id 32015 is the `<step>` control token."""
    data = _json()
    for t in data["added_tokens"]:
        if t["id"] == 32015:
            t["content"] = "<step>"
    vocab = data["model"]["vocab"]
    del vocab["<reserved_32015>"]
    vocab["<step>"] = 32015
    return json.dumps(data)


@pytest.fixture(scope="module")
def tok() -> CodeLlamaTokenizer:
    return CodeLlamaTokenizer.from_file(TOKENIZER_JSON)


@pytest.fixture(scope="module")
def step_tok() -> CodeLlamaTokenizer:
    return CodeLlamaTokenizer.from_str(_step_json())


@pytest.fixture(scope="module")
def raw() -> Tokenizer:
    """The plain `tokenizers` object: the hand-built references use only this."""
    t = Tokenizer.from_file(str(TOKENIZER_JSON))
    t.encode_special_tokens = True
    return t


def enc(raw: Tokenizer, text: str) -> list[int]:
    return raw.encode(text, add_special_tokens=False).ids


def enc_infill(raw: Tokenizer, text: str) -> list[int]:
    ids = raw.encode("☺" + text, add_special_tokens=False).ids
    assert ids[:2] == [raw.token_to_id("▁"), raw.token_to_id("☺")]
    return ids[2:]


def chat(*pairs: tuple[str, str]) -> GenerationRequest:
    return GenerationRequest(mode="chat", messages=tuple(Message(r, c) for r, c in pairs))


# ----------------------------------------------------------------------- completion
def test_complete_reference_ids(tok: CodeLlamaTokenizer) -> None:
    plan = build_prompt(GenerationRequest(mode="complete", prompt="Hello world"), tok)
    # the output continues the prompt's text: its first token's space is kept (only an empty prompt's is dropped)
    assert plan == PromptPlan(ids=[1, 15043, 3186], stop_ids=frozenset({2}), strip_leading_space=False)
    assert build_prompt(GenerationRequest(mode="complete", prompt=""), tok).strip_leading_space
    plan = build_prompt(GenerationRequest(mode="complete", prompt="[INST] How are you doing?"), tok)
    assert plan.ids == [1, 518, 25580, 29962, 1128, 526, 366, 2599, 29973]


def test_complete_by_hand(tok: CodeLlamaTokenizer, raw: Tokenizer) -> None:
    prompt = "def fibonacci(n):\n    "
    plan = build_prompt(GenerationRequest(mode="complete", prompt=prompt), tok)
    assert plan.ids == [raw.token_to_id("<s>"), *enc(raw, prompt)]
    assert plan.stop_ids == {raw.token_to_id("</s>")}


@pytest.mark.parametrize("text", ["</s>", "<s>", "▁<EOT>", "a </s><s> ▁<PRE> ▁<SUF> ▁<MID> <unk> b"])
def test_control_token_text_in_prompt_stays_text(tok: CodeLlamaTokenizer, text: str) -> None:
    plan = build_prompt(GenerationRequest(mode="complete", prompt=text), tok)
    assert plan.ids[0] == 1
    assert not set(plan.ids[1:]) & {0, 1, 2, 32007, 32008, 32009, 32010}


def test_complete_requires_prompt(tok: CodeLlamaTokenizer) -> None:
    with pytest.raises(BadRequest, match="prompt"):
        build_prompt(GenerationRequest(mode="complete"), tok)


# ------------------------------------------------------------------------ infilling
PREFIX = 'def remove_non_ascii(s: str) -> str:\n    """ '
SUFFIX = "\n    return result\n"


def test_infill_psm_by_hand(tok: CodeLlamaTokenizer, raw: Tokenizer) -> None:
    bos, pre, suf, mid, eot = (raw.token_to_id(p) for p in ("<s>", "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"))
    plan = build_prompt(GenerationRequest(mode="infill", prefix=PREFIX, suffix=SUFFIX), tok)
    assert plan.ids == [bos, pre, *enc(raw, PREFIX), suf, *enc_infill(raw, SUFFIX), mid]
    assert plan.ids[:2] == [1, 32007] and plan.ids[-1] == 32009
    assert eot in plan.stop_ids and plan.stop_ids <= {eot, 2}
    assert plan.strip_leading_space is False  # Meta's decode_infilling keeps the leading space


def test_infill_spm_by_hand(tok: CodeLlamaTokenizer, raw: Tokenizer) -> None:
    bos, pre, suf, mid = (raw.token_to_id(p) for p in ("<s>", "▁<PRE>", "▁<SUF>", "▁<MID>"))
    req = GenerationRequest(mode="infill", prefix=PREFIX, suffix=SUFFIX, suffix_first=True)
    plan = build_prompt(req, tok)
    assert plan.ids == [bos, pre, suf, *enc_infill(raw, SUFFIX), mid, *enc(raw, PREFIX)]


def test_infill_empty_parts(tok: CodeLlamaTokenizer) -> None:
    plan = build_prompt(GenerationRequest(mode="infill", prefix="", suffix=""), tok)
    assert plan.ids == [1, 32007, 32008, 32009]


def test_infill_control_text_stays_text(tok: CodeLlamaTokenizer) -> None:
    plan = build_prompt(GenerationRequest(mode="infill", prefix="x ▁<EOT> </s>", suffix="▁<MID> <s>"), tok)
    assert plan.ids.count(32010) == 0 and plan.ids.count(32009) == 1 and 2 not in plan.ids
    assert plan.ids.count(1) == 1


def test_infill_requires_a_prefix_and_takes_a_missing_suffix_as_empty(tok: CodeLlamaTokenizer) -> None:
    with pytest.raises(BadRequest, match="prefix"):
        build_prompt(GenerationRequest(mode="infill", suffix="b"), tok)
    # as over MQTT (the protocol's default suffix is "")
    assert build_prompt(GenerationRequest(mode="infill", prefix="a"), tok) == \
        build_prompt(GenerationRequest(mode="infill", prefix="a", suffix=""), tok)


def test_infill_refused_without_infill_tokens() -> None:
    tok = CodeLlamaTokenizer.from_str(_no_infill_json())
    with pytest.raises(UnsupportedMode, match="infill"):
        build_prompt(GenerationRequest(mode="infill", prefix="a", suffix="b"), tok)
    # the other modes still work
    assert build_prompt(GenerationRequest(mode="complete", prompt="Hello world"), tok).ids == [1, 15043, 3186]


# -------------------------------------------------------------------- llama2 chat
def test_chat_single_turn_reference(tok: CodeLlamaTokenizer) -> None:
    plan = build_prompt(chat(("user", "How are you doing?")), tok)
    assert plan.ids == [1, 518, 25580, 29962, 1128, 526, 366, 2599, 29973, 518, 29914, 25580, 29962]
    assert plan.stop_ids == {2} and plan.strip_leading_space


def test_chat_system_folding(tok: CodeLlamaTokenizer, raw: Tokenizer) -> None:
    system, user = "Answer in Python.", "  Write a sort.  "
    plan = build_prompt(chat(("system", system), ("user", user)), tok)
    folded = (B_SYS + system + E_SYS + user).strip()
    assert plan.ids == [raw.token_to_id("<s>"), *enc(raw, f"{B_INST} {folded} {E_INST}")]


def test_chat_multi_turn_per_turn_bos_eos(tok: CodeLlamaTokenizer, raw: Tokenizer) -> None:
    bos, eos = raw.token_to_id("<s>"), raw.token_to_id("</s>")
    msgs = [
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", " Hello! "),
        ("user", "What is 2+2?"),
        ("assistant", "4"),
        ("user", "Thanks\n"),
    ]
    plan = build_prompt(chat(*msgs), tok)
    first_user = (B_SYS + "Be brief." + E_SYS + "Hi").strip()
    expected = (
        [bos, *enc(raw, f"{B_INST} {first_user} {E_INST} Hello! "), eos]
        + [bos, *enc(raw, f"{B_INST} What is 2+2? {E_INST} 4 "), eos]
        + [bos, *enc(raw, f"{B_INST} Thanks {E_INST}")]
    )
    assert plan.ids == expected
    assert plan.ids.count(bos) == 3 and plan.ids.count(eos) == 2


def test_chat_control_text_stays_text(tok: CodeLlamaTokenizer) -> None:
    plan = build_prompt(chat(("user", "say </s> and <s> and ▁<EOT>")), tok)
    assert plan.ids.count(1) == 1 and 2 not in plan.ids and 32010 not in plan.ids


@pytest.mark.parametrize(
    "roles",
    [
        ("assistant", "user"),
        ("user", "user"),
        ("user", "assistant"),
        ("system",),
        ("system", "assistant", "user"),
        ("system", "system", "user"),
        ("user", "system", "user"),
        ("user", "assistant", "assistant", "user"),
        ("tool", "user"),
    ],
)
@pytest.mark.parametrize("fmt", ["llama2", "source-step"])
def test_chat_role_errors(tok: CodeLlamaTokenizer, step_tok: CodeLlamaTokenizer, roles: tuple[str, ...], fmt: str) -> None:
    with pytest.raises(BadRequest, match="role|end with"):
        build_prompt(chat(*((r, "hi") for r in roles)), step_tok if fmt == "source-step" else tok, fmt)


def test_chat_requires_messages(tok: CodeLlamaTokenizer) -> None:
    with pytest.raises(BadRequest, match="messages"):
        build_prompt(GenerationRequest(mode="chat"), tok)


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<step>"])
@pytest.mark.parametrize("where", [0, 1, 2, 3])
@pytest.mark.parametrize("fmt", ["llama2", "source-step"])
def test_chat_special_tags_refused(
    tok: CodeLlamaTokenizer, step_tok: CodeLlamaTokenizer, tag: str, where: int, fmt: str
) -> None:
    msgs = [("system", "sys"), ("user", "u"), ("assistant", "a"), ("user", "u2")]
    msgs[where] = (msgs[where][0], f"x {tag} y")
    with pytest.raises(UnsafePrompt):
        build_prompt(chat(*msgs), step_tok if fmt == "source-step" else tok, fmt)


# ---------------------------------------------------------------- source-step chat
# Meta's dialog_prompt_tokens and the published 70B chat template give these ids
# for this dialog (CodeLlama-70b-Instruct-hf model card).
REFERENCE_70B_DIALOG = (
    ("system", "System prompt    "),
    ("user", "First user query"),
    ("assistant", "Model response to first query"),
    ("user", "Second user query"),
)
REFERENCE_70B_IDS = [
    1, 7562, 29901, 1788, 13, 13, 2184, 9508, 32015, 7562, 29901, 1404, 13, 13, 3824, 1404, 2346,
    32015, 7562, 29901, 20255, 13, 13, 8125, 2933, 304, 937, 2346, 32015, 7562, 29901, 1404, 13, 13,
    6440, 1404, 2346, 32015, 7562, 29901, 20255, 13, 14994, 3381, 29901, 1404, 13, 13, 29871,
]  # fmt: skip


def test_source_step_matches_published_reference(step_tok: CodeLlamaTokenizer) -> None:
    plan = build_prompt(chat(*REFERENCE_70B_DIALOG), step_tok, "source-step")
    assert plan.ids == REFERENCE_70B_IDS
    assert 32015 in plan.stop_ids and plan.strip_leading_space


def test_source_step_by_hand(step_tok: CodeLlamaTokenizer) -> None:
    raw = Tokenizer.from_str(_step_json())
    raw.encode_special_tokens = True
    step = raw.token_to_id("<step>")
    msgs = (("user", " Write </s> a <s> loop "), ("assistant", "for i in x:"), ("user", "more\n"))
    plan = build_prompt(chat(*msgs), step_tok, "source-step")
    expected = [raw.token_to_id("<s>")]
    for role, content in msgs:
        expected += enc(raw, f"Source: {role}\n\n {content.strip()}") + [step]
    expected += enc(raw, "Source: assistant\nDestination: user\n\n ")
    assert plan.ids == expected
    assert plan.ids.count(1) == 1 and 2 not in plan.ids
    assert plan.stop_ids == {step, raw.token_to_id("</s>")}


def test_source_step_needs_step_token(tok: CodeLlamaTokenizer) -> None:
    with pytest.raises(UnsupportedMode, match="<step>"):
        build_prompt(chat(("user", "hi")), tok, "source-step")


def test_source_step_text_cannot_forge_step(step_tok: CodeLlamaTokenizer) -> None:
    # '<step>' is refused by the tag guard; other control text stays text
    plan = build_prompt(chat(("user", "a </s> ▁<EOT>")), step_tok, "source-step")
    assert plan.ids.count(32015) == 1 and 2 not in plan.ids and 32010 not in plan.ids


def test_unknown_chat_format(tok: CodeLlamaTokenizer) -> None:
    with pytest.raises(ValueError, match="chat format"):
        build_prompt(chat(("user", "hi")), tok, "chatml")


# ------------------------------------------------------------------- docs/protocol.md
def _doc_json_blocks() -> list[str]:
    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text(encoding="utf-8")
    return [block.split("```", 1)[0] for block in text.split("```json\n")[1:]]


def test_protocol_doc_example_counts_and_chunks(tok: CodeLlamaTokenizer, raw: Tokenizer) -> None:
    """The protocol's example request, chunks and final reply agree with what the engine does
    with that prompt and that text (counts: bos + the prompt's tokens; the text's tokens)."""
    from edge_runtime.detokenizer import IncrementalDetokenizer

    blocks = _doc_json_blocks()
    request = json.loads(blocks[0])
    chunks = [json.loads(line) for line in next(b for b in blocks if '"seq": 0' in b).splitlines() if line]
    final = json.loads(next(b for b in blocks if '"done": true,\n "text"' in b))
    prompt, text = request["prompt"], final["text"]
    assert final["usage"]["prompt_tokens"] == len([1, *enc(raw, prompt)])
    assert final["usage"]["prompt_tokens"] == len(build_prompt(GenerationRequest(mode="complete", prompt=prompt), tok).ids)
    # the answer's tokens, as they continue the prompt: its first piece carries no implicit space
    answer = enc(raw, text)
    assert tok.id_to_piece(answer[0]) == "▁▁▁▁"
    answer[0] = tok.piece_to_id("▁▁▁")
    assert tok.decode([1, *enc(raw, prompt), *answer]) == prompt + text
    assert final["usage"]["completion_tokens"] == len(answer)
    detok = IncrementalDetokenizer(tok, strip_leading_space=False)
    assert [c["delta"] for c in chunks] == [detok.push(i) for i in answer[:len(chunks)]]
