"""Paths between their bytes on disk and text. Native libraries (onnxruntime's C++, the
`tokenizers` Rust crate) take a `str` and encode it as UTF-8, and a config file (TOML, UTF-8)
spells a path as text, where Python's own file functions encode a `str` with the filesystem
encoding. The two differ when Python's UTF-8 mode is off under a locale that is not
UTF-8 (`LC_ALL=C PYTHONUTF8=0`, `python -X utf8=0`): a folder named in UTF-8 (`bündle`, `模型`)
then reaches Python as surrogate escapes, which the libraries refused ("surrogates not allowed").
(Files Python can read, as `tokenizer.json`, are better read in Python and handed over as data.)"""

from __future__ import annotations

import os


def native_path(path: str | os.PathLike[str]) -> str | None:
    """`path` as a str whose UTF-8 bytes are the path's bytes on disk (its own text under a UTF-8
    filesystem encoding); None for a path whose bytes are not UTF-8 (a folder named under a
    Latin-1 locale, `caf\xe9`), which no str hands to such a library."""
    try:
        return os.fsencode(os.fspath(path)).decode("utf-8")
    except UnicodeError:
        return None


def text_path(text: str) -> str:
    """A path written as text in a UTF-8 file (a TOML config or policy) as Python's file functions
    take it: the str whose filesystem encoding is the text's UTF-8 bytes. The text itself under a
    UTF-8 filesystem encoding; under an ASCII one (`LC_ALL=C PYTHONUTF8=0`) `bundle = "bündle"`
    was the str "bündle", which Python could not encode, so the folder "did not exist"."""
    return os.fsdecode(text.encode("utf-8", "surrogatepass"))


def name_text(name: str) -> str:
    """A file or folder name as text to record or show (a model's name in bundle.json and in its
    graph, which protobuf and JSON take as UTF-8 only): the name's bytes decoded as UTF-8, a byte
    that is not UTF-8 as U+FFFD."""
    return os.fsencode(name).decode("utf-8", "replace")
