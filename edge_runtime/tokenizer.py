"""The Code Llama tokenizer, on top of the `tokenizers` package.

Matches Meta's `llama/tokenizer.py` (SentencePiece) on the points that matter
for prompts and outputs:

* `encode(text)` adds no bos and never turns control-token *text* found in user
  input (`</s>`, `▁<EOT>`, ...) into control tokens: SentencePiece never does,
  a `tokenizers` file does unless `encode_special_tokens` is set. The wrapper
  owns a private `tokenizers.Tokenizer` on which that flag is set once, at
  construction, and never touched again, so it cannot leak between calls or
  threads. Control tokens of a prompt are always added as ids (`prompts.py`).
* `encode_infilling(text)` encodes without the implicit leading space, with
  Meta's sentinel trick (encode "☺" + text, drop the sentinel's tokens).
* Control-token ids (bos, eos, the infilling tokens, `<step>`) are looked up by
  piece name, never hard-coded. They are control tokens whatever the file's
  `special` flag says: a `tokenizer.json` may list `▁<EOT>` or `<step>` as an
  added token that is not special, which `tokenizers` would cut out of user text
  (as the control token) and decode as text; the private copy marks them special.

For streaming output, `byte_table[id]` is the raw bytes a token contributes to
the decoded text (computed once for the whole vocabulary), which is what the
incremental detokenizer works from.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import BadRequest

# Piece names, as in Meta's tokenizer.py (note the leading U+2581 on the infilling ones).
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
PRE_PIECE = "▁<PRE>"
SUF_PIECE = "▁<SUF>"
MID_PIECE = "▁<MID>"
EOT_PIECE = "▁<EOT>"
STEP_PIECE = "<step>"
BOS_PIECE = "<s>"
EOS_PIECE = "</s>"
UNK_PIECE = "<unk>"
# Control pieces: never made from text, never decoded to text (Meta's SentencePiece), whatever the file says
CONTROL_PIECES = frozenset({UNK_PIECE, BOS_PIECE, EOS_PIECE, PRE_PIECE, SUF_PIECE, MID_PIECE, EOT_PIECE, STEP_PIECE})
SPACE_PIECE = "▁"  # U+2581: SentencePiece's word boundary, decodes to " "
INFILL_SENTINEL = "☺"  # Meta's encode_infilling sentinel; a single piece (31171) in Llama's vocabulary

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass(frozen=True)
class InfillIds:
    """Ids of Code Llama's fill-in-the-middle control tokens."""

    prefix: int  # ▁<PRE>
    suffix: int  # ▁<SUF>
    middle: int  # ▁<MID>
    eot: int  # ▁<EOT>


