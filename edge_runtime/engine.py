"""The public Python API: load a bundle once, then generate for requests.

    engine = Engine.from_bundle("bundles/demo-int4")
    for item in engine.generate(GenerationRequest(mode="complete", prompt="def fib(n):")):
        ...  # Chunk(text, token_ids) as tokens are made, then one GenerationResult

Data flow: request -> prompt ids (prompts.py) -> context check -> KV cache
(for prompt + max_tokens; the fused graph's keeps the previous request's rows of
the prompt's common start, the prompt cache) -> token loop (generator.py,
sampling.py) -> detokenizer -> stop strings -> chunks -> result.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import mmap
import os
import threading
import time
from collections.abc import AsyncGenerator, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import generator
from .bundle import (FLAVOUR_GQA_SHARED_KV, FLAVOUR_OPTIMUM_KV_CONCAT, OTHER_CHAT_TEMPLATE, Bundle, Family,
                     external_data_extents, load_bundle, manifest_profile_name, safe_relative_path)
from .detokenizer import IncrementalDetokenizer
from .errors import BadRequest, BundleError, ConfigError, ContextLengthExceeded, DeadlineExceeded, UnsupportedMode
from .fidelity_record import FidelityRecord
from .gqa_decoder import SharedKVDecoder, check_kv_dtype_for_device, graph_max_length
from .memory_fit import PREFILL_CHUNK, MemoryPlan, bundle_kv_dtype, check_bundle_fits, engine_context_limit
from .native_paths import native_path
from .onnx_decoder import KVConcatDecoder
from .profiles import DeviceProfile, install_hint, load_profile
from .prompt_lookup import DRAFT_MAX, PromptLookup
from .prompts import PromptPlan, build_prompt, user_text_chars
from .providers import (
    INT8_KV_ONNXRUNTIME,
    TENSORRT_CACHE_REMEDY,
    ProviderChoice,
    choose_providers,
    import_onnxruntime,
    int8_kv_python_note,
    onnxruntime_version_tuple,
    tensorrt_cache_problem,
    tensorrt_engine_cache_per_bundle,
)
from .sampling import Sampler
from .stopping import StopStringMatcher
from .tokenizer import CodeLlamaTokenizer
from .types import (
    PROMPT_CACHE_SCOPES,
    Chunk,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    Timings,
    TokenCount,
    Usage,
    is_int,
    is_number,
)

log = logging.getLogger(__name__)
STREAM_WAIT_WARNING_S = 30.0  # a request waiting for the engine says so this often
# warm_up's tokens: onnxruntime records a CUDA graph on the second run of a decode step, so three
# decode steps (the last token is sampled, not fed) record it and replay it once
WARM_UP_TOKENS = 4

# One decoder class per graph flavour the bundle format knows.
DECODERS = {FLAVOUR_OPTIMUM_KV_CONCAT: KVConcatDecoder, FLAVOUR_GQA_SHARED_KV: SharedKVDecoder}


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    profile: str
    precision: str
    bundle_sha256: str  # SHA-256 of bundle.json, which pins every other file
    context_limit: int
    supports_infill: bool
    chat_format: str
    provider: str  # the first execution provider actually in use
    facts: Family  # the Code Llama member, as recorded at export (bundle.json `family`)
    memory: MemoryPlan | None = None  # weights + KV cache + overhead against the profile's budget
    fidelity_record: FidelityRecord | None = None  # bundle.json's fidelity: measured? passed?

    @property
    def fidelity(self) -> dict | None:
        """The bundle's fidelity as the daemon's status reports it (None: not known)."""
        return self.fidelity_record.as_status() if self.fidelity_record is not None else None

    @property
    def family(self) -> dict:
        """The family facts as the daemon's status reports them."""
        f = self.facts
        facts = {"size_class": f.size_class, "variant": f.variant, "parameter_count": f.parameter_count,
                 "num_heads": f.num_heads, "num_kv_heads": f.num_kv_heads, "attention": f.attention,
                 "supports_infill": self.supports_infill, "chat_format": self.chat_format}
        if not self.supports_infill and f.infill_note:
            facts["infill_note"] = f.infill_note
        if self.memory is not None:
            facts["memory"] = {k: v for k, v in self.memory.as_dict().items()
                               if k.endswith("_bytes") or k in ("context", "kv_dtype")}
        return facts


