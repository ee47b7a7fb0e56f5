"""Device profiles: one validated TOML file per hardware target.

A profile says how to run (and how to export for) a target: the onnxruntime
execution providers in priority order with their options, whether running on the
CPU is acceptable when an accelerator provider is missing, the default weight
precision, the MatMulNBits quantization settings, KV-cache dtype, context length,
thread count, memory budget, and the minimum fidelity an export must reach against
torch fp32. The packaged profiles live in the ``edge_device_profiles`` package
(``device_profiles/`` in the source tree); `load_profile` also accepts any path.

`detect_profile` picks the packaged profile that fits this machine, from
`MachineFacts` that `gather_machine_facts` collects (paths and commands injectable).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import importlib.resources
import os
import pathlib
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Literal, get_args

from edge_runtime.errors import ConfigError
from edge_runtime.providers import (
    INT8_KV_ONNXRUNTIME,
    INT8_KV_PYTHON,
    cpu_onnxruntime_requirement,
    int8_kv_python_note,
    onnxruntime_version_tuple,
)
from edge_runtime.typed_toml import (
    Check,
    InvalidField,
    at_least,
    between,
    load_toml,
    matches,
    non_empty,
    power_of_two,
)

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from importlib.resources.abc import Traversable  # novermin: for the type checker, on 3.11+ only
    else:
        from importlib.abc import Traversable

__all__ = [
    "PRECISIONS",
    "AgreementByPrecision",
    "DeviceProfile",
    "ExecutionProvider",
    "FidelityThresholds",
    "KvCacheSettings",
    "LogitDiffByPrecision",
    "MachineFacts",
    "Precision",
    "QuantizationSettings",
    "detect_profile",
    "gather_machine_facts",
    "install_hint",
    "list_profiles",
    "load_profile",
    "profile_summary",
]

PROFILE_PACKAGE = "edge_device_profiles"

Precision = Literal["int4", "int8", "fp16", "fp32"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
KvCacheDtype = Literal["float32", "float16"]
OptionValue = str | int | float | bool

PositiveInt = Annotated[int, at_least(1)]
NonNegativeInt = Annotated[int, at_least(0)]
NonNegativeFloat = Annotated[float, at_least(0.0)]
Fraction = Annotated[float, between(0.0, 1.0)]
ProviderName = Annotated[
    str,
    matches(
        r"[A-Za-z][A-Za-z0-9]*ExecutionProvider",
        "an onnxruntime provider name such as 'CUDAExecutionProvider'",
    ),
]
PROFILE_NAME_PATTERN = r"[a-z0-9][a-z0-9_-]*"  # also what a bundle's profile.name must be (bundle.py)
ProfileName = Annotated[
    str, matches(PROFILE_NAME_PATTERN, "a lower-case name such as 'cpu-x86_64'")
]
SESSION_CONFIG_KEY = r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)+"
SessionConfigKey = Annotated[
    str, matches(SESSION_CONFIG_KEY, "an onnxruntime session config key such as 'ep.cuda.fpa_intb_gemm'")
]

CPU_PROVIDER = "CPUExecutionProvider"


# ------------------------------------------------------------------------- the schema


# onnxruntime's execution provider names (onnxruntime.get_all_providers() of 1.32, and names
# earlier releases had); the installed onnxruntime's own list is added where it imports.
KNOWN_PROVIDERS = (
    "TensorrtExecutionProvider", "CUDAExecutionProvider", "MIGraphXExecutionProvider", "ROCMExecutionProvider",
    "OpenVINOExecutionProvider", "DnnlExecutionProvider", "VitisAIExecutionProvider", "QNNExecutionProvider",
    "NnapiExecutionProvider", "VSINPUExecutionProvider", "JsExecutionProvider", "CoreMLExecutionProvider",
    "DmlExecutionProvider", "RknpuExecutionProvider", "WebNNExecutionProvider", "WebGpuExecutionProvider",
    "XnnpackExecutionProvider", "CANNExecutionProvider", "AzureExecutionProvider", "ACLExecutionProvider",
    "ArmNNExecutionProvider", "SNPEExecutionProvider", "TvmExecutionProvider", "CPUExecutionProvider",
)


def known_provider_names() -> tuple[str, ...]:
    """KNOWN_PROVIDERS, and any other the installed onnxruntime knows (built in or not)."""
    try:
        import onnxruntime

        extra = tuple(p for p in onnxruntime.get_all_providers() if p not in KNOWN_PROVIDERS)
    except Exception:  # not installed, or broken: the static list
        extra = ()
    return KNOWN_PROVIDERS + extra


@dataclass(frozen=True)
class ExecutionProvider:
    """One onnxruntime execution provider and its provider options."""

    name: ProviderName
    options: dict[str, OptionValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = known_provider_names()
        if self.name not in known:
            import difflib

            lower = {name.lower(): name for name in known}
            near = difflib.get_close_matches(self.name.lower(), list(lower), n=1, cutoff=0.6)
            hint = f" (did you mean {lower[near[0]]!r}?)" if near else ""
            raise InvalidField("name", f"{self.name!r} is not an onnxruntime execution provider{hint}; the names: "
                                       + ", ".join(known))

    def ort_options(self) -> dict[str, str]:
        """The options as onnxruntime takes them: strings (bools as "True"/"False")."""
        return {key: str(value) for key, value in self.options.items()}


LM_HEAD_NODE = "/lm_head/MatMul"  # the fused graph's lm_head node, as keep_unquantized patterns see it


def node_matches(node_name: str, patterns: tuple[str, ...]) -> bool:
    """Whether keep_unquantized `patterns` (substrings or fnmatch patterns of node names) keep `node_name`."""
    return any(p in node_name or fnmatch.fnmatch(node_name, p) for p in patterns)


ZERO_OR_POWER_OF_TWO = Check(lambda v: v == 0 or (v >= 16 and v & (v - 1) == 0), "0 or a power of two >= 16")


# The int8 embedding table's blocks (quantization.embedding_bits): on the demo model blocks of 32
# keep its divergence from torch within 4 % of a float table's, blocks of 128 added 7 % and cost
# a point of corpus top-1 (python benchmarks/export_bench.py; docs/performance.md, "The embedding
# table in int8 blocks"); the scales then add an eighth of a byte a weight.
EMBEDDING_BLOCK_SIZE = 32


@dataclass(frozen=True)
class QuantizationSettings:
    """Weight-only quantization of MatMul weights (onnxruntime's MatMulNBits)."""

    block_size: Annotated[int, power_of_two(16)]  # weights per scale (and zero point)
    symmetric: bool  # True: no zero points
    accuracy_level: Annotated[int, between(0, 4)]  # 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
    keep_unquantized: tuple[str, ...]  # layer-name patterns kept in higher precision
    # The kept layers' storage in the fused graph: 8 = int8 MatMulNBits (a quarter of the
    # bytes of float, same fidelity on the demo model); 0 = float. The optimum graph keeps float.
    keep_bits: Literal[0, 8] = 0
    # The kept layers' block size when keep_bits stores them quantized (0: block_size). An int8
    # lm_head in blocks of 128 reads 8 % fewer bytes than in blocks of 32 and onnxruntime's
    # 8-bit MatMulNBits kernel runs it faster: decode 1.03-1.08x (docs/performance.md, "The lm_head's blocks").
    keep_block_size: Annotated[int, ZERO_OR_POWER_OF_TWO] = 0
    # Least-squares block scales (export/graph_builder.block_quantize_mse) in the fused graph
    # instead of onnxruntime's round-to-nearest: what makes symmetric int4 keep fidelity
    # (demo model greedy agreement 0.80 vs 0.56). The optimum graph is quantized by
    # onnxruntime's quantizer, which has no search: there a symmetric profile with
    # scale_search gets zero points instead (recorded in the bundle's manifest).
    scale_search: bool = False
    # "gptq": the fused graph's weights get GPTQ's error feedback (export/gptq.py), calibrated on
    # a code text at export; "rtn": each block rounded on its own. The optimum graph is
    # quantized with round-to-nearest whatever this says (recorded in the bundle's manifest).
    algorithm: Literal["rtn", "gptq"] = "rtn"
    # The optimum graph's block size (0: block_size). There onnxruntime's quantizer rounds each
    # block on its own (or HQQ): without the GPTQ and scale search that let the fused graph's
    # larger blocks keep fidelity, a profile may want smaller ones (cpu-x86_64: blocks of 128
    # rounded put the demo model below the int4 bar, greedy agreement 0.69; blocks of 32: 1.00).
    optimum_block_size: Annotated[int, ZERO_OR_POWER_OF_TWO] = 0
    # > 0 (int4 fused graph with keep_bits 8 on the lm_head, float32 activations): the lm_head in
    # two passes, every logit from int4 weights and this many of the largest recomputed from an
    # int8 copy, of which only those rows are read. A decode step reads the int4 head's bytes; the
    # tokens that decide decoding get the int8 head's logits (docs/performance.md, "The lm_head
    # in two passes"). 0: the int8 lm_head in one pass. Other bundles ignore it.
    lm_head_refine_top_k: NonNegativeInt = 0
    # 8: the fused graph's token embedding table as int8 blocks (of EMBEDDING_BLOCK_SIZE,
    # GatherBlockQuantized) instead of float, where its activations are float32 (int4/int8 bundles
    # on the CPU): 1.16 bytes a weight against 4 (a 7B's table 0.49 GiB -> 0.14 GiB), which are
    # resident memory more than they are read (a step reads one row). 0: float. Other bundles
    # ignore it.
    embedding_bits: Literal[0, 8] = 0

    def __post_init__(self) -> None:
        if self.lm_head_refine_top_k and self.keep_bits != 8:
            raise InvalidField("lm_head_refine_top_k", "needs keep_bits = 8 (the int8 copy it recomputes the "
                                                       f"top logits from), not {self.keep_bits}")
        if self.lm_head_refine_top_k and not node_matches(LM_HEAD_NODE, self.keep_unquantized):
            raise InvalidField("lm_head_refine_top_k", "needs the lm_head in keep_unquantized (the layer it "
                                                       f"refines), not {list(self.keep_unquantized)}")

    def head_refine_top_k_for(self, precision: str, io_dtype: str, algorithm: str) -> int:
        """lm_head_refine_top_k where the fused graph takes it: an int4 graph (an int8 one reads
        the int8 head already) with float32 activations, quantized with GPTQ; else 0. Rounded
        block by block (``--algorithm rtn``), the int4 head's logits -- which the tokens outside
        the top k keep -- crossed the int4 max-logit bar on the demo model (1.03 against 1.0), so
        such an export keeps the int8 head in one pass."""
        wanted = precision == "int4" and self.keep_bits == 8 and io_dtype == "float32" and algorithm == "gptq"
        return self.lm_head_refine_top_k if wanted else 0

    def embedding_bits_for(self, io_dtype: str) -> int:
        """embedding_bits where the fused graph takes it: float32 activations (the int8 table is
        dequantized to them by GatherBlockQuantized); else 0, a float table."""
        return self.embedding_bits if io_dtype == "float32" else 0

    @property
    def kept_block_size(self) -> int:
        """The block size the kept layers are stored in when keep_bits quantizes them."""
        return self.keep_block_size or self.block_size

    @property
    def optimum_graph_block_size(self) -> int:
        """The block size of the optimum graph's quantized weights."""
        return self.optimum_block_size or self.block_size


@dataclass(frozen=True)
class KvCacheSettings:
    dtype: KvCacheDtype  # the activations' dtype, and the cache's unless bits says otherwise
    # 8: the fused graph keeps the KV cache as int8 codes with static per-channel scales
    # calibrated at export (export/kv_cache_quant.py; onnxruntime's CPU GroupQueryAttention
    # reads them): a quarter of float32's bytes per token of context. 0: the cache has `dtype`.
    # fp32 bundles and the optimum graph always keep a float cache.
    bits: Literal[0, 8] = 0


@dataclass(frozen=True)
class AgreementByPrecision:
    """Minimum greedy agreement with torch fp32 (0..1), per precision."""

    int4: Fraction
    int8: Fraction
    fp16: Fraction
    fp32: Fraction


@dataclass(frozen=True)
class LogitDiffByPrecision:
    """Maximum absolute logit difference from torch fp32, per precision."""

    int4: NonNegativeFloat
    int8: NonNegativeFloat
    fp16: NonNegativeFloat
    fp32: NonNegativeFloat


@dataclass(frozen=True)
class FidelityThresholds:
    """What an export must reach against torch fp32 to be accepted for this target.

    Greedy agreement is the share of generated tokens before the first token that
    differs from torch fp32's greedy output, averaged over the prompts.
    """

    min_greedy_agreement: AgreementByPrecision
    max_logit_diff: LogitDiffByPrecision

    def for_precision(self, precision: Precision) -> tuple[float, float]:
        """``(min_greedy_agreement, max_logit_diff)`` for `precision`."""
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
        return (
            getattr(self.min_greedy_agreement, precision),
            getattr(self.max_logit_diff, precision),
        )


@dataclass(frozen=True)
class DeviceProfile:
    """A hardware target. Every key is required in the TOML file except those with a
    default (session_config; quantization keep_bits, keep_block_size, scale_search, algorithm,
    optimum_block_size, lm_head_refine_top_k, embedding_bits; kv_cache bits)."""

    name: ProfileName
    description: str
    execution_providers: Annotated[tuple[ExecutionProvider, ...], non_empty()]
    # False: an accelerator provider that is unavailable is an error, not a silent
    # (and much slower) run on the CPU.
    allow_cpu_fallback: bool
    precision: Precision  # default weight precision of bundles for this target
    quantization: QuantizationSettings
    kv_cache: KvCacheSettings
    max_context: PositiveInt  # tokens: prompt + generated
    intra_op_threads: NonNegativeInt  # 0: onnxruntime's default (all physical cores)
    memory_budget_bytes: PositiveInt  # weights + KV cache at max_context + buffers
    fidelity: FidelityThresholds
    # onnxruntime session configuration entries (SessionOptions.add_session_config_entry), e.g.
    # {"ep.cuda.fpa_intb_gemm" = "1"}: settings of the session and its kernels that are not
    # provider options. Booleans are written "1"/"0", as onnxruntime reads them.
    session_config: dict[SessionConfigKey, OptionValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = self.provider_names
        if len(set(names)) != len(names):
            raise InvalidField("execution_providers", f"duplicate provider in {list(names)}")
        if CPU_PROVIDER in names and names[-1] != CPU_PROVIDER:
            raise InvalidField(
                "execution_providers",
                f"{CPU_PROVIDER} must come last (providers take nodes in order)",
            )

    @property
    def provider_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.execution_providers)

    @property
    def memory_budget_gib(self) -> float:
        return self.memory_budget_bytes / 2**30

    def ort_providers(self) -> list[tuple[str, dict[str, str]]]:
        """The `providers` argument for ``onnxruntime.InferenceSession``."""
        return [(p.name, p.ort_options()) for p in self.execution_providers]

    def ort_session_config(self) -> dict[str, str]:
        """The session config entries as onnxruntime takes them: strings, booleans as "1"/"0"."""
        return {key: ("1" if value else "0") if isinstance(value, bool) else str(value)
                for key, value in self.session_config.items()}

    def with_session_config(self, entries: dict[str, OptionValue]) -> "DeviceProfile":
        """This profile with `entries` added to its session config (keys have dots, hence a dict)."""
        return dataclasses.replace(self, session_config={**self.session_config, **entries})

    def with_provider_options(self, provider: str, **options: OptionValue) -> "DeviceProfile":
        """This profile with ``options`` added to ``provider``'s, e.g.
        ``with_provider_options("CUDAExecutionProvider", enable_cuda_graph="1")``."""
        if provider not in self.provider_names:
            raise InvalidField("execution_providers", f"profile {self.name} has no {provider}")
        providers = tuple(ExecutionProvider(p.name, {**p.options, **options}) if p.name == provider else p
                          for p in self.execution_providers)
        return dataclasses.replace(self, execution_providers=providers)


# -------------------------------------------------------------------- loading, listing


def _packaged_dir() -> Traversable:
    """The folder of the packaged profiles.

    Falls back to the package's real directory when `importlib.resources` cannot
    handle the namespace package (setuptools' editable finder adds a placeholder
    entry to its ``__path__``).
    """
    try:
        return importlib.resources.files(PROFILE_PACKAGE)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"the packaged device profiles ({PROFILE_PACKAGE}) are not installed"
        ) from exc
    except (NotADirectoryError, TypeError, AttributeError):
        module = importlib.import_module(PROFILE_PACKAGE)
        for entry in getattr(module, "__path__", ()):
            if os.path.isdir(entry):
                return pathlib.Path(entry)
        raise ConfigError(
            f"cannot locate the packaged device profiles ({PROFILE_PACKAGE})"
        ) from None


