"""Streaming detokenization: token ids in, new text out, never half a character.

Works from the tokenizer's per-id byte table (`CodeLlamaTokenizer.byte_table`),
so each `push` costs O(length of the token), not a re-decode of the sequence.

Invariant (tested): for generated ids whose byte-fallback runs are valid UTF-8,
`"".join(pushes) + flush() == tokenizer.decode(ids)` when `strip_leading_space`
(chat, a completion of an empty prompt), and `== tokenizer.decode_infilling(ids)` when
not (infill, a completion, which continues its prompt's text).

Invalid bytes become U+FFFD: an incomplete sequence cut off by a normal piece or
by `flush` gives one U+FFFD per byte, like `tokenizers`' ByteFallback decoder;
invalid bytes inside a byte run follow Python's "replace" rule, whereas
`tokenizers` replaces every byte of such a run (which no streaming decoder can
do without holding back whole runs).
"""

from __future__ import annotations

import codecs

from .tokenizer import CodeLlamaTokenizer

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's generated ids into text deltas."""

    def __init__(self, tokenizer: CodeLlamaTokenizer, strip_leading_space: bool) -> None:
        self._table = tokenizer.byte_table
        self._is_byte = tokenizer.is_byte_fallback.tolist()  # list[bool]: fast scalar indexing
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_pending = strip_leading_space  # SentencePiece drops one leading space of the output

    def push(self, token_id: int) -> str:
        """The text that token `token_id` completes ("" while a character is incomplete)."""
        if not 0 <= token_id < len(self._table):
            return ""  # like tokenizers.decode: unknown ids decode to nothing
        data = self._table[token_id]
        if not data:
            return ""  # control token: no text, and it does not end a byte-fallback run
        if self._is_byte[token_id]:
            return self._emit(self._utf8.decode(data, final=False))
        return self._emit(self._end_byte_run() + data.decode("utf-8"))

    def flush(self) -> str:
        """The rest: an incomplete trailing character becomes U+FFFD (one per byte)."""
        return self._emit(self._end_byte_run())

    def _end_byte_run(self) -> str:
        pending, _ = self._utf8.getstate()
        self._utf8.reset()
        return REPLACEMENT_CHAR * len(pending)

    def _emit(self, text: str) -> str:
        if self._strip_pending and text:
            self._strip_pending = False
            if text[0] == " ":
                return text[1:]
        return text
