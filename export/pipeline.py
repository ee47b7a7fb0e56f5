"""`edge-runtime export`: checkpoint -> ONNX with KV cache -> quantize for a
profile -> fidelity against torch -> verified bundle.

Work happens in `<output>.partial/`, renamed to `<output>` only when every step
passed, so a failed or interrupted export never leaves a half bundle behind and
never touches an existing one. A leftover `<output>.partial/` or `<output>.replaced/` is
removed only when an export made it (EXPORT_MARKER or an edge-runtime manifest inside).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime.bundle import (FLAVOUR_GQA_SHARED_KV, FLAVOUR_OPTIMUM_KV_CONCAT, MANIFEST_NAME,
                                 OTHER_CHAT_TEMPLATE, load_bundle, read_manifest, unlisted_files)
from edge_runtime.durable_files import fsync_path, fsync_tree
from edge_runtime.errors import BundleError, EdgeRuntimeError
from edge_runtime.memory_fit import (MemoryPlan, ModelShape, bundle_plan, estimate_plan, fused_attention_refusal,
                                     human_bytes, kv_dtype_of, largest_context_that_fits)
from edge_runtime.profiles import DeviceProfile, load_profile, read_meminfo
from edge_runtime.tokenizer import CodeLlamaTokenizer

from . import calibration, fidelity, graph_builder, kv_cache_quant, onnx_export, quantize
from .bundle_writer import EXPORT_MARKER, copy_into, write_manifest
from .checkpoint import (SHARD_INDEX, SINGLE_FILE, CheckpointInfo, check_tensor_shapes, read_checkpoint,
                         rope_length_limit, rope_parameters)
from .progress import Progress, peak_rss_bytes

PRECISIONS = ("int4", "int8", "fp16", "fp32")
GRAPHS = {"optimum": FLAVOUR_OPTIMUM_KV_CONCAT, "fused": FLAVOUR_GQA_SHARED_KV}
GRAPH_FILE = "model.onnx"


class ExportError(EdgeRuntimeError):
    code = "export_failed"


@dataclass(frozen=True)
class ExportOptions:
    checkpoint: Path
    profile: str | Path
    output: Path
    precision: str | None = None  # default: the profile's
    max_context: int | None = None  # default: the profile's
    allow_degraded: bool = False
    force: bool = False  # replace an existing bundle at `output`
    fidelity_tokens: int = 32
    fidelity_corpus_tokens: int = 512  # positions of the held-out corpus scored by KL divergence (0: none)
    algorithm: str | None = None  # quantization algorithm override: rtn | hqq | gptq
    calibration_text: Path | None = None  # GPTQ's calibration text (default: calibration.CALIBRATION_TEXT)
    calibration_tokens: int | None = None  # its first tokens GPTQ runs (default: calibration.CALIBRATION_TOKENS)
    skip_fidelity: bool = False  # benchmarks of random-weight checkpoints only; recorded in the manifest
    # "auto": fused where the checkpoint allows it (and no --algorithm hqq), else optimum;
    # "fused" (built from the tensors, GQA, streamed) or "optimum" (optimum's exporter)
    graph: str = "auto"
    variant: str | None = None  # base | python | instruct: overrides the detected variant (export/family.py)
    kv_cache_bits: int | None = None  # 0 float, 8 int8 KV cache (fused graph): overrides the profile's kv_cache.bits


@dataclass(frozen=True)
class ExportSummary:
    bundle: Path
    precision: str
    total_bytes: int
    files: list[dict]
    fidelity: dict | None
    degraded: bool
    peak_rss_bytes: int
    timings: dict[str, float]
    memory: MemoryPlan | None = None  # the bundle's memory plan with the profile (memory.fits: within its budget)

    @property
    def fits(self) -> bool:
        return self.memory is None or self.memory.fits


def recipe_for(profile: DeviceProfile, precision: str, algorithm: str | None, *,
               fused: bool) -> quantize.QuantRecipe:
    """The quantization the export will do: the profile's, except that the optimum graph
    (`fused` False: onnxruntime's quantizer) cannot search scales, and symmetric int4
    without the search loses fidelity (benchmarks/int4_recipes.py), so a profile that
    relies on the search gets zero points there; and it takes the profile's
    `optimum_block_size` (without GPTQ, larger blocks lose fidelity too)."""
    q = profile.quantization
    search = q.scale_search and fused
    symmetric = q.symmetric and (search or not q.scale_search)
    if algorithm is None:  # the profile's; GPTQ only where the fused graph is built
        algorithm = q.algorithm if fused else "rtn"
    block_size = q.block_size if fused else q.optimum_graph_block_size
    return quantize.QuantRecipe(bits=quantize.BITS[precision], block_size=block_size, symmetric=symmetric,
                                accuracy_level=q.accuracy_level, keep_unquantized=tuple(q.keep_unquantized),
                                algorithm=algorithm, scale_search=search)


def graph_io(graph: Path) -> dict:
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    return {"inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output]}


def kept_matmuls(graph: Path, bits: int) -> list[str]:
    """Names of the kept layers in a quantized graph: MatMul nodes on float weights, and
    MatMulNBits nodes stored at other than `bits` (e.g. an int8 lm_head in an int4 graph), or
    the GatherBlockQuantized of a two-pass lm_head's int8 rows."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    kept = []
    for n in model.graph.node:
        node_bits = next((a.i for a in n.attribute if a.name == "bits"), None)
        if ((n.op_type == "MatMul" and n.input[1] in weights)  # not the two-pass lm_head's rows x activations
                or (n.op_type in ("MatMulNBits", "GatherBlockQuantized") and node_bits != bits)):
            kept.append(n.name)
    return kept


def check_fidelity(report: fidelity.FidelityReport, profile: DeviceProfile, precision: str) -> list[str]:
    min_agree, max_diff = profile.fidelity.for_precision(precision)
    problems = []
    # written as "not within": a NaN (a graph that put NaN in some logits) compares false both ways
    if not report.greedy_agreement >= min_agree:
        problems.append(f"greedy agreement {report.greedy_agreement:.3f} < {min_agree:.3f}")
    if not report.max_logit_diff <= max_diff:
        problems.append(f"max logit difference {report.max_logit_diff:.4g} > {max_diff:.4g}")
    return problems


@dataclass(frozen=True)
class GraphChoice:
    name: str  # "fused" | "optimum"
    why: str


def choose_graph(requested: str, info, algorithm: str | None) -> GraphChoice:
    """`--graph auto` (the default): the fused graph (faster, exports in a fraction of the
    memory) unless the checkpoint has a shape it does not express or HQQ was asked for."""
    if requested != "auto":
        if requested == "fused":
            try:
                graph_builder.check_supported(info)
            except graph_builder.GraphBuildError as exc:
                raise ExportError(f"--graph fused: {exc}; use --graph optimum (or auto)") from None
        return GraphChoice(requested, "--graph " + requested)
    if algorithm == "hqq":
        return GraphChoice("optimum", "--algorithm hqq needs optimum's exporter")
    try:
        graph_builder.check_supported(info)
    except graph_builder.GraphBuildError as exc:
        if algorithm == "gptq":
            raise ExportError(f"--algorithm gptq needs the fused graph, which cannot express this checkpoint: "
                              f"{exc}") from None
        return GraphChoice("optimum", f"the fused graph cannot express this checkpoint: {exc}")
    return GraphChoice("fused", "default: GroupQueryAttention, shared KV buffer")


def host_memory_available() -> int | None:
    """Bytes this machine can still give a process: MemAvailable plus SwapFree from
    /proc/meminfo; None where there is no such file."""
    fields = read_meminfo()
    return fields["MemAvailable"] + fields.get("SwapFree", 0) if "MemAvailable" in fields else None


TORCH_FLOAT32_FACTOR = 4.4  # bytes a parameter takes in a float32 torch model, with ~10 % for the rest


def check_torch_memory(info: CheckpointInfo, *, fidelity_on: bool, graph: str) -> None:
    """Refuse, before any work, an export whose steps that hold the original model in float32
    in torch -- the fidelity reference, optimum's exporter -- cannot fit this machine's memory
    (27 GiB for a 7B): the kernel would kill the export after the graph was built."""
    steps = [what for what, on in (("measuring fidelity against torch", fidelity_on),
                                   ("optimum's exporter", graph == "optimum")) if on]
    have = host_memory_available()
    need = int(info.family.parameter_count * TORCH_FLOAT32_FACTOR)
    if not steps or have is None or need <= have:
        return
    ways = []
    if fidelity_on:
        ways.append("add --skip-fidelity (the bundle then records that fidelity was not measured)")
    if graph == "optimum":
        ways.append("use --graph fused (built a layer at a time)")
    verb = "hold" if len(steps) > 1 else "holds"
    raise ExportError(f"{' and '.join(steps)} {verb} {info.name} in float32 in torch: about {human_bytes(need)}, and "
                      f"this machine has {human_bytes(have)} available (memory and swap); {', or '.join(ways)}, "
                      "or export on a machine with more memory")


def check_index_for_transformers(info: CheckpointInfo, *, fidelity_on: bool, graph: str) -> None:
    """Refuse, before any work, a shard index without its "metadata" object where transformers
    will load the checkpoint (the fidelity reference, optimum's exporter): it reads
    index["metadata"] and stopped with a KeyError traceback after the graph was built."""
    index = info.path / SHARD_INDEX
    if not (fidelity_on or graph == "optimum") or not index.is_file():
        return
    try:
        document = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # read_checkpoint read it: not met here
    if not isinstance(document.get("metadata"), dict):
        steps = " and ".join(what for what, on in (("measuring fidelity against torch", fidelity_on),
                                                   ("optimum's exporter", graph == "optimum")) if on)
        found = (f"its \"metadata\" is {json.dumps(document['metadata'])}, not an object" if "metadata" in document
                 else "it has no \"metadata\" object")
        raise ExportError(f"{info.name}: {SHARD_INDEX}: {found}, which transformers needs to read the shards for "
                          f"{steps}: add \"metadata\": {{}} beside its weight_map")


def context_limit(info: CheckpointInfo, profile: DeviceProfile, requested: int | None) -> int:
    if requested is not None:
        if requested < 16:
            raise ExportError(f"--max-context {requested} is too small (at least 16)")
        if requested > profile.max_context:
            raise ExportError(f"--max-context {requested} is above the {profile.name} profile's max_context "
                              f"({profile.max_context}), which caps the context the device runs; for more, copy "
                              f"the profile's TOML with max_context raised and give it as --profile here and on "
                              f"the device")
        return requested
    return min(profile.max_context, info.architecture.max_position_embeddings)


def check_rope_length(info: CheckpointInfo, limit: int) -> None:
    """Refuse a context past the length at which the checkpoint's RoPE scaling (dynamic,
    longrope) changes its frequencies: the exported graph keeps a short sequence's, so every
    token past it would be computed with the wrong rotation, and fidelity's short prompts
    would not see it."""
    rope_limit = rope_length_limit(info.config)
    if rope_limit is None or limit <= rope_limit[0]:
        return
    tokens, key = rope_limit
    where = "rope_parameters" if "rope_parameters" in info.config else "rope_scaling"
    raise ExportError(f"{info.name}: config.json's {where} (rope_type {rope_parameters(info.config)['rope_type']!r}) "
                      f"changes RoPE's frequencies once a sequence is longer than its {key} ({tokens} tokens), "
                      f"which the exported graph does not (it keeps a short sequence's): a context of {limit} would "
                      f"be computed wrongly past {tokens} tokens; export with --max-context {tokens} or less")


def staging_folder(output: Path) -> Path:
    """Where the bundle is written until it is whole (then renamed to --output)."""
    return output.with_name(output.name + ".partial")


def replaced_folder(output: Path) -> Path:
    """Where --force moves the earlier bundle while the new one takes its name."""
    return output.with_name(output.name + ".replaced")


def scratch_is_ours(folder: Path) -> bool:
    """Whether a `<output>.partial` / `.replaced` folder is one an export made: it holds the
    export's marker (a staging folder), an edge-runtime manifest (a finished staging folder,
    or the earlier bundle --force moved aside), or nothing (what removing one can leave)."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    if (folder / EXPORT_MARKER).is_file() or not any(folder.iterdir()):
        return True
    try:
        read_manifest(folder)
    except (BundleError, OSError):
        return False
    return True


def check_scratch(folder: Path) -> None:
    """Refuse a scratch folder in the way that is not an export's (it is not deleted)."""
    if (folder.exists() or folder.is_symlink()) and not scratch_is_ours(folder):
        raise ExportError(f"{folder} is in the way: the export writes there while it works, and it is not a folder "
                          f"an earlier export left (no {EXPORT_MARKER}, no edge-runtime {MANIFEST_NAME}); move it "
                          "away or choose another --output")


def remove_scratch(folder: Path) -> None:
    """Remove an export's scratch folder (checked with `check_scratch`): the marker and the
    manifest go last, so that a removal cut short leaves a folder the next export still
    knows as its own."""
    if not folder.exists():
        return
    check_scratch(folder)
    last = (MANIFEST_NAME, EXPORT_MARKER)
    for child in folder.iterdir():
        if child.name not in last:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    for name in last:
        (folder / name).unlink(missing_ok=True)
    folder.rmdir()


def check_output(output: Path, checkpoint: Path, *, force: bool) -> None:
    """--output is a new folder, or (with --force) an empty one or an earlier bundle (its
    bundle.json an edge-runtime manifest, read without hashing the files) holding nothing its
    manifest does not list: never the checkpoint, a folder holding it, a file, a folder of
    something else, or someone's files beside a bundle."""
    if output == checkpoint or output in checkpoint.parents:
        raise ExportError(f"--output {output} is the checkpoint's folder or holds it ({checkpoint}): choose a new "
                          "folder for the bundle")
    for scratch in (staging_folder(output), replaced_folder(output)):  # the export deletes these
        if scratch == checkpoint or scratch in checkpoint.parents:
            raise ExportError(f"the export writes {scratch}, which is the checkpoint's folder or holds it "
                              f"({checkpoint}): choose another --output")
        check_scratch(scratch)
    if not output.exists():
        return
    if not force:
        raise ExportError(f"{output} already exists (choose another --output, or --force to replace it)")
    if not output.is_dir():
        raise ExportError(f"--output {output} is a file, not a bundle folder: --force replaces only an earlier "
                          "bundle; choose another --output")
    if not any(output.iterdir()):
        return
    if not (output / MANIFEST_NAME).is_file():
        raise ExportError(f"--output {output} is not a bundle (no {MANIFEST_NAME}) and not empty: --force replaces "
                          "only an earlier bundle; choose another --output, or empty that folder yourself")
    try:
        manifest, _ = read_manifest(output)  # the manifest only: its files are not hashed here
    except BundleError as exc:
        raise ExportError(f"--output {output} is not an edge-runtime bundle ({exc}): --force replaces only an "
                          "earlier bundle; choose another --output") from None
    extra = unlisted_files(output, manifest)
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise ExportError(f"--output {output} is an earlier bundle, but it also holds files its {MANIFEST_NAME} "
                          f"does not list: {shown}; --force would delete them with it. Move them out of {output} "
                          "and run again, or choose another --output")


def check_memory_budget(info: CheckpointInfo, profile: DeviceProfile, precision: str, limit: int, *, flavour: str,
                        kv_bits: int, algorithm: str | None) -> None:
    """Refuse, before any work, a bundle that memory_fit's estimate already puts over the
    profile's memory budget at its context (the engine would refuse to start it), saying the
    --max-context that fits. (The fused graph's estimate bounds its written bundle; the optimum
    graph's counts the weights only, a little under the written bytes: the written bundle is
    checked again at the end.)"""
    shape = ModelShape.from_config(info.name, info.config)

    def plan_at(context: int) -> MemoryPlan:
        return estimate_plan(shape, profile, precision, context, flavour=flavour, kv_bits=kv_bits,
                             algorithm=algorithm, what=info.name)

    plan = plan_at(limit)
    if plan.fits:
        return
    fits = largest_context_that_fits(plan_at, limit)
    ways = ([f"--max-context {fits} fits"] if fits else []) + ["a smaller --precision", "a profile for a bigger device"]
    raise ExportError(f"the bundle would not fit the {profile.name} profile's memory budget, and the engine would "
                      f"refuse to start it: {plan.describe()} (estimated); {', or '.join(ways)}")


def check_calibration_flags(opts: ExportOptions, profile: DeviceProfile, precision: str, *, fused: bool) -> None:
    """--calibration-text and --calibration-tokens are GPTQ's: refuse them where this export
    does not run GPTQ, rather than ignore them."""
    flags = [flag for flag, value in (("--calibration-text", opts.calibration_text),
                                      ("--calibration-tokens", opts.calibration_tokens)) if value is not None]
    if not flags:
        return
    if precision not in quantize.BITS:
        why = f"is {precision}: nothing is quantized"
    else:
        algorithm = recipe_for(profile, precision, opts.algorithm, fused=fused).algorithm
        if algorithm == "gptq":
            return
        why = (f"quantizes with {algorithm} (--algorithm {opts.algorithm})" if opts.algorithm else
               f"quantizes with {algorithm} (the optimum graph's round-to-nearest)" if not fused else
               f"quantizes with {algorithm} (the {profile.name} profile's algorithm)")
    raise ExportError(f"{' and '.join(flags)} calibrate{'s' if len(flags) == 1 else ''} GPTQ (--algorithm gptq), "
                      f"and this export {why}: drop {' and '.join(flags)}, or export int4/int8 with --algorithm gptq")


def check_output_writable(output: Path) -> None:
    """Refuse, before any work, an --output that cannot take the bundle: a folder on its path
    is a file, or the folder it goes in (the nearest one that exists: missing folders are
    created when the work starts, as `--output bundles/NAME` in a fresh clone) cannot be
    written (permissions, a read-only file system). Tried for real: a folder is created there
    and removed."""
    home = output.parent
    while not (home.exists() or home.is_symlink()) and home != home.parent:
        home = home.parent
    if not home.is_dir():
        raise ExportError(f"--output {output}: {home} is a file, not a folder; choose another --output")
    try:
        probe = tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".probe", dir=home)
    except OSError as exc:
        raise ExportError(f"--output {output}: cannot create the bundle in {home} ({exc.strerror or exc}); "
                          "choose a folder you can write to") from None
    os.rmdir(probe)


