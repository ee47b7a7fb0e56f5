"""Read what the device side needs of an ONNX model without the `onnx` package (the
device side does not install it): the external-data file names it refers to and how far
into each it reads (`external_data_extents`), and the bytes a decode step reads (`decode_read_bytes`, for the roofline of `edge-runtime bench`).

A minimal protobuf wire-format walk over a memory-mapped file: ModelProto.graph
(field 7) -> GraphProto.initializer (5), node (1) and input (11) -> attribute (5) -> t (5) /
tensors (11) / g (6) / graphs (10) -> TensorProto.external_data (13) entries
whose key (1) is "location", "offset" or "length" -> value (2). Nothing is copied but names, shapes and
the few small integer tensors asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ExternalExtent:
    """How far into one external-data file the graph reads: the end of its furthest tensor."""

    end: int  # bytes: the largest offset + length of a tensor stored there
    tensor: str  # that tensor's name


@contextlib.contextmanager
def _mapped_model(path: Path) -> Iterator[mmap.mmap]:
    """The model file at `path`, memory-mapped for a scan; an empty file, or a scan that runs
    off the end of a field or meets a field of another wire type than its own (TypeError),
    is a ValueError."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path.name} is empty")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        try:
            yield mm
        except (IndexError, KeyError, TypeError, struct.error) as exc:
            raise ValueError("truncated or malformed protobuf message") from exc


def _text(buf, span: tuple[int, int]) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", "replace")


@dataclass
class _Tensor:
    """The fields of a TensorProto the scans read: spans, not data."""

    name: str = ""
    dims: list[int] = dataclasses.field(default_factory=list)
    data_type: int = 0
    external: dict[str, str] = dataclasses.field(default_factory=dict)  # external_data (13): key -> value
    location: int = 0  # data_location (14): 1 is EXTERNAL
    raw: tuple[int, int] | None = None  # raw_data (9)
    int64s: list[int] = dataclasses.field(default_factory=list)  # int64_data (7)


def _tensor(buf, span: tuple[int, int]) -> _Tensor:
    t = _Tensor()
    for number, wire, value in _fields(buf, *span):
        if number == 1:
            t.dims += _packed_ints(buf, value, wire)
        elif number == 2 and wire == _VARINT:
            t.data_type = value
        elif number == 8 and wire == _LEN:
            t.name = _text(buf, value)
        elif number == 9 and wire == _LEN:
            t.raw = value
        elif number == 7:
            t.int64s += [v - (1 << 64) if v >= 1 << 63 else v for v in _packed_ints(buf, value, wire)]
        elif number == 13 and wire == _LEN:
            entry = {f: _text(buf, v) for f, w, v in _fields(buf, *value) if w == _LEN and f in (1, 2)}
            if 1 in entry and 2 in entry:
                t.external[entry[1]] = entry[2]
        elif number == 14 and wire == _VARINT:
            t.location = value
    return t


def _tensor_external(buf, span: tuple[int, int], out: dict[str, ExternalExtent]) -> None:
    t = _tensor(buf, span)
    location = t.external.get("location")
    if location is None:
        return
    try:
        offset = int(t.external.get("offset") or 0)
        length = int(t.external["length"]) if t.external.get("length") else math.ceil(
            math.prod(t.dims) * ELEMENT_BYTES.get(t.data_type, 1))
    except ValueError as exc:
        raise ValueError(f"tensor {t.name!r} has an external-data offset or length that is not a number") from exc
    end = offset + length
    if location not in out or end > out[location].end:
        out[location] = ExternalExtent(end, t.name)


def _graph_external(buf, span: tuple[int, int], out: dict[str, ExternalExtent]) -> None:
    for field, wire, value in _fields(buf, *span):
        if wire != _LEN:
            continue
        if field == 5:  # initializer
            _tensor_external(buf, value, out)
        elif field == 1:  # node
            for f, w, attr in _fields(buf, *value):
                if f == 5 and w == _LEN:
                    for af, aw, av in _fields(buf, *attr):
                        if aw == _LEN and af in (5, 11):
                            _tensor_external(buf, av, out)
                        elif aw == _LEN and af in (6, 10):
                            _graph_external(buf, av, out)


