"""Find the external-data file names an ONNX model refers to, without the `onnx`
package (the device side does not install it).

A minimal protobuf wire-format walk over a memory-mapped file: ModelProto.graph
(field 7) -> GraphProto.initializer (5) and node (1) -> attribute (5) -> t (5) /
tensors (11) / g (6) / graphs (10) -> TensorProto.external_data (13) entries
whose key (1) is "location" -> value (2). Nothing is copied but those strings.
"""

from __future__ import annotations

import mmap
from pathlib import Path

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _fields(buf, start: int, end: int):
    """Yield (field number, wire type, value) for the message in buf[start:end];
    value is an int for varints and a (start, end) span for length-delimited fields."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _LEN:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError("truncated length-delimited field")
            value = (pos, pos + length)
            pos += length
        elif wire == _I64:
            value, pos = None, pos + 8
        elif wire == _I32:
            value, pos = None, pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield field, wire, value


def _tensor_locations(buf, span: tuple[int, int], out: set[str]) -> None:
    for field, wire, value in _fields(buf, *span):
        if field == 13 and wire == _LEN:
            key = val = None
            for f, w, v in _fields(buf, *value):
                if w == _LEN and f == 1:
                    key = buf[v[0]:v[1]].decode("utf-8", "replace")
                elif w == _LEN and f == 2:
                    val = buf[v[0]:v[1]].decode("utf-8", "replace")
            if key == "location" and val is not None:
                out.add(val)


def _graph_locations(buf, span: tuple[int, int], out: set[str]) -> None:
    for field, wire, value in _fields(buf, *span):
        if wire != _LEN:
            continue
        if field == 5:  # initializer
            _tensor_locations(buf, value, out)
        elif field == 1:  # node
            for f, w, attr in _fields(buf, *value):
                if f == 5 and w == _LEN:
                    for af, aw, av in _fields(buf, *attr):
                        if aw == _LEN and af in (5, 11):
                            _tensor_locations(buf, av, out)
                        elif aw == _LEN and af in (6, 10):
                            _graph_locations(buf, av, out)


def external_data_locations(path: Path) -> set[str]:
    """Every external-data `location` in the model at `path` (ValueError if the
    file is not a well-formed protobuf message)."""
    out: set[str] = set()
    if path.stat().st_size == 0:
        raise ValueError(f"{path.name} is empty")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        try:
            for field, wire, value in _fields(mm, 0, len(mm)):
                if field == 7 and wire == _LEN:
                    _graph_locations(mm, value, out)
        except IndexError as exc:
            raise ValueError("truncated protobuf message") from exc
    return out