def bundle_tokenizer(bundle: Bundle) -> CodeLlamaTokenizer:
    """The bundle's tokenizer; BundleError naming its file when it is not one (its hash matched
    bundle.json, so the manifest was edited or written for another file), or lacks the
    infilling tokens bundle.json says it has."""
    name = bundle.tokenizer_path.relative_to(bundle.root)
    try:
        tokenizer = CodeLlamaTokenizer.from_file(bundle.tokenizer_path)
    except Exception as exc:  # the tokenizers package raises a bare Exception for a file it cannot parse
        raise BundleError(f"{name} (bundle.json's tokenizer.file) in bundle {bundle.root} is not a tokenizer this "
                          f"runtime reads ({exc}); export the bundle again") from None
    if bundle.supports_infill and not tokenizer.supports_infill:
        raise BundleError(f"{name} in bundle {bundle.root} has no infilling tokens, but bundle.json says the "
                          "bundle infills (tokenizer.supports_infill); export the bundle again")
    return tokenizer


def make_session(ort, bundle: Bundle, profile: DeviceProfile, *,
                 copy_weights: bool = False) -> tuple[object, ProviderChoice]:
    """The bundle's onnxruntime session for `profile`. `copy_weights`: the session holds its own
    copy of the weights (`weights_copied_at_load`) instead of mapping the bundle's external-data
    file, which onnxruntime does by default."""
    available = list(ort.get_available_providers())
    requested = tensorrt_engine_cache_per_bundle(profile.ort_providers(), bundle.manifest_sha256)
    trt_problem = tensorrt_cache_problem(requested) if "TensorrtExecutionProvider" in available else None
    if trt_problem:  # its provider would throw, and onnxruntime would retry with a bare CUDA provider
        log.warning("%s: running without TensorrtExecutionProvider; %s", trt_problem, TENSORRT_CACHE_REMEDY)
        available.remove("TensorrtExecutionProvider")
    choice = choose_providers(requested, available, allow_cpu_fallback=profile.allow_cpu_fallback,
                              profile_name=profile.name,
                              problem=trt_problem and f"profile {profile.name}: {trt_problem}",
                              remedy=TENSORRT_CACHE_REMEDY if trt_problem else install_hint(profile))
    log.info("%s", choice.note)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile.intra_op_threads > 0:
        options.intra_op_num_threads = profile.intra_op_threads
    options.log_severity_level = 3
    for key, value in profile.ort_session_config().items():
        options.add_session_config_entry(key, value)
    if bundle.graph_flavour == FLAVOUR_GQA_SHARED_KV:  # before the weights go to the GPU
        check_kv_dtype_for_device(bundle_kv_dtype(bundle, profile.kv_cache.dtype), choice.device)
    if uses_cuda_graph(choice) and bundle.graph_flavour != FLAVOUR_GQA_SHARED_KV:
        log.warning("profile %s enables CUDA graphs (enable_cuda_graph), which need the fused graph's fixed KV "
                    "buffers; %s holds the %s graph, so its steps run without them (export it with --graph fused "
                    "for the faster decode)", profile.name, bundle.root, bundle.graph_flavour)
        choice = without_cuda_graph(choice)
    try:
        with weights_copied_at_load(options, bundle) if copy_weights else contextlib.nullcontext():
            session, choice = open_session(ort, bundle, options, choice)
            # onnxruntime's Python session, when a provider fails in a run, makes itself again on the
            # next providers (CUDA, then the CPU): the silent fallback a GPU profile forbids, and
            # from `options`, whose buffers copy_weights releases on exit. A failed run fails.
            session.disable_fallback()
    except BundleError:  # open_session's own, complete
        raise
    except Exception as exc:
        old_ort = onnxruntime_version_tuple(ort.__version__) < INT8_KV_ONNXRUNTIME
        if bundle_kv_dtype(bundle, profile.kv_cache.dtype) == "int8" and old_ort:
            python_note = int8_kv_python_note()
            raise BundleError(f"{bundle.root} keeps an int8 KV cache, which onnxruntime {ort.__version__} could not "
                              f"load ({exc}); it needs onnxruntime {'.'.join(map(str, INT8_KV_ONNXRUNTIME))} or "
                              "newer (the version tested), or export the bundle with --kv-cache-bits 0 (a float cache)"
                              f"{f' ({python_note})' if python_note else ''}") from exc
        if choice.device == "cuda" and onnxruntime_version_tuple(ort.__version__) < GPU_ONNXRUNTIME:
            # NVIDIA's Jetson wheels are installed outside the gpu extra: nothing held them to its floor
            raise BundleError(f"onnxruntime {ort.__version__} could not create a session for {bundle.graph_path.name} "
                              f"of bundle {bundle.root} ({exc}); the GPU profiles need onnxruntime-gpu "
                              f"{'.'.join(map(str, GPU_ONNXRUNTIME))} or newer (the package's gpu extra; on a Jetson, "
                              "NVIDIA's wheel of such a version for its JetPack release, docs/deployment.md)") from exc
        # hashes and the external-data scan passed: a graph edited with its hashes, or one this
        # onnxruntime or device cannot run (an operator it lacks, out of device memory)
        raise BundleError(f"onnxruntime {ort.__version__} could not create a session for "
                          f"{bundle.graph_path.name} of bundle {bundle.root}: {exc}") from exc
    return session, check_session_providers(session, choice, profile)