def _packaged_names() -> list[str]:
    return sorted(
        entry.name[: -len(".toml")]
        for entry in _packaged_dir().iterdir()
        if entry.name.endswith(".toml") and entry.is_file()
    )


def is_profile_path(path_or_name: str | os.PathLike[str]) -> bool:
    """Whether a profile argument names a TOML file (a path separator or .toml), not a packaged profile."""
    if isinstance(path_or_name, os.PathLike):
        return True
    return "/" in path_or_name or os.sep in path_or_name or path_or_name.endswith(".toml")


def profile_text(path_or_name: str | os.PathLike[str]) -> str:
    """The TOML text of a profile: a packaged one by name, or a file by path."""
    if is_profile_path(path_or_name):
        return pathlib.Path(path_or_name).read_text(encoding="utf-8")
    resource = _packaged_dir() / f"{path_or_name}.toml"
    if not resource.is_file():
        raise ConfigError(unknown_profile_message(str(path_or_name)))
    return resource.read_text(encoding="utf-8")


def unknown_profile_message(name: str) -> str:
    """The error for a profile name that is not a packaged one: the packaged names, and the way
    out for a profile file's name (what a bundle exported with `--profile path/to/NAME.toml`
    records, and what `generate`, `fit --bundle` and the daemon then look up)."""
    return (f"unknown device profile {name!r}; packaged profiles: {', '.join(_packaged_names())}. If {name!r} is "
            f"the name in a profile file (a bundle exported with --profile path/to/{name}.toml records only the "
            "name), give that file: --profile FILE (in the daemon's config, [model] profile = FILE)")


