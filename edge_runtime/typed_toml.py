"""Build typed, frozen dataclasses from parsed TOML (or any plain mapping), strictly.

Every problem becomes a `ConfigError` whose message names the source file and the
dotted key, e.g. ``nvidia-gpu.toml: quantization.block_size: expected int, got str``.

Supported field annotations (resolved with `typing.get_type_hints`, so modules may
use ``from __future__ import annotations``):

- ``str``, ``int``, ``float``, ``bool`` -- strict: a bool is never an int or a float,
  an int is accepted (and converted) where a float is expected, and inf/nan are
  rejected;
- ``Literal["a", "b", ...]`` -- the value must be one of the listed values;
- ``X | None`` / ``Optional[X]`` and other unions -- the first member that accepts the
  value wins (TOML has no null: optional keys are simply left out and take their
  default);
- ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]`` -- from a TOML array;
- ``dict[K, V]`` -- from a TOML table (``K`` is ``str`` or a ``Literal`` of strings);
- nested dataclasses -- from a TOML table;
- ``pathlib.Path`` (and other `PurePath` classes) -- from a string;
- ``Annotated[X, Check(...)]`` -- X, then a value check such as `at_least(0)`;
- ``typing.Any`` -- anything, unchecked; any other class -- an ``isinstance`` check
  (e.g. ``datetime.datetime`` for TOML dates).

Dataclass fields with a default (or ``default_factory``) are optional; the others are
required; ``init=False`` fields are not read. Unknown keys are errors. A dataclass's
``__post_init__`` may raise `InvalidField` (naming a key relative to its table) or a
plain ``ValueError`` (which is reported against the table itself) for cross-field rules.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import pathlib
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, Union

from edge_runtime.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "Check",
    "InvalidField",
    "at_least",
    "between",
    "from_mapping",
    "load_toml",
    "matches",
    "non_empty",
    "parse_toml",
    "power_of_two",
]

T = TypeVar("T")


class _Readable(Protocol):
    """A `pathlib.Path` or an `importlib.resources` Traversable."""

    @property
    def name(self) -> str: ...

    def read_bytes(self) -> bytes: ...


@dataclass(frozen=True)
class Check:
    """A value constraint for ``Annotated[X, Check(...)]``.

    `predicate` receives the already type-converted value; when it returns False the
    error reads ``<key>: expected <expected>, got <value>``.
    """

    predicate: Callable[[Any], bool]
    expected: str


def at_least(minimum: float) -> Check:
    """The value must be ``>= minimum``."""
    return Check(lambda v: v >= minimum, f"a value >= {minimum}")


def between(low: float, high: float) -> Check:
    """The value must lie in the closed range ``low..high``."""
    return Check(lambda v: low <= v <= high, f"a value in {low}..{high}")


def power_of_two(minimum: int = 1) -> Check:
    """The value must be a power of two and ``>= minimum``."""
    return Check(lambda v: v >= minimum and v & (v - 1) == 0, f"a power of two >= {minimum}")


def non_empty() -> Check:
    """The array, table or string must not be empty."""
    return Check(lambda v: len(v) > 0, "a non-empty value")


def matches(pattern: str, expected: str) -> Check:
    """The string must match the regular expression `pattern` in full."""
    compiled = re.compile(pattern)
    return Check(lambda v: compiled.fullmatch(v) is not None, expected)


class InvalidField(ValueError):
    """Raised by a dataclass's ``__post_init__`` to blame `key` (relative to its table)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def parse_toml(text: str | bytes, *, source: str) -> dict[str, Any]:
    """Parse TOML text; invalid TOML (or non-UTF-8 bytes) is a ConfigError naming `source`."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from exc


def load_toml(
    cls: type[T], path: str | os.PathLike[str] | _Readable, *, source: str | None = None
) -> T:
    """Read the TOML file at `path` and build a `cls` from it.

    `source` (default: the path as given) is the file name used in error messages.
    An unreadable file is a ConfigError too.
    """
    readable: _Readable = pathlib.Path(path) if isinstance(path, (str, os.PathLike)) else path
    if source is None:
        source = os.fspath(path) if isinstance(path, (str, os.PathLike)) else path.name
    try:
        raw = readable.read_bytes()
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise ConfigError(f"{source}: cannot read file: {reason}") from exc
    return from_mapping(cls, parse_toml(raw, source=source), source=source)


def from_mapping(cls: type[T], data: Mapping[str, Any], *, source: str, prefix: str = "") -> T:
    """Build the dataclass `cls` from `data`, checking every key and value.

    `source` names the file in error messages; `prefix` is the dotted key of `data`
    itself when it is a nested table ("" at the top level).
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, Mapping):
        raise _error(source, prefix or "(top level)", f"expected table, got {_kind(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _type_hints(cls)
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f" (the keys here: {', '.join(fields)})"
            raise _error(source, _join(prefix, str(key)), "unknown key" + hint)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], source, key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _error(source, key, "missing key")
    try:
        return cls(**kwargs)
    except InvalidField as exc:
        raise _error(source, _join(prefix, exc.key), exc.message) from exc
    except ValueError as exc:
        raise _error(source, prefix or "(top level)", str(exc)) from exc