def check_gpu_attention_dtype(profile: DeviceProfile, kv_dtype: str, precision: str) -> None:
    """The fused graph's GroupQueryAttention runs on CUDA in float16 only: a float32 or int8
    KV cache would put attention on the CPU (a copy of the cache at every step)."""
    problem = fused_attention_refusal(profile, precision, kv_dtype)  # the fit table's "refused" cells too
    if problem:
        raise ExportError(f"{problem}: export fp16, int8 or int4 with a float16 KV cache (--kv-cache-bits 0), or "
                          "use --graph optimum")


def check_flags(opts: ExportOptions) -> None:
    """Refuse, before any work, flags out of range or that do not go together."""
    if opts.graph not in (*GRAPHS, "auto"):
        raise ExportError(f"--graph {opts.graph!r} is not one of auto, {', '.join(GRAPHS)}")
    if opts.graph == "fused" and opts.algorithm == "hqq":
        raise ExportError("--algorithm hqq needs --graph optimum (the fused graph quantizes with round-to-nearest "
                          "or GPTQ)")
    if opts.graph == "optimum" and opts.algorithm == "gptq":
        raise ExportError("--algorithm gptq needs the fused graph (--graph fused or auto)")
    if opts.calibration_text is not None and not opts.calibration_text.exists():
        raise ExportError(f"--calibration-text {opts.calibration_text}: no such file or folder")
    if opts.calibration_tokens is not None and opts.calibration_tokens < calibration.MIN_TOKENS:
        raise ExportError(f"--calibration-tokens {opts.calibration_tokens} must be at least {calibration.MIN_TOKENS}")
    if opts.fidelity_tokens < 1:
        raise ExportError(f"--fidelity-tokens {opts.fidelity_tokens} must be at least 1")
    if opts.kv_cache_bits not in (None, 0, 8):
        raise ExportError(f"--kv-cache-bits {opts.kv_cache_bits} is not 0 (float) or 8 (int8)")
    if opts.fidelity_corpus_tokens < 0:
        raise ExportError(f"--fidelity-corpus-tokens {opts.fidelity_corpus_tokens} must be 0 (none) or more")