def load_profile(path_or_name: str | os.PathLike[str]) -> DeviceProfile:
    """Load a profile: a packaged one by name (``"nvidia-gpu"``), or a TOML file by path.

    A string counts as a path when it contains a path separator or ends in ``.toml``.
    Raises ConfigError, naming the file and the dotted key, when the profile is invalid.
    """
    if is_profile_path(path_or_name):
        return load_toml(DeviceProfile, path_or_name)
    name = str(path_or_name)
    resource = _packaged_dir() / f"{name}.toml"
    if not resource.is_file():
        raise ConfigError(unknown_profile_message(name))
    source = f"{name}.toml"
    profile = load_toml(DeviceProfile, resource, source=source)
    if profile.name != name:
        raise ConfigError(
            f"{source}: name: expected {name!r} (the file's name), got {profile.name!r}"
        )
    return profile


def list_profiles() -> list[DeviceProfile]:
    """Every packaged profile, sorted by name."""
    return [load_profile(name) for name in _packaged_names()]


def profile_summary(profile: DeviceProfile) -> str:
    """One line: name, precision, providers, context and memory budget."""
    providers = " > ".join(profile.provider_names)
    fallback = "" if profile.allow_cpu_fallback else ", no CPU fallback"
    config = "".join(f", {k}={v}" for k, v in profile.ort_session_config().items())
    return (
        f"{profile.name}: {profile.precision}, providers {providers}{fallback}{config}, "
        f"context {profile.max_context} tokens, budget {profile.memory_budget_gib:.1f} GiB"
    )


