"""edge-runtime: offline Code Llama inference on edge devices.

The device side needs only onnxruntime(-gpu), numpy, tokenizers and paho-mqtt.

The names below are the stable API for applications that embed the runtime; they
are imported on first use, so ``import edge_runtime`` stays light (no onnxruntime,
no paho) for the CLI and for a client that never loads a model:

    from edge_runtime import Engine, GenerationRequest, SamplingParams   # on this machine
    from edge_runtime import EdgeClient, RemoteError, Busy               # over MQTT
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"  # pyproject.toml's; 0.1.0: every version up to 2026-12-03

# onnxruntime's official wheels collect telemetry on Linux too (1.32, the version required): at import
# they write a persistent device id and an event queue for upload to Microsoft under
# $HOME/.cache/Microsoft/DeveloperTools (for the service: its state directory, the service user's
# home), which grows while the device is offline. An offline runtime opts out as onnxruntime provides:
# ORT_DISABLE_TELEMETRY=1, read once, before onnxruntime is first imported (every onnxruntime import
# of this package and of edge_export comes after this one). One already set (0: opt in) is kept.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

_EXPORTS = {
    "Engine": "engine",
    "EdgeClient": "client",
    "Generation": "client",
    "RemoteError": "client",
    "GenerationRequest": "types",
    "GenerationResult": "types",
    "SamplingParams": "types",
    "Message": "types",
    "Chunk": "types",
    "Usage": "types",
    "Timings": "types",
    "TokenCount": "types",
    "EdgeRuntimeError": "errors",
    "BadRequest": "errors",
    "UnsupportedMode": "errors",
    "ContextLengthExceeded": "errors",
    "UnsafePrompt": "errors",
    "PolicyViolation": "errors",
    "RateLimited": "errors",
    "Busy": "errors",
    "DeadlineExceeded": "errors",
    "Cancelled": "errors",
    "BundleError": "errors",
    "ConfigError": "errors",
}
__all__ = [  # the names of _EXPORTS, spelled out for type checkers
    "BadRequest", "BundleError", "Busy", "Cancelled", "Chunk", "ConfigError", "ContextLengthExceeded",
    "DeadlineExceeded", "EdgeClient", "EdgeRuntimeError", "Engine", "Generation", "GenerationRequest",
    "GenerationResult", "Message", "PolicyViolation", "RateLimited", "RemoteError", "SamplingParams", "Timings",
    "TokenCount", "UnsafePrompt", "UnsupportedMode", "Usage", "__version__",
]

if TYPE_CHECKING:  # what type checkers and IDEs see
    from .client import EdgeClient, Generation, RemoteError
    from .engine import Engine
    from .errors import (BadRequest, BundleError, Busy, Cancelled, ConfigError, ContextLengthExceeded,
                         DeadlineExceeded, EdgeRuntimeError, PolicyViolation, RateLimited, UnsafePrompt,
                         UnsupportedMode)
    from .types import (Chunk, GenerationRequest, GenerationResult, Message, SamplingParams, Timings,
                        TokenCount, Usage)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