GPU_ONNXRUNTIME = (1, 20)  # the oldest onnxruntime-gpu the GPU profiles take: pyproject.toml's gpu extra


@contextlib.contextmanager
def weights_copied_at_load(options, bundle: Bundle) -> Iterator[None]:
    """While open: the session options hand onnxruntime the bundle's external-data files as
    buffers (`add_external_initializers_from_files_in_memory`), which it copies into the session
    as it is created, so the session keeps no mapping of the files: one rewritten or cut short
    under the loaded engine changes nothing (mapped, a cut-short file is SIGBUS at the next step).
    The buffers are read-only maps of the files, released on exit: `options` must create no
    session after that (onnxruntime keeps the pointers: a later session would read freed memory)."""
    names, buffers = [], []
    with contextlib.ExitStack() as stack:
        for location in external_data_extents(bundle.graph_path):
            path = safe_relative_path(bundle.root, location, what="external data file")
            with open(path, "rb") as f:
                size = f.seek(0, 2)
                buffer = stack.enter_context(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)) if size else b""
            names.append(location)
            buffers.append(buffer)
        if names:
            options.add_external_initializers_from_files_in_memory(names, buffers, [len(b) for b in buffers])
        yield


def open_session(ort, bundle: Bundle, options, choice: ProviderChoice) -> tuple[object, ProviderChoice]:
    """The bundle's session with `choice`'s providers; where onnxruntime cannot record CUDA graphs
    for it (it records a step only where every node runs on CUDA, and says so at load), the
    session without them, with a warning."""
    graph = native_path(bundle.graph_path)
    if graph is None:
        raise BundleError(f"bundle {bundle.root}: its path is not UTF-8 text ({os.fsencode(bundle.graph_path)!r}), "
                          "and onnxruntime takes a model's path only as UTF-8: rename the folder")
    try:
        return ort.InferenceSession(graph, sess_options=options, providers=choice.providers), choice
    except Exception as exc:
        said = str(exc).lower()
        # onnxruntime's words for it: "...cannot use the graph capture feature..." (1.2x-1.32),
        # "cuda graph" in older releases
        if not (uses_cuda_graph(choice) and ("graph capture" in said or "cuda graph" in said)):
            raise
        log.warning("onnxruntime cannot record CUDA graphs for %s (%s); its steps run without them", bundle.root, exc)
    choice = without_cuda_graph(choice)
    return ort.InferenceSession(graph, sess_options=options, providers=choice.providers), choice


def uses_cuda_graph(choice: ProviderChoice) -> bool:
    """Whether the CUDA provider is chosen with enable_cuda_graph on (decoder: gqa_decoder.py)."""
    return any(name == "CUDAExecutionProvider" and str(opts.get("enable_cuda_graph", "0")).lower() in ("1", "true")
               for name, opts in choice.providers)


def without_cuda_graph(choice: ProviderChoice) -> ProviderChoice:
    """`choice` with the CUDA provider's enable_cuda_graph off."""
    providers = [(name, {**opts, "enable_cuda_graph": "0"} if name == "CUDAExecutionProvider" else opts)
                 for name, opts in choice.providers]
    return dataclasses.replace(choice, providers=providers)