# ---------------------------------------------------------------------------- detection

DEVICE_TREE_MODEL = pathlib.Path("/proc/device-tree/model")
TEGRA_RELEASE = pathlib.Path("/etc/nv_tegra_release")
NVIDIA_GPUS_DIR = pathlib.Path("/proc/driver/nvidia/gpus")
MEMINFO = pathlib.Path("/proc/meminfo")

_ARCH_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}
_AGX_ORIN = re.compile(r"agx[\s_-]*orin", re.IGNORECASE)
_ORIN_NANO_NX = re.compile(r"orin[\s_-]*(nano|nx)", re.IGNORECASE)
_JETSON_HINT = ("install NVIDIA's onnxruntime-gpu wheel for this JetPack release in place of onnxruntime "
                "(PyPI's onnxruntime-gpu is not built for Jetson; docs/deployment.md)")
_CPU_HINT = f"pip install '{cpu_onnxruntime_requirement()}' (the package's cpu extra)"
_INSTALL_HINTS = {
    "cpu-x86_64": _CPU_HINT,
    "cpu-arm64": _CPU_HINT,
    "nvidia-gpu": "pip install onnxruntime-gpu, not onnxruntime (the package's gpu extra)",
    "jetson-orin-agx": _JETSON_HINT,
    "jetson-orin-nano": _JETSON_HINT,
}


