"""pytest plugin: run the device-side tests under a Python that has no torch (3.10, 3.12, 3.13:
docs/deployment.md, "Python versions"), with the checkpoints, bundles and torch references that
the fixtures make built by the export side in another Python that has it, EDGE_EXPORT_PYTHON
(this checkout's .venv/bin/python by default):

    PYTHONPATH=tests /tmp/py310/bin/python -m pytest -p export_in_another_python -p no:cacheprovider tests/service

Each call of edge_export.synthetic's build_checkpoint(_streamed), edge_export.pipeline's
run_export, edge_export.demo_model's ensure_demo_model and torch_reference's functions runs in
a subprocess of that Python (the arguments and the result pickled); everything else, the code
under test included, runs in the Python under test. Only the export side is swapped: a test of
the export itself (tests/export) still needs torch here."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import types
from pathlib import Path, PurePath

TESTS = Path(__file__).resolve().parent
EXPORT_PYTHON = os.environ.get("EDGE_EXPORT_PYTHON", str(TESTS.parent / ".venv" / "bin" / "python"))


def to_wire(value):
    """`value` with each Path as ("path", str): a pickled Path names its class's module, which
    moved in 3.13 (pathlib._local), so one Python could not unpickle another's."""
    if isinstance(value, PurePath):
        return ("path", str(value))
    if isinstance(value, (list, tuple)):
        return type(value)(to_wire(v) for v in value)
    if isinstance(value, dict):
        return {k: to_wire(v) for k, v in value.items()}
    return value


def from_wire(value):
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "path":
        return Path(value[1])
    if isinstance(value, (list, tuple)):
        return type(value)(from_wire(v) for v in value)
    if isinstance(value, dict):
        return {k: from_wire(v) for k, v in value.items()}
    return value


_RUNNER = f"""
import importlib, pickle, sys
sys.path.insert(0, {str(TESTS)!r})
from export_in_another_python import from_wire, to_wire
module, name, args, kwargs = from_wire(pickle.load(sys.stdin.buffer))
if (module, name) == ("edge_export.pipeline", "run_export"):
    from edge_export.pipeline import ExportOptions, run_export
    from edge_export.progress import Progress
    run_export(ExportOptions(**kwargs), Progress(5, enabled=False))
    result = None  # the summary's classes are the export side's
else:
    result = getattr(importlib.import_module(module), name)(*args, **kwargs)
sys.stdout.buffer.write(pickle.dumps(to_wire(result), protocol=4))
"""


def call_in_export_python(module: str, name: str, args: tuple, kwargs: dict):
    done = subprocess.run([EXPORT_PYTHON, "-c", _RUNNER], capture_output=True,
                          input=pickle.dumps(to_wire((module, name, args, kwargs)), protocol=4))
    if done.returncode:
        raise RuntimeError(f"{module}.{name} in {EXPORT_PYTHON} failed:\n{done.stderr.decode()[-4000:]}")
    return from_wire(pickle.loads(done.stdout))


def _in_export_python(module: str, name: str):
    return lambda *args, **kwargs: call_in_export_python(module, name, args, kwargs)


class ExportOptions:
    """Holds run_export's options for the other Python (the real class imports the export side)."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs


class ExportError(Exception):
    pass


def run_export(options: ExportOptions, progress=None) -> None:
    call_in_export_python("edge_export.pipeline", "run_export", (), options.kwargs)


def pytest_configure(config) -> None:
    if not Path(EXPORT_PYTHON).exists():
        raise RuntimeError(f"EDGE_EXPORT_PYTHON {EXPORT_PYTHON} does not exist: the Python with the export extra")
    import edge_export.demo_model as demo_model
    import edge_export.synthetic as synthetic

    demo_model.ensure_demo_model = _in_export_python("edge_export.demo_model", "ensure_demo_model")
    synthetic.build_checkpoint = _in_export_python("edge_export.synthetic", "build_checkpoint")
    synthetic.build_checkpoint_streamed = _in_export_python("edge_export.synthetic", "build_checkpoint_streamed")
    pipeline = types.ModuleType("edge_export.pipeline")  # the real one imports scipy and torch
    pipeline.ExportOptions, pipeline.ExportError, pipeline.run_export = ExportOptions, ExportError, run_export
    sys.modules["edge_export.pipeline"] = pipeline
    sys.path.insert(0, str(TESTS))
    import torch_reference

    for name in ("prompt_logits", "greedy", "greedy_penalized"):
        setattr(torch_reference, name, _in_export_python("torch_reference", name))