@dataclass(frozen=True)
class BuiltGraph:
    """What the graph step made besides the graph file, as the manifest records it."""

    excluded: list[str] = field(default_factory=list)  # the MatMuls left unquantized
    kept_bits: int = 0  # storage of the kept layers: 0 float, 8 int8 (fused graph with the profile's keep_bits)
    refine_top_k: int = 0  # the lm_head in two passes (fused int4 graph, the profile's lm_head_refine_top_k)
    embedding_bits: int = 0  # the token embedding table: 0 float, 8 int8 (the profile's embedding_bits)
    kv_scales: kv_cache_quant.KVScales | None = None  # an int8 KV cache (fused graph, profile kv_cache.bits 8)
    calibrated: dict | None = None  # GPTQ's calibration text, recorded in the manifest


def build_fused_graph(info: CheckpointInfo, graph: Path, profile: DeviceProfile, precision: str,
                      recipe: quantize.QuantRecipe | None, *, limit: int, kv_dtype: str,
                      gptq: calibration.Calibration | None, progress: Progress) -> BuiltGraph:
    """The fused graph at `graph`, straight from the checkpoint's tensors: GPTQ's calibration
    (`gptq`, read in step 1) first where the recipe says gptq, the int8 KV cache's scales last
    where `kv_dtype` is int8."""
    q = profile.quantization
    hessians = None
    calibrated = gptq.manifest if gptq else None  # GPTQ's calibration text, recorded in the manifest
    if gptq is not None:
        files = calibrated["files"]
        progress.detail(f"GPTQ: calibrating on {gptq.text.source.name} ({files} file{'s' if files > 1 else ''}, "
                        f"{calibrated['tokens']} tokens in {calibrated['windows']} windows), layer by layer")
        hessians = gptq.hessians()
    io_dtype = "float32" if precision == "fp32" else profile.kv_cache.dtype
    refine_top_k = q.head_refine_top_k_for(precision, io_dtype, recipe.algorithm) if recipe else 0
    if refine_top_k:
        progress.detail(f"lm_head in two passes: int4, then its top {refine_top_k} logits "
                        "from int8 rows")
    embedding_bits = q.embedding_bits_for(io_dtype) if recipe else 0
    graph_builder.build_decoder_graph(
        info, graph, precision=precision, block_size=q.block_size,
        symmetric=recipe.symmetric if recipe else q.symmetric,
        accuracy_level=q.accuracy_level, keep_unquantized=tuple(q.keep_unquantized), max_length=limit,
        keep_bits=(q.keep_bits or None) if recipe else None, keep_block_size=q.kept_block_size,
        scale_search=recipe.scale_search if recipe else False, hessians=hessians,
        io_dtype=io_dtype, progress=progress.detail, head_refine_top_k=refine_top_k,
        embedding_bits=embedding_bits or None,
        # prompt lookup's runs of several rows: CPU profiles only until a GPU run tests them
        logits_start_input=set(profile.provider_names) == {"CPUExecutionProvider"})
    excluded = kept_matmuls(graph, quantize.BITS[precision]) if recipe else []
    kept_bits = (q.keep_bits or 0) if recipe else 0
    kv_scales = None
    if kv_dtype == "int8":
        progress.detail(f"int8 KV cache: per-channel scales calibrated on "
                        f"{kv_cache_quant.CALIBRATION_TEXT.name}")
        kv_scales = kv_cache_quant.add_int8_kv_cache(
            graph, info.architecture, CodeLlamaTokenizer.from_file(info.tokenizer_path), max_length=limit)
    return BuiltGraph(excluded=excluded, kept_bits=kept_bits, refine_top_k=refine_top_k,
                      embedding_bits=embedding_bits, kv_scales=kv_scales, calibrated=calibrated)