def install_hint(profile: DeviceProfile) -> str:
    """How to get the onnxruntime that has `profile`'s providers (a profile file of another
    name: by its providers)."""
    if profile.name in _INSTALL_HINTS:
        return _INSTALL_HINTS[profile.name]
    if any(name != CPU_PROVIDER for name in profile.provider_names):
        return "install onnxruntime-gpu (on a Jetson, NVIDIA's wheel for its JetPack release)"
    return "install onnxruntime"


@dataclass(frozen=True)
class MachineFacts:
    """What `detect_profile` decides on. Tests build these directly."""

    arch: str  # platform.machine(), as reported
    device_model: str | None = (
        None  # /proc/device-tree/model, e.g. "NVIDIA Jetson AGX Orin Developer Kit"
    )
    tegra_release: str | None = None  # first line of /etc/nv_tegra_release (Jetson L4T)
    nvidia_gpus: tuple[str, ...] = ()  # names of discrete NVIDIA GPUs
    onnxruntime_version: str | None = None  # None: onnxruntime cannot be imported
    ort_providers: tuple[str, ...] = ()  # onnxruntime.get_available_providers()
    onnxruntime_error: str | None = None  # why the import failed, when it did
    memory_bytes: int | None = None  # MemTotal of /proc/meminfo (on a Jetson, the CPU's and the GPU's)
    python: tuple[int, ...] = tuple(sys.version_info[:2])  # the Python that runs the daemon (its onnxruntime wheels)

    @property
    def cpu_arch(self) -> str:
        """``"x86_64"``, ``"arm64"``, or the reported name in lower case."""
        return _ARCH_ALIASES.get(self.arch.lower(), self.arch.lower())

    @property
    def is_jetson(self) -> bool:
        return self.tegra_release is not None or "jetson" in (self.device_model or "").lower()