def external_data_extents(path: Path) -> dict[str, ExternalExtent]:
    """Every external-data `location` in the model at `path`, with how far into that file
    the model reads (ValueError if the file is not a well-formed protobuf message)."""
    out: dict[str, ExternalExtent] = {}
    with _mapped_model(path) as mm:
        for field, wire, value in _fields(mm, 0, len(mm)):
            if field == 7 and wire == _LEN:
                _graph_external(mm, value, out)
    return out


# -- the top-level graph's initializers, nodes and inputs: what a decode step reads ------------------------------
# TensorProto.DataType -> bytes an element (sub-byte types packed: 4-bit half a byte, 2-bit a quarter,
# 6-bit three quarters); STRING (8) has no fixed size and counts 1
ELEMENT_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 8: 1, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16,
                 16: 2, 17: 1, 18: 1, 19: 1, 20: 1, 21: 0.5, 22: 0.5, 23: 0.5, 24: 1, 25: 0.25, 26: 0.25,
                 27: 0.75, 28: 0.75}
_EXTERNAL = 1  # TensorProto.DataLocation


@dataclass(frozen=True)
class Initializer:
    name: str
    dims: tuple[int, ...]
    data_type: int
    nbytes: int  # inline: the data's length; external: the recorded length
    int64_values: tuple[int, ...] | None = None  # an inline INT64 tensor's values (TopK's k)


@dataclass(frozen=True)
class Node:
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    ints: tuple[tuple[str, int], ...] = ()  # its integer attributes (Gather's axis), by name
    value: Initializer | None = None  # a Constant's value attribute (TopK's k given by a node)
    name: str = ""


@dataclass(frozen=True)
class GraphScan:
    initializers: dict[str, Initializer]
    nodes: tuple[Node, ...]
    input_types: dict[str, int]  # graph input name -> element type


def _packed_ints(buf, span, wire: int) -> list[int]:
    if wire == _VARINT:
        return [span]
    values, pos = [], span[0]
    while pos < span[1]:
        v, pos = _varint(buf, pos)
        values.append(v)
    return values


def _initializer(buf, span) -> Initializer:
    t = _tensor(buf, span)
    size = math.ceil(math.prod(t.dims) * ELEMENT_BYTES.get(t.data_type, 1))  # sub-byte types: packed, the last byte padded
    int64s = t.int64s
    if t.location == _EXTERNAL:
        nbytes = int(t.external["length"]) if t.external.get("length") else size
    elif t.raw is not None:
        nbytes = t.raw[1] - t.raw[0]
        if t.data_type == 7 and nbytes <= 64:
            int64s = list(struct.unpack(f"<{nbytes // 8}q", bytes(buf[t.raw[0]:t.raw[1]])))
    else:  # float_data, int32_data, int64_data...: the elements' size in the tensor's type
        nbytes = size
    values = tuple(int64s) if t.data_type == 7 and int64s and len(int64s) <= 8 else None
    return Initializer(t.name, tuple(t.dims), t.data_type, nbytes, values)


def _attribute(buf, span) -> tuple[str, int | None, Initializer | None]:
    """An AttributeProto's (name, i, t): the integer (field 3) and the tensor (field 5) it holds."""
    name, i, t = "", None, None
    for field, wire, value in _fields(buf, *span):
        if field == 1 and wire == _LEN:
            name = _text(buf, value)
        elif field == 3 and wire == _VARINT:
            i = value - (1 << 64) if value >= 1 << 63 else value
        elif field == 5 and wire == _LEN:
            t = _initializer(buf, value)
    return name, i, t


def _node(buf, span) -> Node:
    inputs, outputs, op_type, name, ints, value_attr = [], [], "", "", [], None
    for field, wire, value in _fields(buf, *span):
        if wire != _LEN:
            continue
        if field == 5:
            attr, i, t = _attribute(buf, value)
            if i is not None:
                ints.append((attr, i))
            if attr == "value" and t is not None:
                value_attr = t
            continue
        text = _text(buf, value)
        if field == 1:
            inputs.append(text)
        elif field == 2:
            outputs.append(text)
        elif field == 3:
            name = text
        elif field == 4:
            op_type = text
    return Node(op_type, tuple(inputs), tuple(outputs), tuple(ints), value_attr if op_type == "Constant" else None,
                name)


