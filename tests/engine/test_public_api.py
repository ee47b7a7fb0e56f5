"""The names an embedding application imports from `edge_runtime` itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import edge_runtime


def test_every_exported_name_resolves_and_all_lists_them():
    assert sorted(set(edge_runtime.__all__) - {"__version__"}) == sorted(edge_runtime._EXPORTS)
    for name in edge_runtime._EXPORTS:
        assert getattr(edge_runtime, name).__name__ == name
    from edge_runtime import Busy, RemoteError

    assert isinstance(RemoteError("busy", "the queue is full"), Busy)


def test_importing_the_package_loads_neither_onnxruntime_nor_paho():
    code = ("import sys, edge_runtime; from edge_runtime import GenerationRequest, Busy; "
            "print(sorted(m for m in ('onnxruntime', 'paho', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_package_is_marked_typed():
    assert (Path(edge_runtime.__file__).parent / "py.typed").is_file()


def test_the_streams_are_typed_as_the_docs_use_them():
    """README: `contextlib.closing(engine.generate(...))`, and a Generation's final reply is the
    return value of `final = yield from gen`; typed as plain Iterators, a type checker refused the
    first (an Iterator has no close()) and typed `final` as None."""
    import collections.abc
    import typing

    from edge_runtime import Chunk, Engine, Generation, GenerationResult

    stream = typing.get_type_hints(Engine.generate)["return"]
    assert typing.get_origin(stream) is collections.abc.Generator
    assert typing.get_args(stream)[0] == Chunk | GenerationResult
    astream = typing.get_type_hints(Engine.agenerate)["return"]  # contextlib.aclosing(engine.agenerate(...))
    assert typing.get_origin(astream) is collections.abc.AsyncGenerator
    replies = typing.get_type_hints(Generation.__iter__)["return"]
    assert typing.get_origin(replies) is collections.abc.Generator
    assert typing.get_args(replies)[2] == dict[str, typing.Any]