def bundle_manifest(info: CheckpointInfo, profile: DeviceProfile, precision: str, *, limit: int, kv_dtype: str,
                    flavour: str, graph: Path, recipe: quantize.QuantRecipe | None, built: BuiltGraph,
                    report: fidelity.FidelityReport | None, problems: list[str]) -> dict:
    """bundle.json's content but for the files (write_manifest adds them with their hashes)."""
    arch = info.architecture
    min_agree, max_diff = profile.fidelity.for_precision(precision)
    return {
        "source": {"name": info.name, "config_sha256": info.config_sha256, "model_type": "llama",
                   "torch_dtype": info.torch_dtype, "weight_bytes": info.weight_bytes},
        "architecture": {"num_layers": arch.num_layers, "num_heads": arch.num_heads,
                         "num_kv_heads": arch.num_kv_heads, "head_dim": arch.head_dim,
                         "hidden_size": arch.hidden_size, "vocab_size": arch.vocab_size,
                         "rope_theta": arch.rope_theta,
                         "max_position_embeddings": arch.max_position_embeddings},
        "context_limit": limit,
        "tokenizer": {"file": "tokenizer.json", **info.special_ids, "infill": info.infill_ids,
                      "supports_infill": info.supports_infill, "step": info.step_id,
                      "chat_format": info.chat_format, "stop_ids": list(info.stop_ids)},
        "family": info.family.as_dict(),
        "profile": {"name": profile.name, "kv_cache_dtype": kv_dtype},
        "kv_cache": built.kv_scales.as_manifest() if built.kv_scales else None,
        "precision": precision,
        "quantization": ({**recipe.as_manifest(built.excluded), "kept_bits": built.kept_bits,
                          **({"kept_block_size": profile.quantization.kept_block_size} if built.kept_bits else {}),
                          "lm_head_refine_top_k": built.refine_top_k, "embedding_bits": built.embedding_bits,
                          "calibration": built.calibrated}
                         if recipe else None),
        "graph": {"flavour": flavour, "file": GRAPH_FILE, **graph_io(graph)},
        "fidelity": {**(report.as_manifest() if report else {"skipped": True}),
                     "threshold": {"min_greedy_agreement": min_agree, "max_logit_diff": max_diff},
                     "passed": report is not None and not problems, "degraded": bool(problems),
                     "problems": problems},
        "licence_files": [p.name for p in info.licence_files],
    }


