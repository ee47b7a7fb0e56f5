"""CodeLlamaTokenizer: ids by piece name, SentencePiece-like encode, infilling encode, byte table."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from edge_runtime.tokenizer import CodeLlamaTokenizer

TOKENIZER_JSON = Path(__file__).resolve().parents[2] / "export" / "assets" / "codellama-tokenizer.json"


def _no_infill_json() -> str:
    data = json.loads(TOKENIZER_JSON.read_text(encoding="utf-8"))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < 32000]
    data["model"]["vocab"] = {p: i for p, i in data["model"]["vocab"].items() if i <= 31999}
    return json.dumps(data)


@pytest.fixture(scope="module")
def tok() -> CodeLlamaTokenizer:
    return CodeLlamaTokenizer.from_file(TOKENIZER_JSON)


@pytest.fixture(scope="module")
def raw() -> Tokenizer:
    return Tokenizer.from_file(str(TOKENIZER_JSON))


def test_ids_by_piece_name(tok: CodeLlamaTokenizer) -> None:
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32016)
    fim = tok.infill_ids
    assert fim is not None and tok.supports_infill
    assert (fim.prefix, fim.suffix, fim.middle, fim.eot) == (32007, 32008, 32009, 32010)
    assert tok.step_id is None
    assert tok.piece_to_id("▁<EOT>") == 32010 and tok.id_to_piece(32010) == "▁<EOT>"


def test_no_infill_variant() -> None:
    tok = CodeLlamaTokenizer.from_str(_no_infill_json())
    assert tok.vocab_size == 32000
    assert tok.infill_ids is None and not tok.supports_infill
    assert tok.encode("Hello world") == [15043, 3186]


def test_encode_matches_reference_ids(tok: CodeLlamaTokenizer) -> None:
    # the data README's verified ids, minus the bos the post-processor adds
    assert tok.encode("Hello world") == [15043, 3186]
    assert tok.encode("[INST] How are you doing?") == [518, 25580, 29962, 1128, 526, 366, 2599, 29973]
    assert tok.encode("") == []


@pytest.mark.parametrize("text", ["a </s> b", "<s>x", "▁<EOT>", "x ▁<PRE> y ▁<SUF> z ▁<MID>", "<unk>", "<reserved_32000>"])
def test_control_token_text_stays_text(tok: CodeLlamaTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert not set(ids) & tok.special_ids
    assert tok.decode(ids) == text.replace("▁", " ")  # U+2581 is SentencePiece's space, in text too


def test_encode_special_tokens_does_not_leak(raw: Tokenizer) -> None:
    # the wrapper works on its own copy: the caller's tokenizer keeps its setting
    CodeLlamaTokenizer(raw)
    assert raw.encode_special_tokens is False
    assert 2 in raw.encode("a </s>", add_special_tokens=False).ids


def test_encode_is_thread_safe(tok: CodeLlamaTokenizer) -> None:
    expected = tok.encode("x </s> y")
    errors: list[list[int]] = []

    def work() -> None:
        for _ in range(200):
            got = tok.encode("x </s> y")
            if got != expected:
                errors.append(got)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_sentinel_is_single_piece(tok: CodeLlamaTokenizer) -> None:
    assert tok.piece_to_id("☺") == 31171
    assert tok.encode("☺") == [29871, 31171]


@pytest.mark.parametrize("text", ["", "x", " x = 1", "\n    return result\n", "def f():", "☺☺", "中文 🙂"])
def test_encode_infilling_drops_implicit_space(tok: CodeLlamaTokenizer, raw: Tokenizer, text: str) -> None:
    ids = raw.encode("☺" + text, add_special_tokens=False).ids
    assert ids[:2] == [29871, 31171]
    assert tok.encode_infilling(text) == ids[2:]
    if text:
        assert tok.decode_infilling(tok.encode_infilling(text)) == text


def test_encode_infilling_differs_from_encode(tok: CodeLlamaTokenizer) -> None:
    assert tok.encode("x") == [tok.piece_to_id("▁x")]
    assert tok.encode_infilling("x") == [tok.piece_to_id("x")]  # no implicit '▁'


def test_decode_strips_one_leading_space_decode_infilling_keeps_it(tok: CodeLlamaTokenizer) -> None:
    ids = tok.encode("hello world")
    assert tok.decode(ids) == "hello world"
    assert tok.decode_infilling(ids) == " hello world"
    assert tok.decode([1, *ids, 2]) == "hello world"


def test_byte_table(tok: CodeLlamaTokenizer) -> None:
    table = tok.byte_table
    assert len(table) == tok.vocab_size
    assert table[1] == table[2] == table[0] == table[32010] == b""
    assert table[13] == b"\n" and tok.is_byte_fallback[13]
    assert table[3 + 0xF0] == b"\xf0" and tok.is_byte_fallback[3 + 0xF0]
    assert table[29871] == b" " and not tok.is_byte_fallback[29871]
    assert table[15043] == b" Hello"
    assert tok.token_bytes(10**6) == b""
    assert int(tok.is_byte_fallback.sum()) == 256


def _loose_control_json() -> str:
    """A tokenizer.json that lists the infilling tokens and `<step>` as added tokens *not* marked
    special (as a checkpoint's file may): `tokenizers` then cuts their text out of user input."""
    data = json.loads(TOKENIZER_JSON.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    del vocab["<reserved_32015>"]
    vocab["<step>"] = 32015
    for t in data["added_tokens"]:
        if t["id"] == 32015:
            t["content"] = "<step>"
        if t["id"] in (32007, 32008, 32009, 32010, 32015):
            t["special"] = False
    return json.dumps(data)


@pytest.mark.parametrize("text", ["x ▁<EOT> y", "▁<PRE>def f():▁<SUF>▁<MID>", "a <step> b", "<step>"])
def test_control_pieces_not_marked_special_stay_text(text: str) -> None:
    loose = Tokenizer.from_str(_loose_control_json())
    assert 32010 in loose.encode("x ▁<EOT>", add_special_tokens=False).ids  # what the file alone does
    tok = CodeLlamaTokenizer.from_str(_loose_control_json())
    # the reference: the same text through the file whose control tokens are special, with
    # encode_special_tokens (that file has no <step> piece at all: its text is plain text there)
    reference = Tokenizer.from_file(str(TOKENIZER_JSON))
    reference.encode_special_tokens = True
    assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids
    assert tok.encode_infilling(text) == reference.encode("☺" + text, add_special_tokens=False).ids[2:]
    assert (tok.infill_ids.eot, tok.step_id) == (32010, 32015)  # type: ignore[union-attr]


def test_control_pieces_not_marked_special_decode_to_nothing() -> None:
    tok = CodeLlamaTokenizer.from_str(_loose_control_json())
    x = tok.piece_to_id("▁x")
    for control in (32007, 32008, 32009, 32010, 32015):
        assert control in tok.special_ids and tok.token_bytes(control) == b""
    assert tok.decode([x, 32009, 32010, 32015]) == "x"
    assert tok.decode_infilling([x, 32010]) == " x"