def check_session_providers(session, choice: ProviderChoice, profile: DeviceProfile) -> ProviderChoice:
    """The providers the session really started, chosen again by the profile's rule
    (`choose_providers`). onnxruntime-gpu lists the CUDA provider as available even when
    the CUDA or cuBLAS libraries it needs are missing; the session then logs an error and
    runs without it: on the CPU alone, the silent fallback the profile forbids, or on CUDA
    where a Jetson profile's TensorRT could not start."""
    got = list(session.get_providers())
    missing = [name for name, _ in choice.providers if name not in got]
    if not missing:
        return choice
    problem = (f"onnxruntime could not start {', '.join(missing)} (the session has only {', '.join(got)}): the CUDA "
               "libraries it loads (cudart, cuBLAS, cuDNN of the CUDA version this onnxruntime-gpu was built for) are "
               "missing or of another version, or the GPU's device nodes are out of reach (CUDA then finds no GPU: "
               "under systemd, a unit without the GPU drop-in /etc/systemd/system/edge-runtime.service.d/gpu.conf); "
               "onnxruntime's log above says which")
    started = choose_providers(choice.providers, got, allow_cpu_fallback=profile.allow_cpu_fallback,
                               profile_name=profile.name, problem=problem,
                               remedy="install the CUDA libraries this onnxruntime-gpu was built for, or the drop-in "
                                      "with `edge-runtime install-service --profile <the GPU profile>`")
    log.warning("%s could not start; %s", ", ".join(missing), started.note)
    return dataclasses.replace(started, note=f"{started.note} ({', '.join(missing)} could not start)")


OTHER_TEMPLATE_WARNING = ("the model's chat template is not Code Llama's [INST] format (nor 70B Instruct's "
                          "Source:/<step>): the prompt is built as [INST], which this model may not have been tuned "
                          "on; its answer may not follow the instructions")


def chat_warning(variant: str) -> str:
    name = "Code Llama - Python" if variant == "python" else "a Code Llama base model"
    return (f"chat on {name} (variant {variant!r}), which is not instruction-tuned: the prompt is built in the "
            "chat format, but the answer may not follow the instructions; use an Instruct bundle for chat")


def _interrupted(request: GenerationRequest, cancel: threading.Event | None) -> bool:
    """Whether a request's prompt should stop between two chunks: cancelled, or past its deadline."""
    return ((cancel is not None and cancel.is_set())
            or (request.deadline is not None and time.monotonic() > request.deadline))


class _EitherEvent(threading.Event):
    """An event that also counts as set while `other` (the caller's cancel event) is set."""

    def __init__(self, other: threading.Event | None) -> None:
        super().__init__()
        self._other = other

    def is_set(self) -> bool:
        return super().is_set() or (self._other is not None and self._other.is_set())


