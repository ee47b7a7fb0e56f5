"""IncrementalDetokenizer: streamed text equals the tokenizer's own decode, never half a character."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.detokenizer import IncrementalDetokenizer
from edge_runtime.tokenizer import CodeLlamaTokenizer

TOKENIZER_JSON = Path(__file__).resolve().parents[2] / "export" / "assets" / "codellama-tokenizer.json"
TOK = CodeLlamaTokenizer.from_file(TOKENIZER_JSON)

TEXTS = [
    "Hello world",
    "def f(x):\n    return x  # done\n",
    "🙂🚀👍🏽",
    "中文字符測試，日本語のテキスト",
    "쮜뷁 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ",
    "        indented\t\ttabs\n\n\n",
    "                                                                ",
    "  leading and trailing  ",
    "é̃ combining ﬁ ligature",
    "\x00\x07 controls \x7f",
    " ",
    "x",
]
SPECIALS = [0, 1, 2, 32007, 32008, 32009, 32010, 32000]


REPLACEMENT_PIECE = TOK.piece_to_id("\ufffd")  # the vocabulary has U+FFFD as a piece of its own (id 30140)


def stream(ids: list[int], strip: bool) -> list[str]:
    det = IncrementalDetokenizer(TOK, strip_leading_space=strip)
    return [det.push(i) for i in ids] + [det.flush()]


def expected(ids: list[int], strip: bool) -> str:
    return TOK.decode(ids) if strip else TOK.decode_infilling(ids)


def check_chunks(chunks: list[str]) -> None:
    for c in chunks:
        c.encode("utf-8")  # no lone surrogates: every chunk is valid text
        assert "\ufffd" not in c  # never half a character


def test_texts_need_byte_fallback() -> None:
    # the pool really exercises byte-fallback runs
    ids = TOK.encode("".join(TEXTS))
    assert sum(bool(TOK.is_byte_fallback[i]) for i in ids) > 40


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("strip", [True, False])
def test_invariant_on_encoded_texts(text: str, strip: bool) -> None:
    ids = TOK.encode(text)
    chunks = stream(ids, strip)
    check_chunks(chunks)
    assert "".join(chunks) == expected(ids, strip)


segment = st.one_of(
    st.sampled_from(TEXTS).map(TOK.encode),
    st.text(max_size=20).map(TOK.encode),
    st.sampled_from(SPECIALS).map(lambda i: [i]),
    # any normal piece but the vocabulary's literal U+FFFD, which check_chunks would take for half a character
    st.integers(259, 31999).filter(lambda i: i != REPLACEMENT_PIECE).map(lambda i: [i]),
)


@settings(max_examples=300, deadline=None)
@given(segments=st.lists(segment, max_size=12), strip=st.booleans(), data=st.data())
def test_invariant_on_generated_sequences(segments: list[list[int]], strip: bool, data: st.DataObject) -> None:
    ids = [i for seg in segments for i in seg]
    # control tokens anywhere, even inside a byte-fallback run, produce no text
    for _ in range(data.draw(st.integers(0, 3))):
        ids.insert(data.draw(st.integers(0, len(ids))), data.draw(st.sampled_from(SPECIALS)))
    chunks = stream(ids, strip)
    check_chunks(chunks)
    assert "".join(chunks) == expected(ids, strip)


def test_random_id_sequences() -> None:
    rng = random.Random(1234)
    for _ in range(300):
        ids = [rng.randrange(TOK.vocab_size) for _ in range(rng.randrange(1, 40))]
        ids += [rng.randrange(3, 259) for _ in range(rng.randrange(0, 6))]  # raw byte runs, often invalid
        for strip in (True, False):
            chunks = stream(ids, strip)
            for c in chunks:
                c.encode("utf-8")
            got, want = "".join(chunks), expected(ids, strip)
            if "\ufffd" not in want:
                assert got == want
            else:
                assert "\ufffd" in got


def test_multibyte_character_is_held_until_complete() -> None:
    ids = TOK.encode("🙂")
    assert len(ids) == 5 and ids[0] == 29871  # '▁' then 4 byte pieces
    det = IncrementalDetokenizer(TOK, strip_leading_space=True)
    assert [det.push(i) for i in ids] == ["", "", "", "", "🙂"]
    assert det.flush() == ""


def test_incomplete_bytes_become_replacement_chars() -> None:
    e4, b8 = 3 + 0xE4, 3 + 0xB8
    det = IncrementalDetokenizer(TOK, strip_leading_space=True)
    assert det.push(e4) == "" and det.push(b8) == ""
    assert det.flush() == "\ufffd\ufffd"
    # cut off by a normal piece: one U+FFFD per byte, like tokenizers' ByteFallback
    ids = [e4, b8, TOK.piece_to_id("▁world")]
    assert "".join(stream(ids, True)) == TOK.decode(ids) == "\ufffd\ufffd world"


def test_leading_space_stripped_once() -> None:
    space, world = TOK.piece_to_id("▁"), TOK.piece_to_id("▁world")
    assert stream([1, space, world], True) == ["", "", " world", ""]
    assert stream([world, world], True) == ["world", " world", ""]
    assert stream([world], False) == [" world", ""]
    assert stream([3 + 0x20, world], True) == ["", " world", ""]  # byte-fallback space is stripped too


def test_unknown_ids_decode_to_nothing() -> None:
    assert stream([10**6, TOK.piece_to_id("▁world")], True) == ["", "world", ""]


def test_the_vocabularys_own_replacement_character_piece_is_text() -> None:
    """Piece 30140 is a literal U+FFFD, not a byte-fallback run: it streams at once."""
    assert REPLACEMENT_PIECE == 30140
    det = IncrementalDetokenizer(TOK, strip_leading_space=False)
    assert det.push(REPLACEMENT_PIECE) == "\ufffd" == TOK.decode_infilling([REPLACEMENT_PIECE])
    assert det.flush() == ""