# --------------------------------------------------------------------------- internals


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _error(source: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {message}", key=key, problem=message)


_KIND_NAMES: dict[type, str] = {dict: "table", list: "array", tuple: "array"}


def _kind(value: Any) -> str:
    """How a value's type is named in error messages."""
    for typ, name in _KIND_NAMES.items():
        if isinstance(value, typ):
            return name
    return type(value).__name__


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(tp: Any) -> str:
    """How an expected type is named in error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _describe(args[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_describe(a) for a in args if a is not type(None))
    if origin in (tuple, list):
        return f"array of {_describe(args[0])}" if args else "array"
    if origin is dict:
        return f"table of {_describe(args[1])}" if args else "table"
    if dataclasses.is_dataclass(tp):
        return "table"
    if isinstance(tp, type) and issubclass(tp, pathlib.PurePath):
        return "str (a path)"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    """Internal: the value does not have the expected type (message built by caller)."""


def _convert(tp: Any, value: Any, source: str, key: str) -> Any:
    """Check `value` against annotation `tp` and return it converted."""
    try:
        return _convert_or_mismatch(tp, value, source, key)
    except _Mismatch:
        raise _error(source, key, f"expected {_describe(tp)}, got {_kind(value)}") from None


def _convert_or_mismatch(tp: Any, value: Any, source: str, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    if tp is Any:
        return value
    if origin is typing.Annotated:
        converted = _convert(args[0], value, source, key)
        for check in args[1:]:
            if isinstance(check, Check) and not check.predicate(converted):
                raise _error(source, key, f"expected {check.expected}, got {_show(value)}")
        return converted
    if origin is Literal:
        # Compare type too, so that True does not match Literal[1].
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _error(source, key, f"expected {_describe(tp)}, got {_show(value)}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        for member in members:
            try:
                return _convert(member, value, source, key)
            except ConfigError:
                continue
        if len(members) == 1:  # Optional[X]: report X's own, more precise error
            return _convert(members[0], value, source, key)
        raise _Mismatch
    if origin is None and tp in (tuple, list, dict):  # bare `tuple`, `list`, `dict`
        origin = tp
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _error(
                    source, key, f"expected an array of {len(args)} items, got {len(value)}"
                )
            item_types = list(args)
        else:
            item_types = [args[0] if args else Any] * len(value)
        items = [
            _convert(item_tp, item, source, f"{key}[{i}]")
            for i, (item_tp, item) in enumerate(zip(item_types, value, strict=True))
        ]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        key_tp, value_tp = args if args else (str, Any)
        return {
            _convert(key_tp, k, source, _join(key, str(k))): _convert(
                value_tp, v, source, _join(key, str(k))
            )
            for k, v in value.items()
        }
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _Mismatch
        return from_mapping(tp, value, source=source, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise _error(source, key, f"expected a finite float, got {value!r}")
            return float(value)
        raise _Mismatch
    if isinstance(tp, type) and issubclass(tp, pathlib.PurePath):
        if isinstance(value, str):
            return tp(value)
        raise _Mismatch
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    raise TypeError(f"typed_toml: unsupported annotation {tp!r} for {key}")