class CodeLlamaTokenizer:
    """Encode/decode for Code Llama (and Llama 2) `tokenizer.json` files."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        """Wrap a *private copy* of `tokenizer` (the caller's object is never modified)."""
        tok = Tokenizer.from_str(_with_control_pieces_special(tokenizer.to_str()))
        tok.encode_special_tokens = True  # set once on our own instance; never changed afterwards
        self._tok = tok
        self._vocab_size: int = max(tok.get_vocab(with_added_tokens=True).values()) + 1  # ids are 0..size-1
        self._special_ids = _special_token_ids(tok)
        self._bos_id = self._require_piece(BOS_PIECE)
        self._eos_id = self._require_piece(EOS_PIECE)
        self._infill_ids = self._lookup_infill_ids()
        self._step_id = self.piece_to_id(STEP_PIECE)
        self._sentinel_ids = self._lookup_sentinel_ids()
        self._byte_table, self._is_byte = _build_byte_table(tok, self._vocab_size, self._special_ids)
        # the most characters of text one token of `encode` covers (16 in Llama's vocabulary: "▁transformations")
        self._max_piece_chars = max((len(data.decode("utf-8")) for data, is_byte in zip(self._byte_table, self._is_byte)
                                     if data and not is_byte), default=1)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> CodeLlamaTokenizer:
        """Load a `tokenizers` JSON file (`tokenizer.json`), read here: the library's own `from_file`
        encodes the path as UTF-8, which is not the file's name where the name's bytes are not UTF-8
        or Python's UTF-8 mode is off under an ASCII locale (`LC_ALL=C PYTHONUTF8=0`)."""
        return cls.from_str(Path(path).read_text(encoding="utf-8"))

    @classmethod
    def from_str(cls, text: str) -> CodeLlamaTokenizer:
        """Load from the JSON text of a `tokenizer.json`."""
        return cls(Tokenizer.from_str(text))

    def _require_piece(self, piece: str) -> int:
        token_id = self.piece_to_id(piece)
        if token_id is None:
            raise ValueError(f"tokenizer has no {piece!r} token")
        return token_id

    def _lookup_infill_ids(self) -> InfillIds | None:
        pre, suf, mid, eot = (self.piece_to_id(p) for p in (PRE_PIECE, SUF_PIECE, MID_PIECE, EOT_PIECE))
        if pre is None or suf is None or mid is None or eot is None:
            return None
        return InfillIds(prefix=pre, suffix=suf, middle=mid, eot=eot)

    def _lookup_sentinel_ids(self) -> tuple[int, int] | None:
        """The ids `encode("☺")` yields (▁, ☺), when the trick works with this vocabulary."""
        space, sentinel = self.piece_to_id(SPACE_PIECE), self.piece_to_id(INFILL_SENTINEL)
        if space is None or sentinel is None:
            return None
        if self._encode_raw(INFILL_SENTINEL) != [space, sentinel]:
            return None
        return (space, sentinel)

    # ------------------------------------------------------------------- properties
    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (32016 for Code Llama 7B/13B/70B)."""
        return self._vocab_size

    @property
    def infill_ids(self) -> InfillIds | None:
        """The four infilling ids, or None when the tokenizer lacks any of them (34B, Python)."""
        return self._infill_ids

    @property
    def supports_infill(self) -> bool:
        return self._infill_ids is not None and self._sentinel_ids is not None

    @property
    def step_id(self) -> int | None:
        """Id of the `<step>` token (Code Llama 70B Instruct's turn separator), if present."""
        return self._step_id

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of control tokens (special added tokens); they decode to nothing."""
        return self._special_ids

    @property
    def byte_table(self) -> tuple[bytes, ...]:
        """`byte_table[id]`: the raw bytes token `id` contributes to decoded text.

        Byte-fallback pieces `<0xNN>` give that byte, '▁' gives a space, control
        tokens give b"". The leading-space rule of `decode` is not applied here.
        """
        return self._byte_table

    @property
    def max_piece_chars(self) -> int:
        """The most characters of text one token of `encode` covers: a text of n characters is at
        least n // max_piece_chars tokens, known without encoding it."""
        return self._max_piece_chars

    @property
    def is_byte_fallback(self) -> np.ndarray:
        """Boolean array over ids: True for byte-fallback pieces `<0xNN>` (read-only)."""
        return self._is_byte

    # ----------------------------------------------------------------------- encode
    def _encode_raw(self, text: str) -> list[int]:
        ids: list[int] = self._tok.encode(text, add_special_tokens=False).ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Encode user text like SentencePiece: implicit leading space, no bos, control-token text stays text."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        bad = _LONE_SURROGATE.search(text)
        if bad:  # JSON can carry "\ud800"; it is not text, and tokenizers raises TypeError on it
            raise BadRequest(f"the text holds a lone surrogate (U+{ord(bad.group()):04X}) at character "
                             f"{bad.start()}: not valid Unicode")
        return self._encode_raw(text)

    def encode_infilling(self, text: str) -> list[int]:
        """Encode without the implicit leading space (Meta: `sp.encode("☺" + s)[2:]`)."""
        if self._sentinel_ids is None:
            raise ValueError(f"tokenizer cannot encode without a leading space: no single {INFILL_SENTINEL!r} piece")
        ids = self.encode(INFILL_SENTINEL + text)
        # '☺' is the only vocabulary piece containing '☺', so it can never merge with its neighbours.
        if tuple(ids[:2]) != self._sentinel_ids:
            raise RuntimeError(f"infilling sentinel merged with the text: {ids[:3]}")
        return ids[2:]

    # ----------------------------------------------------------------------- decode
    def decode(self, ids: Sequence[int]) -> str:
        """Decode like SentencePiece: control tokens dropped, one leading space removed."""
        text: str = self._tok.decode(list(ids), skip_special_tokens=True)
        return text

    def decode_infilling(self, ids: Sequence[int]) -> str:
        """Decode keeping the first token's leading space (Meta: `sp.decode([☺] + t)[1:]`).

        Infilled text continues the prefix mid-line, so a generated "▁x" means " x".
        """
        if self._sentinel_ids is None:
            return _decode_bytes(b"".join(self.token_bytes(i) for i in ids))
        return self.decode([self._sentinel_ids[1], *ids])[len(INFILL_SENTINEL) :]

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes token `token_id` contributes (b"" for control tokens and unknown ids)."""
        if 0 <= token_id < self._vocab_size:
            return self._byte_table[token_id]
        return b""

    def id_to_piece(self, token_id: int) -> str | None:
        """The vocabulary piece of `token_id` (e.g. "▁Hello", "<0x0A>", "</s>"), None if out of range."""
        piece: str | None = self._tok.id_to_token(token_id)
        return piece

    def piece_to_id(self, piece: str) -> int | None:
        """The id of vocabulary piece `piece`, None if absent."""
        token_id: int | None = self._tok.token_to_id(piece)
        return token_id


def _with_control_pieces_special(text: str) -> str:
    """The `tokenizer.json` text with every added token among CONTROL_PIECES marked special."""
    data = json.loads(text)
    added = data.get("added_tokens") or []
    loose = [t for t in added if t.get("content") in CONTROL_PIECES and not t.get("special", False)]
    if not loose:
        return text
    for t in loose:
        t["special"] = True
    return json.dumps(data, ensure_ascii=False)


def _special_token_ids(tok: Tokenizer) -> frozenset[int]:
    """Ids of the added tokens marked special (the control tokens)."""
    if hasattr(tok, "get_added_tokens_decoder"):  # tokenizers >= 0.15
        return frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
    added = json.loads(tok.to_str()).get("added_tokens", [])
    return frozenset(int(t["id"]) for t in added if t.get("special", False))


def _piece_bytes(piece: str) -> tuple[bytes, bool]:
    """Bytes a non-control piece decodes to, and whether it is a byte-fallback piece."""
    m = _BYTE_PIECE.match(piece)
    if m:
        return bytes([int(m.group(1), 16)]), True
    return piece.replace(SPACE_PIECE, " ").encode("utf-8"), False


def _build_byte_table(
    tok: Tokenizer, vocab_size: int, special_ids: frozenset[int]
) -> tuple[tuple[bytes, ...], np.ndarray]:
    """Per-id decoded bytes and the byte-fallback mask, computed once."""
    table: list[bytes] = []
    is_byte = np.zeros(vocab_size, dtype=bool)
    for token_id in range(vocab_size):
        piece = tok.id_to_token(token_id)
        if piece is None or token_id in special_ids:
            table.append(b"")
            continue
        data, byte_piece = _piece_bytes(piece)
        table.append(data)
        is_byte[token_id] = byte_piece
    is_byte.flags.writeable = False
    return tuple(table), is_byte


def _decode_bytes(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")