def _read_text(path: pathlib.Path) -> str | None:
    """The file's text with NULs and surrounding blanks stripped; None if absent or empty."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None
    text = text.replace("\x00", "").strip()
    return text or None


def _gpus_from_proc(gpus_dir: pathlib.Path) -> tuple[str, ...]:
    """GPU names from the NVIDIA driver's /proc entries ("Model:" lines)."""
    try:
        entries = sorted(gpus_dir.iterdir())
    except OSError:
        return ()
    names = []
    for entry in entries:
        model = None
        info = _read_text(entry / "information") or ""
        for line in info.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model" and value.strip():
                model = value.strip()
                break
        names.append(model or f"NVIDIA GPU {entry.name}")
    return tuple(names)


def _gpus_from_nvidia_smi(command: str, timeout_s: float) -> tuple[str, ...]:
    """GPU names from ``nvidia-smi -L``; () when it is missing, fails or hangs."""
    try:
        result = subprocess.run(
            [command, "-L"], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ()
    if result.returncode != 0:
        return ()
    names = []
    for line in result.stdout.splitlines():
        match = re.match(r"GPU \d+:\s*(.+?)(?:\s*\(UUID:.*\))?\s*$", line.strip())
        if match:
            names.append(match.group(1))
    return tuple(names)


def read_meminfo(path: pathlib.Path = MEMINFO) -> dict[str, int]:
    """The fields of /proc/meminfo given in kB (MemTotal, MemAvailable, SwapFree, ...), in
    bytes; empty where the file cannot be read (not Linux)."""
    return {m[1]: int(m[2]) * 1024
            for m in re.finditer(r"^(\w+):\s*(\d+)\s*kB", _read_text(path) or "", re.MULTILINE)}


def _probe_onnxruntime() -> tuple[str | None, tuple[str, ...], str | None]:
    """(version, available providers, import error) -- onnxruntime is imported lazily."""
    try:
        ort = importlib.import_module("onnxruntime")
    except ModuleNotFoundError:
        return None, (), None
    except (ImportError, OSError) as exc:  # e.g. a wheel built for other CUDA libraries
        return None, (), f"{type(exc).__name__}: {exc}"
    return str(getattr(ort, "__version__", "?")), tuple(ort.get_available_providers()), None


def gather_machine_facts(
    *,
    machine: str | None = None,
    device_tree_model: pathlib.Path = DEVICE_TREE_MODEL,
    tegra_release: pathlib.Path = TEGRA_RELEASE,
    nvidia_gpus_dir: pathlib.Path = NVIDIA_GPUS_DIR,
    nvidia_smi: str | None = "nvidia-smi",
    nvidia_smi_timeout_s: float = 5.0,
    probe_onnxruntime: bool = True,
    meminfo: pathlib.Path = MEMINFO,
) -> MachineFacts:
    """Collect the facts about this machine that profile detection needs.

    Every source is optional: a missing file, a missing or hanging ``nvidia-smi``
    (pass ``nvidia_smi=None`` to skip it) and a missing onnxruntime are tolerated.
    ``nvidia-smi`` is only asked when the driver's /proc entries list no GPU.
    """
    release = _read_text(tegra_release)
    gpus = _gpus_from_proc(nvidia_gpus_dir)
    if not gpus and nvidia_smi is not None:
        gpus = _gpus_from_nvidia_smi(nvidia_smi, nvidia_smi_timeout_s)
    version, providers, error = _probe_onnxruntime() if probe_onnxruntime else (None, (), None)
    return MachineFacts(
        arch=machine if machine is not None else platform.machine(),
        device_model=_read_text(device_tree_model),
        tegra_release=release.splitlines()[0] if release else None,
        nvidia_gpus=gpus,
        onnxruntime_version=version,
        ort_providers=providers,
        onnxruntime_error=error,
        memory_bytes=read_meminfo(meminfo).get("MemTotal"),
    )


def _choose(facts: MachineFacts) -> tuple[str, str]:
    """(profile name, why) from the hardware facts alone."""
    model = facts.device_model or ""
    if facts.is_jetson:
        if _AGX_ORIN.search(model):
            return "jetson-orin-agx", f"Jetson AGX Orin (device-tree model {model!r})"
        if _ORIN_NANO_NX.search(model):
            return "jetson-orin-nano", f"Jetson Orin Nano/NX (device-tree model {model!r})"
        seen = f"device-tree model {model!r}" if model else f"L4T release {facts.tegra_release!r}"
        return (
            "jetson-orin-nano",
            f"Jetson board not recognised as an Orin AGX/Nano/NX ({seen}); "
            "using the most conservative Jetson profile",
        )
    cpu = facts.cpu_arch
    if cpu == "x86_64":
        if facts.nvidia_gpus:
            return "nvidia-gpu", f"NVIDIA GPU on x86_64: {', '.join(facts.nvidia_gpus)}"
        return "cpu-x86_64", "x86_64 CPU, no NVIDIA GPU found"
    if cpu == "arm64":
        board = f" ({model})" if model else ""
        why = f"arm64 CPU{board}, not a Jetson"
        if facts.nvidia_gpus:
            why += (
                f"; NVIDIA GPU {', '.join(facts.nvidia_gpus)} ignored: "
                "the nvidia-gpu profile targets x86_64 hosts"
            )
        return "cpu-arm64", why
    known = ", ".join(_packaged_names())
    raise ConfigError(
        f"no device profile fits CPU architecture {facts.arch!r}; pass one of {known} explicitly"
    )


def _runtime_note(profile: DeviceProfile, facts: MachineFacts) -> str:
    """What is wrong with the installed onnxruntime for `profile` ("" when nothing)."""
    hint = install_hint(profile)
    if facts.onnxruntime_version is None:
        problem = f" ({facts.onnxruntime_error})" if facts.onnxruntime_error else ""
        return f"onnxruntime is not installed{problem}: {hint}"
    missing = [name for name in profile.provider_names if name not in facts.ort_providers]
    if not missing:
        return ""
    fallback = "" if profile.allow_cpu_fallback else "; this profile does not allow CPU fallback"
    return (
        f"onnxruntime {facts.onnxruntime_version} lacks {', '.join(missing)} "
        f"(available: {', '.join(facts.ort_providers) or 'none'}): {hint}{fallback}"
    )


def _kv_cache_note(profile: DeviceProfile, facts: MachineFacts) -> str:
    """What to do when the installed onnxruntime cannot load the int8 KV cache that `profile`'s
    bundles keep ("" when it can, or when onnxruntime is missing: `_runtime_note` says that): the
    engine would refuse every default export for the profile, after the export."""
    if profile.kv_cache.bits != 8 or facts.onnxruntime_version is None:
        return ""
    if onnxruntime_version_tuple(facts.onnxruntime_version) >= INT8_KV_ONNXRUNTIME:
        return ""
    needed = ".".join(map(str, INT8_KV_ONNXRUNTIME))
    python_note = int8_kv_python_note(facts.python)
    remedy = (f"or Python {'.'.join(map(str, INT8_KV_PYTHON))}+ with onnxruntime>={needed}" if python_note
              else f"or pip install 'onnxruntime>={needed}'")
    return (f"onnxruntime {facts.onnxruntime_version} cannot load the int8 KV cache of the {profile.name} "
            f"profile's bundles (kv_cache.bits = 8; it needs onnxruntime {needed}): export for this machine "
            f"with --kv-cache-bits 0 (a float KV cache), {remedy}"
            f"{f' ({python_note})' if python_note else ''}")


def _memory_note(profile: DeviceProfile, facts: MachineFacts) -> str:
    """What to do when `profile`'s memory budget is more than this machine has ("" when it is not):
    the budget would pass bundles the machine cannot hold (jetson-orin-agx is the 64 GB module's,
    and a 32 GB AGX Orin has the same device-tree model)."""
    if facts.memory_bytes is None or profile.memory_budget_bytes <= facts.memory_bytes:
        return ""
    return (f"this machine has {facts.memory_bytes / 2**30:.1f} GiB of memory, less than the {profile.name} "
            f"profile's memory budget of {profile.memory_budget_gib:.1f} GiB: the budget would pass bundles that "
            "do not fit here; run with a copy of the profile whose memory_budget_bytes leaves this machine's OS "
            "and other services their share (--profile FILE; in the daemon's config, [model] profile = FILE)")


def detect_profile(facts: MachineFacts | None = None) -> tuple[DeviceProfile, str]:
    """The packaged profile that fits this machine (or `facts`), and why.

    Rules: Jetson AGX Orin -> jetson-orin-agx; Jetson Orin Nano/NX (and unrecognised
    Jetsons) -> jetson-orin-nano; an NVIDIA GPU on x86_64 -> nvidia-gpu; otherwise by
    CPU architecture (cpu-x86_64, cpu-arm64). The reason also says when onnxruntime is
    missing or lacks a provider the profile lists, and when the profile's memory budget is
    more than the machine's memory. An unknown CPU architecture is a
    ConfigError.
    """
    if facts is None:
        facts = gather_machine_facts()
    name, why = _choose(facts)
    profile = load_profile(name)
    notes = [note for note in (_runtime_note(profile, facts), _kv_cache_note(profile, facts),
                                _memory_note(profile, facts)) if note]
    return profile, "; ".join([why, *notes])