def _input_type(buf, span) -> tuple[str, int]:
    name, elem = "", 0
    for field, wire, value in _fields(buf, *span):
        if field == 1 and wire == _LEN:
            name = _text(buf, value)
        elif field == 2 and wire == _LEN:  # TypeProto -> tensor_type (1) -> elem_type (1)
            for f, w, v in _fields(buf, *value):
                if f == 1 and w == _LEN:
                    elem = next((tv for tf, tw, tv in _fields(buf, *v) if tf == 1 and tw == _VARINT), 0)
    return name, elem


def scan_graph(path: Path) -> GraphScan:
    """The top-level graph's initializers (sizes, not data), nodes and input element types
    (ValueError if the file is not a well-formed protobuf message)."""
    initializers: dict[str, Initializer] = {}
    nodes: list[Node] = []
    input_types: dict[str, int] = {}
    with _mapped_model(path) as mm:
        for field, wire, value in _fields(mm, 0, len(mm)):
            if field != 7 or wire != _LEN:
                continue
            for f7, w7, v7 in _fields(mm, *value):
                if w7 != _LEN:
                    continue
                if f7 == 5:
                    t = _initializer(mm, v7)
                    initializers[t.name] = t
                elif f7 == 1:
                    nodes.append(_node(mm, v7))
                elif f7 == 11:
                    name, elem = _input_type(mm, v7)
                    input_types[name] = elem
    return GraphScan(initializers, tuple(nodes), input_types)


def decode_read_bytes(path: Path) -> tuple[int, int]:
    """(all initializer bytes, the bytes of them a decode step reads). An initializer that
    only Gather or GatherBlockQuantized nodes index along its first axis (the token-embedding
    table; the two-pass lm_head's int8 rows, with their scales and zero points) counts the rows
    a step gathers: one per node, or k where the indices are a TopK's with a constant k (an
    initializer or a Constant node). Every other initializer counts whole (a table that is
    also multiplied, as a tied embedding is, and the cos/sin tables: a bound)."""
    scan = scan_graph(path)
    sizes = {name: t.nbytes for name, t in scan.initializers.items()}
    constants = {**{n.outputs[0]: n.value for n in scan.nodes if n.value is not None and n.outputs},
                 **scan.initializers}
    top_k = {}
    for n in scan.nodes:
        k = constants.get(n.inputs[1]) if n.op_type == "TopK" and len(n.inputs) > 1 else None
        if k is not None and k.int64_values and len(n.outputs) > 1:
            top_k[n.outputs[1]] = k.int64_values[0]
    gathered: dict[str, int] = {}  # table -> rows a step gathers
    whole: set[str] = set()  # read by something else too
    for n in scan.nodes:
        tables = ([n.inputs[0]] + (list(n.inputs[2:]) if n.op_type == "GatherBlockQuantized" else [])
                  if n.op_type in ("Gather", "GatherBlockQuantized") and len(n.inputs) > 1 else [])
        along_rows = dict(n.ints).get("gather_axis" if n.op_type == "GatherBlockQuantized" else "axis", 0) == 0
        for name in n.inputs:
            if name not in sizes:
                continue
            if name in tables and along_rows:
                gathered[name] = gathered.get(name, 0) + top_k.get(n.inputs[1], 1)
            else:
                whole.add(name)
    total = sum(sizes.values())
    unread = 0
    for t, r in gathered.items():
        if t in whole:
            continue
        dims = scan.initializers[t].dims
        rows = max(1, dims[0] if dims else 1)
        unread += sizes[t] - sizes[t] * min(r, rows) // rows
    return total, total - unread


def input_element_bytes(path: Path, prefix: str) -> float | None:
    """Bytes an element of the first graph input whose name starts with `prefix` (the KV
    cache's past_key_values.*: 4 float32, 2 float16, 1 int8), None without one."""
    scan = scan_graph(path)
    elem = next((e for name, e in scan.input_types.items() if name.startswith(prefix)), None)
    return ELEMENT_BYTES.get(elem) if elem is not None else None