class Engine:
    """A loaded bundle: session, tokenizer and decoder, shared by requests run one at a time."""

    def __init__(self, bundle: Bundle, profile: DeviceProfile, session, decoder, tokenizer: CodeLlamaTokenizer,
                 choice: ProviderChoice, memory: MemoryPlan | None = None, prompt_cache: str = "client",
                 prompt_lookup: bool = True) -> None:
        if prompt_cache not in PROMPT_CACHE_SCOPES:
            raise ConfigError(f"prompt_cache must be one of {', '.join(PROMPT_CACHE_SCOPES)}, not {prompt_cache!r}",
                              key="model.prompt_cache")
        self.prompt_cache = prompt_cache
        # requests draft tokens from their context and verify them in one run (prompt_lookup.py),
        # where the decoder can (the fused graph's logits_start input, on the CPU)
        self.prompt_lookup = prompt_lookup and getattr(decoder, "verify_rows_max", 0) > 1
        self._cache_owner: str | None = None  # the scope key of the request whose ids the cache holds
        self.bundle = bundle
        self.profile = profile
        self.session = session
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.context_limit = engine_context_limit(bundle, profile)
        self.info = ModelInfo(model_name=bundle.model_name, profile=profile.name, precision=bundle.precision,
                              bundle_sha256=bundle.manifest_sha256, context_limit=self.context_limit,
                              supports_infill=bundle.supports_infill, chat_format=bundle.chat_format,
                              provider=choice.providers[0][0], facts=bundle.family, memory=memory,
                              fidelity_record=FidelityRecord.from_manifest(bundle.manifest))
        self._lock = threading.Lock()  # one request at a time (one session, one KV cache)
        self._closed = False  # close(): the session and the KV buffers are released

    @classmethod
    def from_bundle(cls, path: str | Path, profile: str | Path | DeviceProfile | None = None, *,
                    check_memory: bool = True, allow_cpu_fallback: bool | None = None,
                    pinned_sha256: str | None = None, prompt_cache: str = "client",
                    prompt_lookup: bool = True, copy_weights: bool = False) -> "Engine":
        """Verify every file of the bundle, check that it fits the profile's memory budget
        at the context limit (MemoryBudgetExceeded with the numbers otherwise; see
        memory_fit.py), then create the onnxruntime session with the profile's providers
        (the bundle's own profile when none is given). `allow_cpu_fallback` overrides the
        profile's: whether a GPU profile may run on the CPU provider when its GPU one is missing.
        `pinned_sha256`: the SHA-256 the bundle's bundle.json must have. `prompt_cache`: whose
        previous request's prompt a request may reuse the keys and values of, "client" (the
        same `client_id`'s), "shared" or "off" (PROMPT_CACHE_SCOPES; the fused graph only).
        `copy_weights`: the session copies the weights into its own memory at load instead of
        mapping the bundle's weights file (`weights_copied_at_load`)."""
        ort = import_onnxruntime()
        if not isinstance(profile, DeviceProfile):  # before the (slow) hashing: a wrong name stops at once
            profile = load_profile(profile or manifest_profile_name(path))
        bundle = load_bundle(path, pinned_sha256=pinned_sha256)
        if allow_cpu_fallback is not None:
            profile = dataclasses.replace(profile, allow_cpu_fallback=allow_cpu_fallback)
        max_length = engine_context_limit(bundle, profile)
        memory = check_bundle_fits(bundle, profile, max_length) if check_memory else None
        if memory is not None:
            log.info("memory: %s", memory.describe())
        if bundle.int8_kernel_rows is not None and 2 * bundle.int8_kernel_rows >= PREFILL_CHUNK:
            # chunk_bounds could not keep a long prompt's later chunks longer than the int8 kernel's share
            raise BundleError(f"{bundle.root}: bundle.json's kv_cache.int8_kernel_rows_after_cache "
                              f"({bundle.int8_kernel_rows}) is not below half the prefill chunk of {PREFILL_CHUNK} "
                              "tokens: a long prompt's last chunk would run the int8 kernel; re-export the bundle")
        tokenizer = bundle_tokenizer(bundle)  # before the (slow) session: a broken file stops at once
        fidelity = FidelityRecord.from_manifest(bundle.manifest)
        if not fidelity.trusted:  # it serves, but whoever runs it is told
            log.warning("%s: %s", bundle.root, fidelity.describe())
        session, choice = make_session(ort, bundle, profile, copy_weights=copy_weights)
        if copy_weights:
            log.info("weights: copied into the daemon's memory at load (copy_weights); the bundle's files are not "
                     "mapped")
        # the fused graph prefills long prompts in chunks: bounded attention scratch (memory_fit.py counts it)
        extra = ({"prefill_chunk": PREFILL_CHUNK, "cuda_graph": uses_cuda_graph(choice)}
                 if bundle.graph_flavour == FLAVOUR_GQA_SHARED_KV else {})
        if extra and bundle.int8_kernel_rows is not None:
            extra["int8_kernel_rows"] = bundle.int8_kernel_rows
        if extra.get("cuda_graph"):
            log.info("CUDA graphs: each decode step replays one recording (the profile's enable_cuda_graph)")
        graph_limit = graph_max_length(session) if bundle.graph_flavour == FLAVOUR_GQA_SHARED_KV else None
        if graph_limit is not None and max_length > graph_limit:
            raise BundleError(f"{bundle.root}: bundle.json's context_limit ({bundle.context_limit}) is more than "
                              f"{bundle.graph_path.name}'s rotary tables cover ({graph_limit} positions): the context "
                              "is fixed at export (was bundle.json edited?); export the bundle again with "
                              f"--max-context {max_length}")
        decoder = DECODERS[bundle.graph_flavour](ort, session, bundle.architecture, device=choice.device,
                                                 device_id=choice.device_id, max_length=max_length, **extra)
        return cls(bundle, profile, session, decoder, tokenizer, choice, memory, prompt_cache, prompt_lookup)

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Release the onnxruntime session and the KV buffers now, not when the engine is
        garbage-collected (a notebook's output history, a stream left open or a traceback may
        keep it alive long after the last name for it is gone). With a stream of it open,
        RuntimeError (read the stream to its end or close it first). Closing twice is a no-op;
        a request after it raises RuntimeError. ``with Engine.from_bundle(...) as engine:``
        closes on leaving."""
        if self._closed:
            return
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("a stream of this engine is open: read it to its end or close() it before closing "
                               "the engine")
        try:
            self._closed = True
            self.session = self.decoder = None  # the decoder holds the KV buffers and the session's binding
            self._cache_owner = None
        finally:
            self._lock.release()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the engine of {self.bundle.root} is closed")

    # -- request -> prompt ------------------------------------------------------------------
    def plan(self, request: GenerationRequest) -> PromptPlan:
        """Prompt ids and stop tokens for a request, after every check that needs no model run."""
        plan = self._prompt_plan(request)
        needed = len(plan.ids) + request.max_tokens
        left = self.context_limit - len(plan.ids)
        if needed > self.context_limit and request.max_tokens_is_default and left >= 1:
            # a default the client never asked for is not a reason to refuse the request
            return dataclasses.replace(plan, max_new_tokens=left, warnings=(
                *plan.warnings, f"max_tokens lowered from the default {request.max_tokens} to {left}: the prompt "
                f"has {len(plan.ids)} tokens of the context limit of {self.context_limit}"))
        if needed > self.context_limit and request.max_tokens_is_default:  # left < 1: the prompt's own fault
            raise ContextLengthExceeded(
                f"the prompt has {len(plan.ids)} tokens, which leaves nothing to generate within the context limit "
                f"of {self.context_limit}", prompt_tokens=len(plan.ids), context_limit=self.context_limit)
        if needed > self.context_limit:
            raise ContextLengthExceeded(
                f"the prompt has {len(plan.ids)} tokens and max_tokens is {request.max_tokens}: "
                f"{needed} tokens exceed the context limit of {self.context_limit}", prompt_tokens=len(plan.ids),
                max_tokens=request.max_tokens, context_limit=self.context_limit)
        return dataclasses.replace(plan, max_new_tokens=request.max_tokens)

    def count_tokens(self, request: GenerationRequest) -> TokenCount:
        """How many tokens the request's prompt has and what `max_tokens` it would run with, without
        generating or waiting for a running stream: the prompt is built as `generate` builds it, with
        its checks (BadRequest, UnsafePrompt, UnsupportedMode raise as there), but one that does not
        fit is counted, not refused (`TokenCount.fits` says whether it would be). Only a text too long
        to be worth tokenizing (more characters than the context holds at the densest) raises
        ContextLengthExceeded, as `generate` does."""
        self._check_open()
        ids = len(self._prompt_plan(request).ids)
        left = self.context_limit - ids
        max_tokens = max(0, min(request.max_tokens, left)) if request.max_tokens_is_default else request.max_tokens
        return TokenCount(prompt_tokens=ids, max_tokens=max_tokens, context_limit=self.context_limit)

    def _prompt_plan(self, request: GenerationRequest) -> PromptPlan:
        """The prompt of a request after every check but the context's (plan's)."""
        if not is_int(request.max_tokens):
            raise BadRequest(f"max_tokens must be an integer, got {type(request.max_tokens).__name__}")
        if request.max_tokens < 1:
            raise BadRequest(f"max_tokens must be at least 1 (got {request.max_tokens})")
        if request.deadline is not None and not is_number(request.deadline):  # compared after the first token
            raise BadRequest(f"deadline must be a time.monotonic() value or None, got {type(request.deadline).__name__}")
        fam = self.bundle.family
        if request.mode == "infill" and not self.bundle.supports_infill:
            why = fam.infill_note or "the tokenizer lacks the infilling tokens"
            raise UnsupportedMode(f"infill is not available on {self.bundle.model_name}: {why} "
                                  "(Code Llama 7B and 13B base and Instruct support infilling)")
        self._check_text_length(request)
        plan = build_prompt(request, self.tokenizer, chat_format=self.bundle.chat_format, stop_ids=self.bundle.stop_ids)
        if request.mode == "chat" and fam.variant in ("base", "python"):
            plan = dataclasses.replace(plan, warnings=(*plan.warnings, chat_warning(fam.variant)))
        if request.mode == "chat" and fam.chat_format_source == OTHER_CHAT_TEMPLATE:
            plan = dataclasses.replace(plan, warnings=(*plan.warnings, OTHER_TEMPLATE_WARNING))
        return plan

    def _check_text_length(self, request: GenerationRequest) -> None:
        """ContextLengthExceeded for a text too long to fit, from its length alone: megabytes piped in by
        mistake are refused at once, not after seconds of tokenizing and a GiB of token ids."""
        chars = user_text_chars(request)
        fewest = 1 + chars // self.tokenizer.max_piece_chars  # bos + the text at its densest
        if fewest >= self.context_limit:  # not even one token left to generate (plan counts the rest exactly)
            raise ContextLengthExceeded(
                f"the prompt's text has {chars} characters, at least {fewest} tokens (no token covers more than "
                f"{self.tokenizer.max_piece_chars} characters): it leaves nothing to generate within the "
                f"context limit of {self.context_limit}", context_limit=self.context_limit,
                max_tokens=None if request.max_tokens_is_default else request.max_tokens)

    # -- the prompt cache --------------------------------------------------------------------
    def _cache_owner_of(self, request: GenerationRequest) -> str | None:
        """Who may reuse this request's keys and values, and whose it may reuse (None: nobody)."""
        if self.prompt_cache == "off" or not request.cache_prompt:
            return None
        return request.client_id if self.prompt_cache == "client" else ""

    def forget_prompt_cache(self) -> None:
        """The next request runs its whole prompt (a new conversation; a benchmark's cold start)."""
        self._cache_owner = None

    # -- the request loop -------------------------------------------------------------------
    def generate(self, request: GenerationRequest,
                 cancel: threading.Event | None = None) -> Generator[Chunk | GenerationResult, None, None]:
        """Yield Chunks as text is made, then one GenerationResult.

        Errors in the request raise before anything is yielded; a passed deadline
        raises DeadlineExceeded between tokens or between two of a long prompt's prefill
        chunks, or before the prompt runs where it passed while the request waited for the
        engine; a set `cancel` ends the stream with finish_reason "cancelled" (set before
        the start: no token is generated; set while the prompt runs: none either, after the
        chunk that was running, whose rows the prompt cache keeps).

        One request runs at a time: a stream holds the engine from its first item until
        its GenerationResult comes, or it is closed (``with contextlib.closing(engine.generate(r))``),
        and a stream started meanwhile waits for it, with a warning every 30 s. A thread
        must not start a stream while it holds another open: it would wait for itself; nor
        step streams through a bounded thread pool (`agenerate` is for asyncio code)."""
        self._check_open()
        plan = self.plan(request)
        sampler = Sampler(request.sampling, plan.ids)
        stops = StopStringMatcher(request.stop)
        waited = not self._lock.acquire(blocking=False)
        if waited:
            while not self._lock.acquire(timeout=STREAM_WAIT_WARNING_S):
                log.warning("a request has waited %.0f s for the engine: another stream of it is open (read it to "
                            "its end or close() it; a thread that waits for its own open stream waits forever)",
                            STREAM_WAIT_WARNING_S)
        held = True
        try:
            self._check_open()  # closed while it waited
            if waited and request.deadline is not None and time.monotonic() > request.deadline:
                raise DeadlineExceeded("deadline passed while the request waited for the engine (another stream "
                                       "held it)")
            with contextlib.closing(self._run(request, plan, sampler, stops, cancel)) as items:
                for item in items:
                    if isinstance(item, GenerationResult):  # the last item: the run is over, the engine free
                        held = False  # (a loop that asks for more upon the result would wait for itself)
                        self._lock.release()
                    yield item
        finally:
            if held:
                self._lock.release()

    async def agenerate(self, request: GenerationRequest,
                        cancel: threading.Event | None = None) -> AsyncGenerator[Chunk | GenerationResult, None]:
        """`generate` for asyncio code: ``async for item in engine.agenerate(request)`` yields the
        same items without blocking the event loop. The stream runs on a thread of its own, not on
        the loop's executor: a stream waiting for the engine holds the thread it waits in, so
        streams stepped item by item through a bounded pool (``run_in_executor(None, next, it)``,
        a web framework's sync-iterator response) wait for each other forever once they outnumber
        its workers. Leaving the loop early, an exception in it or a cancelled task ends the stream
        on the engine as a set `cancel` does (before its prompt runs, if it was still waiting)."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        left = _EitherEvent(cancel)  # set when the reader is gone; set too where `cancel` is

        def put(kind: str, value: object) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, (kind, value))
            except RuntimeError:  # the loop is closed: nobody reads any more
                pass

        def run() -> None:
            try:
                with contextlib.closing(self.generate(request, left)) as stream:
                    for item in stream:
                        put("item", item)
                put("end", None)
            except BaseException as exc:  # raised in the reading task
                put("error", exc)

        threading.Thread(target=run, name=f"edge-engine-stream {request.id}".strip(), daemon=True).start()
        try:
            while True:
                kind, value = await items.get()
                if kind == "error":
                    assert isinstance(value, BaseException)
                    raise value
                if kind == "end":
                    return
                assert isinstance(value, (Chunk, GenerationResult))
                yield value
        finally:
            left.set()

    def _run(self, request: GenerationRequest, plan: PromptPlan, sampler: Sampler, stops: StopStringMatcher,
             cancel: threading.Event | None) -> Generator[Chunk | GenerationResult, None, None]:
        start = time.perf_counter()
        detok = IncrementalDetokenizer(self.tokenizer, strip_leading_space=plan.strip_leading_space)
        text_parts: list[str] = []
        generated: list[int] = []
        pending: list[int] = []  # ids whose text is not emitted yet
        finish = "length"
        stopped_by_string = False
        first_token_s = None

        prompt = np.asarray(plan.ids, dtype=np.int64)
        cached = 0
        drafts: PromptLookup | None = None
        accepted_drafts = 0  # of the generated tokens, drafts the model confirmed
        if cancel is not None and cancel.is_set():  # cancelled before it started: not even the prompt runs
            events: Iterator[generator.TokenEvent] = iter(())
            finish = "cancelled"
        else:
            owner = self._cache_owner_of(request)
            reuse = owner is not None and owner == self._cache_owner
            cache = self.decoder.new_cache(len(plan.ids) + plan.max_new_tokens, prompt if reuse else None)
            self._cache_owner, cached = owner, cache.length  # rows kept
            drafts = (PromptLookup(plan.ids, draft_max=min(DRAFT_MAX, self.decoder.verify_rows_max - 1))
                      if self.prompt_lookup else None)
            events = generator.generate(self.decoder, cache, prompt[cached:], max_new_tokens=plan.max_new_tokens,
                                        sample=sampler.sample, stop_ids=plan.stop_ids, drafts=drafts,
                                        judge=sampler.judge, interrupted=lambda: _interrupted(request, cancel))
        for event in events:
            if first_token_s is None:
                first_token_s = event.elapsed_s
            if event.is_stop_token:
                finish = "stop"
                break
            generated.append(event.token)
            accepted_drafts += event.drafted
            pending.append(event.token)
            emit, stopped = stops.feed(detok.push(event.token))
            if emit:
                text_parts.append(emit)
                yield Chunk(emit, tuple(pending))
                pending = []
            if stopped:
                finish, stopped_by_string = "stop", True
                break
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            if request.deadline is not None and time.monotonic() > request.deadline:
                raise DeadlineExceeded(f"deadline passed after {len(generated)} tokens")
        if first_token_s is None and finish == "length" and _interrupted(request, cancel):
            # the prompt's run stopped between two of its chunks (a long prompt, an editor's keystroke)
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
            else:
                raise DeadlineExceeded("deadline passed while the prompt ran")
        if not stopped_by_string:
            # the flush ends a cut-off character (U+FFFD), which can complete a stop string
            tail, stopped_by_string = stops.feed(detok.flush())
            if stopped_by_string and finish == "length":
                finish = "stop"
            tail += stops.flush()
            if tail:
                text_parts.append(tail)
                yield Chunk(tail, tuple(pending))
        total_s = time.perf_counter() - start
        ttft = first_token_s if first_token_s is not None else total_s
        decode_s = total_s - ttft
        decoded = max(len(generated) - 1, 0)
        yield GenerationResult(
            text="".join(text_parts),
            token_ids=tuple(generated),
            prompt_token_ids=tuple(plan.ids),
            finish_reason=finish,
            usage=Usage(prompt_tokens=len(plan.ids), completion_tokens=len(generated), cached_prompt_tokens=cached,
                        draft_tokens=drafts.drafted if drafts else 0,
                        accepted_draft_tokens=accepted_drafts),
            timings=Timings(ttft_ms=ttft * 1000.0,
                            decode_tokens_per_s=(decoded / decode_s) if decode_s > 0 and decoded else math.nan,
                            total_ms=total_s * 1000.0),
            warnings=tuple(getattr(plan, "warnings", ())),
        )

    def complete(self, request: GenerationRequest) -> GenerationResult:
        """Run a request to the end and return only the result."""
        result = None
        for item in self.generate(request):
            result = item
        assert isinstance(result, GenerationResult)
        return result

    def warm_up(self) -> float:
        """Run a short request once (a prompt and a few decode steps: what the first request would
        otherwise pay for: the KV buffers, onnxruntime's first runs of each shape and, with CUDA
        graphs, the recording of the decode step); returns the seconds it took. The daemon does
        this before it reports ready. Nothing is left in the prompt cache."""
        t0 = time.perf_counter()
        self.complete(GenerationRequest(mode="complete", prompt="def main():", max_tokens=WARM_UP_TOKENS,
                                        sampling=SamplingParams(temperature=0.0), cache_prompt=False))
        return time.perf_counter() - t0