def run_export(opts: ExportOptions, progress: Progress | None = None) -> ExportSummary:
    profile = load_profile(opts.profile)
    precision = opts.precision or profile.precision
    if precision not in PRECISIONS:
        raise ExportError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    output = opts.output.resolve()
    check_output(output, opts.checkpoint.resolve(), force=opts.force)
    check_output_writable(output)
    check_flags(opts)
    calibration_tokens = opts.calibration_tokens or calibration.CALIBRATION_TOKENS
    kv_bits = profile.kv_cache.bits if opts.kv_cache_bits is None else opts.kv_cache_bits
    progress = progress or Progress(5)
    # Steps: read, build (the fused graph is built and quantized in one step; optimum's path
    # exports, then converts), fidelity, write. The count is the likely graph's until step 1
    # has read the checkpoint and chosen it.
    progress.total = 5 if opts.graph == "optimum" or opts.algorithm == "hqq" else 4

    with progress.step("read checkpoint"):
        info = read_checkpoint(opts.checkpoint, variant=opts.variant)
        check_tensor_shapes(info)
        arch = info.architecture
        if info.ignored_files:
            progress.detail(f"note: not read (neither {SHARD_INDEX} nor {SINGLE_FILE} names them): "
                            + ", ".join(p.name for p in info.ignored_files))
        if not info.licence_files:
            progress.detail(f"warning: {info.name} has no licence file (LICENSE, NOTICE, USE_POLICY.md, ...), so "
                            f"the bundle carries none: copy the model's licence into {info.path} and export again "
                            "to ship it with the bundle")
        fam = info.family
        progress.detail(f"{info.name}: {arch.num_layers} layers, hidden {arch.hidden_size}, heads "
                        f"{arch.num_heads}/{arch.num_kv_heads} kv, vocab {arch.vocab_size}, weights "
                        f"{human_bytes(info.weight_bytes)}; infill {'yes' if info.supports_infill else 'no'}, "
                        f"chat format {info.chat_format}")
        progress.detail(f"Code Llama {fam.size_class} ({fam.parameter_count / 1e9:.3g} B parameters), {fam.variant} "
                        f"(from {fam.variant_source}), {fam.attention} {fam.num_heads}/{fam.num_kv_heads} heads, "
                        f"infill {'yes' if fam.supports_infill else 'no: ' + fam.infill_note}, chat format "
                        f"{fam.chat_format} (from {fam.chat_format_source})")
        if fam.chat_format_source == OTHER_CHAT_TEMPLATE:
            progress.detail(f"warning: {info.name}'s chat template is neither Code Llama's [INST] format nor 70B "
                            "Instruct's Source:/<step>: the bundle builds chat prompts as [INST], which this model "
                            "may not have been tuned on (each chat reply says so); completion and infill are as "
                            "the model's")
        graph_choice = choose_graph(opts.graph, info, opts.algorithm)
        if graph_choice.name == "optimum" and "rope_parameters" in info.config and "rope_theta" not in info.config:
            raise ExportError(f"{info.name}'s config.json keeps its RoPE settings in rope_parameters (written by "
                              "transformers 5), which optimum's exporter (transformers 4) does not read: it would "
                              "rotate with base 10000. Use --graph fused (not with --algorithm hqq), or add the "
                              "rope_theta of rope_parameters at the top level of config.json")
        flavour = GRAPHS[graph_choice.name]
        fused = flavour == FLAVOUR_GQA_SHARED_KV
        progress.total = 4 if fused else 5
        progress.detail(f"graph: {graph_choice.name} ({graph_choice.why})")
        check_calibration_flags(opts, profile, precision, fused=fused)
        kv_dtype = kv_dtype_of(precision, flavour, profile.kv_cache.dtype, kv_bits)  # as the bundle will record it
        if fused:
            check_gpu_attention_dtype(profile, kv_dtype, precision)
            if precision == "fp16" and profile.kv_cache.dtype == "float32":
                progress.detail(f"warning: --precision fp16 on the {profile.name} profile stores the weights in "
                                "float32: the fused graph keeps them in its activations' type, float32 there (the "
                                "profile's kv_cache.dtype), so the bundle is fp32's size (int8 or int4 make it "
                                "smaller)")
        limit = context_limit(info, profile, opts.max_context)
        check_rope_length(info, limit)
        if limit > arch.max_position_embeddings:
            progress.detail(f"warning: --max-context {limit} is above the model's max_position_embeddings "
                            f"({arch.max_position_embeddings}, the context it was trained for): its output past "
                            "that is not measured here")
        check_memory_budget(info, profile, precision, limit, flavour=flavour, kv_bits=kv_bits,
                            algorithm=opts.algorithm)
        check_torch_memory(info, fidelity_on=not opts.skip_fidelity, graph=graph_choice.name)
        check_index_for_transformers(info, fidelity_on=not opts.skip_fidelity, graph=graph_choice.name)
        if not opts.skip_fidelity:
            need = fidelity.prompt_positions(CodeLlamaTokenizer.from_file(info.tokenizer_path), info.chat_format,
                                             opts.fidelity_tokens, infill=info.supports_infill)
            if need > limit:
                raise ExportError(f"the fidelity measure needs {need} positions (its longest prompt and "
                                  f"--fidelity-tokens {opts.fidelity_tokens}) and the bundle's context is {limit}: "
                                  f"raise --max-context to {need}, lower --fidelity-tokens, or add --skip-fidelity")
        recipe = recipe_for(profile, precision, opts.algorithm, fused=fused) if precision in quantize.BITS else None
        gptq: calibration.Calibration | None = None  # GPTQ's calibration tokens, read before any work
        if recipe is not None and recipe.algorithm == "gptq":
            source = opts.calibration_text or calibration.CALIBRATION_TEXT
            try:
                gptq = calibration.calibration_for(info, source, window=min(calibration.CALIBRATION_WINDOW, limit),
                                                   n_tokens=calibration_tokens)
            except (OSError, calibration.CalibrationError) as exc:
                raise ExportError(f"--calibration-text {source}: {exc}") from None
            skipped = gptq.text.skipped
            if skipped:
                progress.detail(f"note: not UTF-8 text, left out: {', '.join(skipped[:5])}"
                                + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""))

    partial = staging_folder(output)
    replaced = replaced_folder(output)
    remove_scratch(partial)  # an earlier export's, cut short
    work = partial / "_export"
    swapping = False  # set when the renames that install the bundle begin
    moved_aside = False  # set when this export moved the earlier bundle to <output>.replaced
    created = missing_folders(partial.parent)  # --output's folders that do not exist yet, made here
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        partial.mkdir()  # not in the try below: a folder this export did not make is not removed there
    except BaseException:
        remove_created(created)
        raise
    try:
        (partial / EXPORT_MARKER).write_text("edge-runtime export staging folder: safe to delete\n")
        graph = partial / GRAPH_FILE
        if fused:
            with progress.step(f"build the fused decoder graph from the tensors ({precision}, streamed)"):
                built = build_fused_graph(info, graph, profile, precision, recipe, limit=limit, kv_dtype=kv_dtype,
                                          gptq=gptq, progress=progress)
        else:
            if kv_bits == 8:
                progress.detail("the KV cache stays float: only the fused graph keeps an int8 cache")
            with progress.step("export to ONNX with KV cache (optimum, fp32)"):
                exported = onnx_export.export_onnx(info, work)
            with progress.step(f"convert weights to {precision}"):
                excluded: list[str] = []
                if recipe is not None:
                    progress.detail(f"MatMulNBits {recipe.bits}-bit, block {recipe.block_size}, "
                                    f"{'symmetric' if recipe.symmetric else 'asymmetric'}, {recipe.algorithm}, "
                                    f"accuracy level {recipe.accuracy_level}, "
                                    f"kept: {', '.join(recipe.keep_unquantized) or '-'}")
                    _, excluded = quantize.quantize_weights(exported, graph, recipe)
                elif precision == "fp16":
                    quantize.convert_fp16(exported, graph)
                else:
                    quantize.copy_float(exported, graph)
                shutil.rmtree(work)
            built = BuiltGraph(excluded=excluded)

        report = None
        problems: list[str] = []
        with progress.step(f"measure fidelity against torch ({opts.fidelity_tokens} greedy tokens per prompt)"):
            if opts.skip_fidelity:
                progress.detail("skipped (--skip-fidelity): the bundle records no fidelity")
            else:
                try:  # with the profile's session config: the graph measured as the engine will run it
                    report = fidelity.measure(info.path, graph, arch, info.tokenizer_path, info.chat_format,
                                              n_tokens=opts.fidelity_tokens,
                                              corpus_tokens=opts.fidelity_corpus_tokens,
                                              corpus_window=min(fidelity.CORPUS_WINDOW, limit), flavour=flavour,
                                              progress=progress.detail, infill=info.supports_infill,
                                              session_config=profile.ort_session_config())
                except fidelity.GraphSessionError as exc:
                    raise ExportError(f"{exc} (the {profile.name} profile's session_config); the engine could "
                                      "not run the bundle either") from None
                problems = check_fidelity(report, profile, precision)
                progress.detail(f"greedy agreement {report.greedy_agreement:.3f} (min {report.greedy_agreement_min:.3f}; "
                                f"{report.greedy_agreement_strict:.3f} counting ties within {report.tie_logits:g} "
                                f"logits as differences), teacher-forced {report.teacher_forced_agreement:.3f}, "
                                f"max logit diff {report.max_logit_diff:.4g}")
                if report.corpus_positions:
                    progress.detail(f"corpus: KL divergence mean {report.kl_divergence_mean:.4g} "
                                    f"(p99 {report.kl_divergence_p99:.4g}), top-1 agreement "
                                    f"{report.corpus_top1_agreement:.3f} over {report.corpus_positions} positions")
        if problems and not opts.allow_degraded:
            raise ExportError(f"fidelity below the {profile.name} profile's threshold for {precision}: "
                              + "; ".join(problems) + " (use --allow-degraded to write the bundle anyway)")

        with progress.step("write bundle (tokenizer, licences, manifest with SHA-256)"):
            copy_into(partial, [info.tokenizer_path], ["tokenizer.json"])
            copy_into(partial, list(info.licence_files))
            write_manifest(partial, bundle_manifest(info, profile, precision, limit=limit, kv_dtype=kv_dtype,
                                                    flavour=flavour, graph=graph, recipe=recipe, built=built,
                                                    report=report, problems=problems))
            (partial / EXPORT_MARKER).unlink()  # the manifest says whose the folder is from here on
            plan = bundle_plan(load_bundle(partial), profile)  # read back exactly as the device will
            progress.detail(plan.describe() + ("" if plan.fits else ": DOES NOT FIT; the engine will refuse to "
                                               "start with this profile (lower --max-context or the precision)"))
            # past the estimate checked before the work: the bundle is kept, and the summary (and
            # the command's exit status, 3) says it does not fit
            # every byte on the disk before the bundle takes the name: a power cut soon after the
            # export returned could otherwise leave bundle.json naming files that are empty or short
            fsync_tree(partial)
            # two renames: at every moment one whole bundle has the name, or the earlier one is
            # put back below
            remove_scratch(replaced)  # an earlier export's, cut short
            if output.exists():
                output.rename(replaced)
                moved_aside = True
            swapping = True
            partial.rename(output)
            fsync_path(output.parent)  # the renames, on the disk
    except BaseException as exc:
        # the staging folder gone while swapping: the new bundle has the name (the exception came
        # after the rename), and a Ctrl-C then no longer undoes the export
        installed = swapping and not partial.exists() and output.exists()
        if not installed:
            # only what this export moved aside goes back (a .replaced an earlier export left is not a
            # bundle the user kept at --output)
            if moved_aside and replaced.exists() and not output.exists():
                replaced.rename(output)
            try:
                remove_scratch(partial)
            except (OSError, ExportError):
                pass
            remove_created(created)
            if isinstance(exc, OSError):  # a full disk, a quota, a file-size limit, a failing drive
                raise ExportError(f"{stopped_by(exc, partial)}; nothing was written"
                                  + (f", the earlier bundle at {output} is kept" if output.exists() else "")) from exc
            if isinstance(exc, KeyboardInterrupt):
                progress.detail("interrupted: nothing was written" + (
                    f", the earlier bundle at {output} is kept" if output.exists() else f" at {output}"))
            raise
        if not isinstance(exc, KeyboardInterrupt):
            finish_swap(replaced, progress)
            raise
        progress.detail(f"interrupted after the new bundle was installed at {output}: the export is complete")
    finish_swap(replaced, progress)

    manifest, _ = read_manifest(output)  # verified (every hash) before the rename, as load_bundle(partial)
    files = manifest["files"]
    return ExportSummary(bundle=output, precision=precision, total_bytes=sum(f["size"] for f in files), files=files,
                         fidelity=manifest["fidelity"], degraded=bool(problems),
                         peak_rss_bytes=peak_rss_bytes(), timings=dict(progress.timings), memory=plan)


