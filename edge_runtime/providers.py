"""onnxruntime import and execution-provider selection.

onnxruntime (CPU) and onnxruntime-gpu install the same `onnxruntime` module and
cannot be installed side by side, so the package leaves the choice to an extra
(`edge-runtime[cpu]` or `edge-runtime[gpu]`; NVIDIA's JetPack wheels on Jetson).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .errors import ConfigError, RuntimeMissing

log = logging.getLogger(__name__)

# The oldest onnxruntime that loads the int8 KV cache (GroupQueryAttention's kv_cache_bit_width) of
# the CPU profiles' bundles (kv_cache.bits = 8). It is built for Python 3.11 and newer: on Python
# 3.10 (JetPack 6, Ubuntu 22.04) the newest onnxruntime is 1.23, which runs bundles with a float KV
# cache (`export --kv-cache-bits 0`). pyproject.toml's cpu extra asks for the same, by Python version.
INT8_KV_ONNXRUNTIME = (1, 32)
INT8_KV_PYTHON = (3, 11)
PYTHON_3_10_ONNXRUNTIME = "1.23"


def onnxruntime_version_tuple(text: str) -> tuple[int, ...]:
    """(1, 32) of "1.32.0" or "1.32.0.dev20260101": the part the floors above compare."""
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def cpu_onnxruntime_requirement(python: tuple[int, int] | None = None) -> str:
    """The cpu extra's onnxruntime requirement on `python` (default: this interpreter)."""
    python = tuple(sys.version_info[:2]) if python is None else python
    if python >= INT8_KV_PYTHON:
        return f"onnxruntime>={'.'.join(map(str, INT8_KV_ONNXRUNTIME))}"
    return f"onnxruntime>={PYTHON_3_10_ONNXRUNTIME}"


def int8_kv_python_note(python: tuple[int, int] | None = None) -> str:
    """Why onnxruntime 1.32 cannot be installed on `python` ("" where it can)."""
    python = tuple(sys.version_info[:2]) if python is None else python
    if python >= INT8_KV_PYTHON:
        return ""
    return (f"onnxruntime {'.'.join(map(str, INT8_KV_ONNXRUNTIME))} is built for Python "
            f"{'.'.join(map(str, INT8_KV_PYTHON))} and newer, and this is Python {'.'.join(map(str, python))}, "
            f"whose newest onnxruntime is {PYTHON_3_10_ONNXRUNTIME}: here only a bundle with a float KV cache "
            "loads, or run the daemon on Python 3.11 or newer")


INSTALL_HINT = (
    f"onnxruntime is not installed: `pip install '{cpu_onnxruntime_requirement()}'` on a CPU machine (the "
    "package's cpu extra), `pip install onnxruntime-gpu` on an NVIDIA GPU machine (the gpu extra), or NVIDIA's "
    "JetPack onnxruntime-gpu wheel on a Jetson board (README: Install; docs/deployment.md). Install only one of "
    "them."
)


def import_onnxruntime() -> ModuleType:
    """Import onnxruntime lazily, with an install hint instead of a bare ImportError."""
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - exercised by the CLI on bare machines
        raise RuntimeMissing(INSTALL_HINT) from exc
    return onnxruntime


@dataclass(frozen=True)
class ProviderChoice:
    providers: list[tuple[str, dict[str, Any]]]  # what the session is created with, in order
    device: str  # "cpu" or "cuda": where the KV cache and I/O binding live
    note: str  # one log line: what runs and why
    device_id: int = 0  # which GPU (the GPU provider's device_id option): the session's and the buffers'


GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def choose_providers(requested: list[tuple[str, dict[str, Any]]], available: list[str],
                     *, allow_cpu_fallback: bool, profile_name: str, problem: str | None = None,
                     remedy: str = "install onnxruntime-gpu") -> ProviderChoice:
    """Keep the profile's providers that are available, in the profile's order.

    `available` is what this onnxruntime build offers, or (engine.check_session_providers)
    what a session really started; `problem` and `remedy` then say why the others are gone.
    A GPU profile whose GPU providers are all missing is an error unless the profile
    allows the CPU fallback: never a silent fallback to CPU."""
    chosen = [(name, opts) for name, opts in requested if name in available]
    wanted_gpu = [name for name, _ in requested if name in GPU_PROVIDERS]
    have_gpu = [name for name, _ in chosen if name in GPU_PROVIDERS]
    if wanted_gpu and not have_gpu:
        msg = problem or (f"profile {profile_name} asks for {', '.join(wanted_gpu)} but this onnxruntime offers only "
                          f"{', '.join(available)}")
        if not allow_cpu_fallback:
            raise ConfigError(msg + f" ({remedy}, or allow the CPU fallback: --allow-cpu-fallback on `generate` or "
                              "`serve`, allow_cpu_fallback = true in the daemon config's [model] table, or in the "
                              "profile)", key="allow_cpu_fallback")
        return ProviderChoice([("CPUExecutionProvider", {})], "cpu", msg + "; running on the CPU provider")
    if not any(name == "CPUExecutionProvider" for name, _ in chosen):
        chosen.append(("CPUExecutionProvider", {}))
    device = "cuda" if have_gpu else "cpu"
    names = ", ".join(name for name, _ in chosen)
    note = f"execution providers: {names}" + ("" if have_gpu else " (CPU provider)")
    return ProviderChoice(chosen, device, note, gpu_device_id(chosen) if have_gpu else 0)


# TensorRT's cache folders, each with the option that turns it on: the provider makes the folder
# (not its parents) and throws when it cannot
TENSORRT_CACHES = (("trt_engine_cache_path", "trt_engine_cache_enable", "engine cache"),
                   ("trt_timing_cache_path", "trt_timing_cache_enable", "timing cache"))


ENGINE_CACHE_KEY_CHARS = 16  # hex digits of bundle.json's SHA-256 naming a bundle's engine cache folder


def tensorrt_engine_cache_per_bundle(requested: list[tuple[str, dict[str, Any]]],
                                     bundle_sha256: str) -> list[tuple[str, dict[str, Any]]]:
    """The providers with TensorRT's engine cache in a folder of the bundle's own:
    `<trt_engine_cache_path>/<the first 16 hex digits of its bundle.json's SHA-256>`.
    onnxruntime names a cached engine by a hash of the graph's file name (model.onnx in every
    bundle), its input and node output names and the onnxruntime, CUDA and TensorRT versions,
    never the weights, and loads a file of that name without looking further: another bundle
    of the same graph (the model exported again, fine-tuned or with another algorithm, an
    upgrade's new bundle) in the profile's one folder would run the engines built for the
    previous bundle, its weights baked in. bundle.json lists every file's SHA-256, so each
    bundle has its own folder. The timing cache (kernel timings, no weights) stays shared."""
    out = []
    for name, opts in requested:
        if (name == "TensorrtExecutionProvider" and opts.get("trt_engine_cache_path")
                and str(opts.get("trt_engine_cache_enable", "False")).lower() in ("true", "1")):
            opts = {**opts, "trt_engine_cache_path": os.path.join(str(opts["trt_engine_cache_path"]),
                                                                  bundle_sha256[:ENGINE_CACHE_KEY_CHARS])}
        out.append((name, opts))
    return out


def tensorrt_cache_problem(requested: list[tuple[str, dict[str, Any]]]) -> str | None:
    """Make the folders of the TensorRT provider's enabled caches (parents too); None when they
    exist, else why one cannot be made (a user other than the service's, for whom
    /var/cache/edge-runtime is not theirs). TensorRT's provider would throw at creation, and
    onnxruntime's Python then quietly makes the session again with a bare CUDA provider, without
    the profile's CUDA options (on a Jetson, the arena that does not grow in powers of two)."""
    for name, opts in requested:
        if name != "TensorrtExecutionProvider":
            continue
        for path_key, enable_key, what in TENSORRT_CACHES:
            folder = opts.get(path_key)
            if not folder or str(opts.get(enable_key, "False")).lower() not in ("true", "1"):
                continue
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as exc:
                return (f"cannot make TensorRT's {what} folder {folder} ({path_key}; {type(exc).__name__}: "
                        f"{exc.strerror or exc})")
    return None


TENSORRT_CACHE_REMEDY = ("make that folder writable for this user, or run as the service (its CacheDirectory= makes "
                         "/var/cache/edge-runtime), or give a copy of the profile with another folder")


def gpu_device_id(providers: list[tuple[str, dict[str, Any]]]) -> int:
    """The device_id the first GPU provider is given (0 when it names none): the KV cache and
    the bound buffers must be on the GPU the session runs on, or every step copies between GPUs."""
    for name, opts in providers:
        if name in GPU_PROVIDERS:
            value = opts.get("device_id", 0)
            try:
                return int(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{name} option device_id {value!r} is not a GPU number",
                                  key="device_id") from None
    return 0