def missing_folders(folder: Path) -> list[Path]:
    """The folders on the way to `folder` (itself included) that do not exist yet, deepest first."""
    missing = []
    while not (folder.exists() or folder.is_symlink()) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_created(folders: list[Path]) -> None:
    """Remove the folders an export made for --output (`missing_folders`, deepest first) once
    it has failed: only while empty, so nothing that someone put there meanwhile is lost."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (someone's files), or already gone
            return


_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def stopped_by(exc: OSError, partial: Path) -> str:
    """What stopped the export, in words: the disk it writes the bundle to, where that is what failed."""
    what = (exc.strerror or str(exc)) + (f": {exc.filename}" if exc.filename else "")
    if exc.errno in _WRITE_ERRORS:
        return f"the export could not write the bundle in {partial} ({what}); free space there, or choose " \
               "another --output"
    return f"the export failed: {what}"


def finish_swap(replaced: Path, progress: Progress) -> None:
    """Remove the earlier bundle --force moved aside, once the new one has its name. A Ctrl-C
    here does not undo the export: the removal is finished (a second Ctrl-C stops it), and
    what is left is said; the next export to this --output removes it (`remove_scratch`)."""
    for attempt in range(2):
        try:
            remove_scratch(replaced)
            return
        except KeyboardInterrupt:
            progress.detail(f"interrupted while removing the earlier bundle ({replaced}); the new bundle is in place"
                            + ("; finishing the removal" if attempt == 0 else ""))
        except (OSError, ExportError) as exc:
            progress.detail(f"warning: could not remove the earlier bundle {replaced}: {exc}")
            break
    if replaced.exists():
        progress.detail(f"warning: {replaced} (the earlier bundle, or what is left of it) is still there: the next "
                        "export to this --output removes it, or delete it yourself")


def format_summary(s: ExportSummary) -> str:
    lines = [f"bundle     {s.bundle}", f"precision  {s.precision}", f"size       {human_bytes(s.total_bytes)}"]
    for f in s.files:
        lines.append(f"  {f['path']:<28} {human_bytes(f['size']):>12}  sha256 {f['sha256'][:16]}…")
    fid = s.fidelity or {}
    if fid.get("skipped"):
        lines.append("fidelity   not measured (--skip-fidelity)")
    else:
        verdict = "PASSED" if fid.get("passed") else "BELOW THRESHOLD (degraded)"
        strict = fid.get("greedy_agreement_strict")
        lines.append(f"fidelity   greedy agreement {fid['greedy_agreement']:.3f} over {fid['n_tokens']} tokens x "
                     f"{fid['prompts']} prompts"
                     + (f" ({strict:.3f} with ties as differences)" if strict is not None else "")
                     + f", teacher-forced {fid['teacher_forced_agreement']:.3f}, "
                     f"max logit diff {fid['max_logit_diff']:.4g}: {verdict}")
        if fid.get("corpus_positions"):
            lines.append(f"           KL divergence mean {fid['kl_divergence_mean']:.4g} "
                         f"(p99 {fid['kl_divergence_p99']:.4g}), top-1 agreement "
                         f"{fid['corpus_top1_agreement']:.3f} over {fid['corpus_positions']} corpus positions")
    if s.memory is not None:
        lines.append(f"memory     {s.memory.describe()}: " + ("fits" if s.memory.fits else "DOES NOT FIT"))
    lines.append(f"peak memory {human_bytes(s.peak_rss_bytes)}; "
                 + ", ".join(f"{k.split(' (')[0]} {v:.1f}s" for k, v in s.timings.items()))
    return "\n".join(lines)
