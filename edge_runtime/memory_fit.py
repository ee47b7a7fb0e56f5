"""Does a model fit a device? Weights + KV cache at the context + overhead, against
the profile's memory budget.

Two uses:

* `bundle_plan(bundle, profile)`: the plan for a real bundle. Weights are the
  bytes of its graph files (as hashed in bundle.json); the KV cache is sized for
  the engine's context limit (the bundle's, capped by the profile's) in the dtype
  the graph takes; `check_bundle_fits` raises `MemoryBudgetExceeded` with every
  number when the total is over the budget. `Engine.from_bundle` calls it before
  it creates a session, so `edge-runtime serve` refuses to start instead of being
  killed by the OOM killer mid-request.
* `estimate_plan(shape, profile, precision, context)`: the same sum for a Code Llama
  family member (`CODE_LLAMA_SHAPES`, the published architectures) exported for a
  profile, from the architecture and the profile's quantization settings. The
  README's fit table is `python -m edge_runtime.memory_fit --table --markdown`
  (also `edge-runtime fit --table --markdown`).

The terms:

weights   bundle: graph + external data file sizes. Estimate: the tensors the fused graph's
          builder writes (`weight_tensor_bytes`) plus what a written bundle holds beside
          them (`written_file_bytes`: the rotary tables, the data file's alignment at its
          most, the graph file), so a written bundle is at most its estimate. MatMulNBits packs
          `bits` per weight plus, per block of `block_size` weights, one scale in
          the graph's float type and (asymmetric) one `bits`-bit zero point; the
          embedding and the kept layers (lm_head) stay in the float type. The
          float type is float16 where the profile's KV cache is float16 (GPU
          profiles: activations and KV cache share a dtype) and float32 otherwise;
          fp32 bundles hold every weight in 4 bytes, fp16 bundles in the float type
          too: 2 bytes on the GPU profiles and with the optimum graph, but 4 for a
          fused graph on a CPU profile (float32 activations: the exporter keeps the
          weights float32 there and says so), so fp16 is fp32's size on the CPU.
KV cache  `buffers x 2 (keys, values) x layers x kv_heads x head_dim x context x dtype
          bytes`; buffers is 1 for the `gqa-shared-kv` graph (one shared buffer) and 2
          for `optimum-kv-concat` (past and present ping-pong, kv_cache.py).
overhead  `RUNTIME_BYTES` (onnxruntime, the tokenizer's tables, Python) + the
          prefill's attention scores (`heads x chunk x context x 4 bytes`, the CPU
          GroupQueryAttention kernel's scratch) + logits (`rows x vocab x 4 bytes`)
          + with an int8 KV cache, one layer's float keys and values while a prompt
          attends (`2 x 2 x kv_heads x head_dim x context x 4 bytes`: the cache
          dequantized and the float present, export/kv_cache_quant.py) and every
          layer's int8 codes of a chunk's new rows, which the decoder copies into its
          buffers after the run (`2 x layers x kv_heads x head_dim x chunk` bytes).
          The fused graph is prefilled in chunks of `PREFILL_CHUNK` tokens and
          returns the last row's logits only; the optimum graph takes the whole
          prompt at once and returns every row.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .bundle import FLAVOUR_GQA_SHARED_KV, FLAVOUR_OPTIMUM_KV_CONCAT, Architecture, Bundle
from .errors import EdgeRuntimeError
from .profiles import EMBEDDING_BLOCK_SIZE, PRECISIONS, DeviceProfile

GiB = 1 << 30
MiB = 1 << 20
RUNTIME_BYTES = 256 * MiB
PREFILL_CHUNK = 512  # tokens per prefill run of the fused graph (engine.py passes it to the decoder)
DTYPE_BYTES = {"float32": 4, "float16": 2, "int8": 1}
BITS = {"int4": 4, "int8": 8}
TABLE_CONTEXTS = (16384, 8192, 4096, 2048, 1024)
# The fused bundle's files (export/graph_builder.py writes them so; written_file_bytes bounds them)
DATA_ALIGN_LARGE = 64 * 1024  # page/allocation-granularity alignment lets onnxruntime mmap big tensors
DATA_LARGE_TENSOR = 1 << 20
DATA_ALIGN_SMALL = 64
GRAPH_FILE_BYTES = 64 * 1024  # model.onnx: the nodes and the data file's references, measured
GRAPH_FILE_BYTES_PER_LAYER = 16 * 1024  # (tests/engine/test_memory_fit.py checks a written 7B-wide graph)


class MemoryBudgetExceeded(EdgeRuntimeError):
    """The bundle does not fit the profile's memory budget; the message has the numbers."""

    code = "memory_budget_exceeded"

    def __init__(self, plan: "MemoryPlan") -> None:
        super().__init__(f"{plan.describe()}: does not fit. Export a smaller precision, lower the context "
                         "(--max-context at export, or a profile with a smaller max_context), or use a "
                         "profile for a bigger device")
        self.plan = plan


# ------------------------------------------------------------------------------ the family
@dataclass(frozen=True)
class ModelShape:
    """A decoder-only Llama architecture (untied embeddings, SwiGLU MLP, no biases)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int

    @classmethod
    def from_config(cls, name: str, config: dict) -> "ModelShape":
        """The shape a Hugging Face Llama config.json describes."""
        heads = int(config["num_attention_heads"])
        return cls(name, int(config["hidden_size"]), int(config.get("intermediate_size") or 0),
                   int(config["num_hidden_layers"]), heads, int(config.get("num_key_value_heads") or heads),
                   int(config["vocab_size"]))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def linear_parameters(self) -> int:
        """Parameters of the decoder layers' MatMuls (what MatMulNBits quantizes)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        return self.num_layers * (2 * h * h + 2 * h * kv + 3 * h * self.intermediate_size)

    @property
    def parameter_count(self) -> int:
        """All parameters: embedding, layers (with their two RMSNorms), final norm, lm_head."""
        embed = self.vocab_size * self.hidden_size
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return 2 * embed + self.linear_parameters + norms


# The published Code Llama architectures (config.json of the Hugging Face checkpoints).
CODE_LLAMA_SHAPES: dict[str, ModelShape] = {
    "7B": ModelShape("7B", 4096, 11008, 32, 32, 32, 32016),
    "13B": ModelShape("13B", 5120, 13824, 40, 40, 40, 32016),
    "34B": ModelShape("34B", 8192, 22016, 48, 64, 8, 32000),
    "70B": ModelShape("70B", 8192, 28672, 80, 64, 8, 32016),
}


def size_class(*, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
               intermediate_size: int | None = None) -> str:
    """"7B", "13B", "34B" or "70B" when the architecture is that member's, else "custom"."""
    for name, s in CODE_LLAMA_SHAPES.items():
        if (hidden_size, num_layers, num_heads, num_kv_heads) == (s.hidden_size, s.num_layers, s.num_heads,
                                                                   s.num_kv_heads) \
                and intermediate_size in (None, s.intermediate_size):
            return name
    return "custom"


# ------------------------------------------------------------------------------ the terms
def kv_cache_bytes(*, num_layers: int, num_kv_heads: int, head_dim: int, context: int, dtype_bytes: int,
                   buffers: int = 1) -> int:
    """`buffers x 2 (keys, values) x layers x kv_heads x head_dim x context x dtype bytes`."""
    return buffers * 2 * num_layers * num_kv_heads * head_dim * context * dtype_bytes


def overhead_bytes(*, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int, vocab_size: int,
                   context: int, flavour: str, kv_dtype: str) -> int:
    """Runtime + prefill attention scratch + logits (+ an int8 cache's float prompt
    keys and values; see the module docstring)."""
    if flavour == FLAVOUR_GQA_SHARED_KV:
        chunk, logit_rows = min(PREFILL_CHUNK, context), 1
    else:
        chunk, logit_rows = context, context
    prompt_kv = 0
    if kv_dtype == "int8":  # one layer's float keys and values + every layer's new codes (staged)
        prompt_kv = 2 * 2 * num_kv_heads * head_dim * context * 4 + 2 * num_layers * num_kv_heads * head_dim * chunk
    return RUNTIME_BYTES + num_heads * chunk * context * 4 + logit_rows * vocab_size * 4 + prompt_kv


def kv_dtype_of(precision: str, flavour: str, profile_kv_dtype: str, kv_bits: int = 0) -> str:
    """The dtype of the KV cache of a graph the exporter makes (``kv_bits`` 0: also the
    activations' dtype).

    optimum-kv-concat: float16 for fp16 bundles (everything converted), float32 otherwise.
    gqa-shared-kv: float32 for fp32 bundles; otherwise int8 where the profile's
    ``kv_cache.bits`` is 8, else the profile's KV dtype."""
    if flavour == FLAVOUR_OPTIMUM_KV_CONCAT:
        return "float16" if precision == "fp16" else "float32"
    if precision == "fp32":
        return "float32"
    return "int8" if kv_bits == 8 else profile_kv_dtype


def fused_attention_refusal(profile: DeviceProfile, precision: str, kv_dtype: str) -> str | None:
    """Why the exporter refuses a fused graph (``gqa-shared-kv``) with a KV cache of ``kv_dtype``
    for ``profile`` (None: it does not): CUDA's GroupQueryAttention takes float16 only, and a
    float32 or int8 cache would put attention on the CPU, a copy of the cache at every step.
    The export's check and the fit table's "refused" cells are this one rule."""
    if kv_dtype == "float16" or all(name == "CPUExecutionProvider" for name in profile.provider_names):
        return None
    problem = ("--precision fp32 keeps the KV cache in float32" if precision == "fp32" else
               "an int8 KV cache (--kv-cache-bits 8, or the profile's kv_cache.bits)" if kv_dtype == "int8" else
               f"the profile's kv_cache.dtype {profile.kv_cache.dtype}")
    return (f"{problem}, but the {profile.name} profile runs on the GPU, where the fused graph's "
            "GroupQueryAttention takes float16 only")


def _nbits_tensors(k: int, n: int, bits: int, block: int, fbytes: int, symmetric: bool) -> list[int]:
    """Bytes of a [K, N] weight in `bits`-bit blocks of `block` (MatMulNBits' B and
    GatherBlockQuantized's table alike): the codes, the scales, the zero points (asymmetric)."""
    blocks = -(-k // block)
    sizes = [n * blocks * block * bits // 8, n * blocks * fbytes]
    return sizes if symmetric else [*sizes, n * -(-blocks * bits // 8)]


def weight_tensor_bytes(shape: ModelShape, precision: str, *, block_size: int, symmetric: bool,
                        float_dtype: str, keep_bits: int = 0, keep_block_size: int = 0,
                        head_two_pass: bool = False, embedding_bits: int = 0) -> list[int]:
    """The sizes of the weight tensors the fused graph's builder writes for `shape` at
    `precision` (export/graph_builder.py: q/k/v packed in one MatMul, gate and up apart),
    in its order: embedding, each layer's norms and MatMuls, final norm, lm_head.
    `keep_bits` 8: the kept lm_head is stored as int8 blocks (of `keep_block_size`, 0:
    `block_size`) instead of float; `head_two_pass`: and as int4 blocks beside them (the
    lm_head in two passes, the profile's lm_head_refine_top_k); `embedding_bits` 8: the token
    embedding table as int8 blocks (of EMBEDDING_BLOCK_SIZE) instead of float."""
    h, inter, vocab = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    kv = shape.num_kv_heads * shape.head_dim
    fbytes = DTYPE_BYTES[float_dtype]
    quantized = precision in BITS
    # fp16 in the graph's float type (float32 activations keep float32 weights), fp32 in 4 bytes
    wbytes = 4 if precision == "fp32" else fbytes
    matrices = [(h, h + 2 * kv), (h, h), (h, inter), (h, inter), (inter, h)]  # (K, N): qkv, o, gate, up, down

    def matrix(k: int, n: int) -> list[int]:
        if quantized:
            return _nbits_tensors(k, n, BITS[precision], block_size, fbytes, symmetric)
        return [k * n * wbytes]

    if quantized and embedding_bits:
        embedding = _nbits_tensors(h, vocab, embedding_bits, EMBEDDING_BLOCK_SIZE, fbytes, symmetric)
    else:
        embedding = [vocab * h * wbytes]
    layer = [h * wbytes, h * wbytes, *(size for k, n in matrices for size in matrix(k, n))]
    if quantized and keep_bits:
        head = _nbits_tensors(h, vocab, keep_bits, keep_block_size or block_size, fbytes, symmetric)
        if head_two_pass:
            head = [*_nbits_tensors(h, vocab, BITS[precision], block_size, fbytes, symmetric), *head]
    else:
        head = [h * vocab * wbytes]
    return [*embedding, *layer * shape.num_layers, h * wbytes, *head]


def estimate_weight_bytes(shape: ModelShape, precision: str, *, block_size: int, symmetric: bool,
                          float_dtype: str, keep_bits: int = 0, keep_block_size: int = 0,
                          head_two_pass: bool = False, embedding_bits: int = 0) -> int:
    """Bytes of the graph's weights for `shape` at `precision` (see the module docstring and
    `weight_tensor_bytes`)."""
    return sum(weight_tensor_bytes(shape, precision, block_size=block_size, symmetric=symmetric,
                                   float_dtype=float_dtype, keep_bits=keep_bits, keep_block_size=keep_block_size,
                                   head_two_pass=head_two_pass, embedding_bits=embedding_bits))


def data_file_padding(nbytes: int, offset: int) -> int:
    """The zero bytes the external data file gets before a tensor of `nbytes` written at
    `offset`: tensors of DATA_LARGE_TENSOR bytes or more start on DATA_ALIGN_LARGE (onnxruntime
    maps them in place), the others on DATA_ALIGN_SMALL."""
    return -offset % (DATA_ALIGN_LARGE if nbytes >= DATA_LARGE_TENSOR else DATA_ALIGN_SMALL)


def written_file_bytes(tensors: Sequence[int], *, head_dim: int, context: int, float_dtype: str,
                       num_layers: int) -> int:
    """What a written fused bundle holds besides `tensors` (its weights), at most: the rotary
    tables (cos and sin, [context, head_dim / 2] in the float type), the data file's alignment
    before each tensor (the most `data_file_padding` can add: the offsets depend on the order
    of writing) and the graph file (GRAPH_FILE_BYTES + GRAPH_FILE_BYTES_PER_LAYER a layer)."""
    rotary = [context * (head_dim // 2) * DTYPE_BYTES[float_dtype]] * 2
    padding = sum((DATA_ALIGN_LARGE if n >= DATA_LARGE_TENSOR else DATA_ALIGN_SMALL) - 1 for n in [*rotary, *tensors])
    return sum(rotary) + padding + GRAPH_FILE_BYTES + GRAPH_FILE_BYTES_PER_LAYER * num_layers


# ------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class MemoryPlan:
    what: str  # the bundle or family member
    profile: str
    precision: str
    context: int
    kv_dtype: str
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    budget_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def describe(self) -> str:
        op = "<=" if self.fits else ">"
        return (f"{self.what} ({self.precision}) on profile {self.profile}: weights {gib(self.weights_bytes)} + "
                f"KV cache {gib(self.kv_cache_bytes)} ({self.context} tokens, {self.kv_dtype}) + overhead "
                f"{gib(self.overhead_bytes)} = {gib(self.total_bytes)} {op} memory budget {gib(self.budget_bytes)}")

    def as_dict(self) -> dict:
        return {"what": self.what, "profile": self.profile, "precision": self.precision, "context": self.context,
                "kv_dtype": self.kv_dtype, "weights_bytes": self.weights_bytes,
                "kv_cache_bytes": self.kv_cache_bytes, "overhead_bytes": self.overhead_bytes,
                "total_bytes": self.total_bytes, "budget_bytes": self.budget_bytes, "fits": self.fits}


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def human_bytes(n: float) -> str:
    """A size in the largest binary unit under 1024 of it: 512 B, 1.5 KiB, ... 4.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def bundle_weight_bytes(bundle: Bundle) -> int:
    """Bytes of the files that hold the graph and its weights (everything listed in
    bundle.json except the tokenizer and the licence files)."""
    other = {bundle.tokenizer_path.relative_to(bundle.root).as_posix(), *bundle.manifest.get("licence_files", ())}
    return sum(int(f["size"]) for f in bundle.manifest["files"] if f["path"] not in other)


def engine_context_limit(bundle: Bundle, profile: DeviceProfile) -> int:
    """The longest context the engine runs `bundle` at with `profile`: the bundle's limit
    capped by the profile's max_context."""
    return min(bundle.context_limit, profile.max_context)


def bundle_kv_dtype(bundle: Bundle, default: str) -> str:
    """The dtype of the bundle's KV cache, from its manifest (`default`, the profile's, where
    the manifest names none)."""
    export_kv = str((bundle.manifest.get("profile") or {}).get("kv_cache_dtype") or default)
    return kv_dtype_of(bundle.precision, bundle.graph_flavour, export_kv)


def bundle_plan(bundle: Bundle, profile: DeviceProfile, context: int | None = None) -> MemoryPlan:
    """The memory plan of `bundle` run with `profile` at `context` tokens (default: the
    engine's context limit, the bundle's capped by the profile's)."""
    if context is None:
        context = engine_context_limit(bundle, profile)
    arch: Architecture = bundle.architecture
    kv_dtype = bundle_kv_dtype(bundle, profile.kv_cache.dtype)
    buffers = 1 if bundle.graph_flavour == FLAVOUR_GQA_SHARED_KV else 2
    return MemoryPlan(
        what=bundle.model_name, profile=profile.name, precision=bundle.precision, context=context,
        kv_dtype=kv_dtype, weights_bytes=bundle_weight_bytes(bundle),
        kv_cache_bytes=kv_cache_bytes(num_layers=arch.num_layers, num_kv_heads=arch.num_kv_heads,
                                      head_dim=arch.head_dim, context=context, dtype_bytes=DTYPE_BYTES[kv_dtype],
                                      buffers=buffers),
        overhead_bytes=overhead_bytes(num_layers=arch.num_layers, num_heads=arch.num_heads,
                                      vocab_size=arch.vocab_size, context=context, flavour=bundle.graph_flavour,
                                      kv_dtype=kv_dtype, num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim),
        budget_bytes=profile.memory_budget_bytes)


def check_bundle_fits(bundle: Bundle, profile: DeviceProfile, context: int | None = None) -> MemoryPlan:
    """The plan, or MemoryBudgetExceeded (naming weights, KV cache, overhead and budget)."""
    plan = bundle_plan(bundle, profile, context)
    if not plan.fits:
        raise MemoryBudgetExceeded(plan)
    return plan


def estimate_plan(shape: ModelShape, profile: DeviceProfile, precision: str, context: int, *,
                  flavour: str = FLAVOUR_GQA_SHARED_KV, kv_bits: int | None = None, algorithm: str | None = None,
                  what: str | None = None) -> MemoryPlan:
    """The plan of a family member (or, named `what`, a checkpoint of `shape`) exported for
    `profile` at `precision` (estimated weights); `kv_bits` and `algorithm` (default: the
    profile's) as `export --kv-cache-bits` and `--algorithm` override them."""
    activations = kv_dtype_of(precision, flavour, profile.kv_cache.dtype)
    kv_dtype = kv_dtype_of(precision, flavour, profile.kv_cache.dtype,
                           profile.kv_cache.bits if kv_bits is None else kv_bits)
    q = profile.quantization
    float_dtype = activations  # the graph's float type: fp16 on a CPU profile's fused graph stays float32
    quantized = precision in BITS
    fused = flavour == FLAVOUR_GQA_SHARED_KV
    tensors = weight_tensor_bytes(
        shape, precision, block_size=q.block_size if fused else q.optimum_graph_block_size, symmetric=q.symmetric,
        float_dtype=float_dtype, keep_bits=q.keep_bits if fused else 0, keep_block_size=q.kept_block_size,
        head_two_pass=fused and bool(q.head_refine_top_k_for(precision, float_dtype, algorithm or q.algorithm)),
        embedding_bits=q.embedding_bits_for(float_dtype) if fused and quantized else 0)
    return MemoryPlan(
        what=what or f"Code Llama {shape.name}", profile=profile.name, precision=precision, context=context,
        kv_dtype=kv_dtype,
        weights_bytes=sum(tensors) + (written_file_bytes(tensors, head_dim=shape.head_dim, context=context,
                                                         float_dtype=float_dtype, num_layers=shape.num_layers)
                                      if fused else 0),
        kv_cache_bytes=kv_cache_bytes(num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads,
                                      head_dim=shape.head_dim, context=context, dtype_bytes=DTYPE_BYTES[kv_dtype],
                                      buffers=1 if flavour == FLAVOUR_GQA_SHARED_KV else 2),
        overhead_bytes=overhead_bytes(num_layers=shape.num_layers, num_heads=shape.num_heads,
                                      vocab_size=shape.vocab_size, context=context, flavour=flavour,
                                      kv_dtype=kv_dtype, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim),
        budget_bytes=profile.memory_budget_bytes)


def largest_context_that_fits(plan_at, upto: int, least: int = 16) -> int | None:
    """The largest context in [least, upto] whose `plan_at(context)` fits (plans grow with the
    context), or None."""
    if not plan_at(least).fits:
        return None
    lo, hi = least, upto
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if plan_at(mid).fits else (lo, mid - 1)
    return lo


def largest_fitting_context(shape: ModelShape, profile: DeviceProfile, precision: str,
                            contexts: Iterable[int] = TABLE_CONTEXTS, *,
                            flavour: str = FLAVOUR_GQA_SHARED_KV) -> MemoryPlan | None:
    """The plan at the largest of `contexts` (capped by the profile's max_context) that fits."""
    for context in sorted({min(c, profile.max_context) for c in contexts}, reverse=True):
        plan = estimate_plan(shape, profile, precision, context, flavour=flavour)
        if plan.fits:
            return plan
    return None


REFUSED = "refused"  # a fit table cell: the exporter refuses this precision for this profile and graph
REFUSED_NOTE = (f"{REFUSED}: the export refuses it: the fused graph on a GPU profile takes a float16 KV cache only "
                "(fp32 keeps a float32 one); `--graph optimum` exports it (`fit --table --graph optimum`)")


def export_refusal(profile: DeviceProfile, precision: str, flavour: str = FLAVOUR_GQA_SHARED_KV) -> str | None:
    """Why `edge-runtime export` refuses `precision` for `profile` with the `flavour` graph and
    the profile's own KV cache settings (None: it does not)."""
    if flavour != FLAVOUR_GQA_SHARED_KV:
        return None
    return fused_attention_refusal(profile, precision,
                                   kv_dtype_of(precision, flavour, profile.kv_cache.dtype, profile.kv_cache.bits))


def fit_table(profiles: Sequence[DeviceProfile], precisions: Sequence[str] = PRECISIONS, *,
              flavour: str = FLAVOUR_GQA_SHARED_KV, markdown: bool = False) -> str:
    """Rows: family member x precision; columns: profiles; a cell is the largest context
    (of TABLE_CONTEXTS, capped by the profile) that fits, with the total, or "no", or
    "refused" where the exporter refuses the precision for the profile (`export_refusal`)."""
    header = ["member", "params", "precision",
              *(f"{p.name} ({p.memory_budget_bytes / GiB:.0f} GiB, max {p.max_context})" for p in profiles)]
    rows = []
    for shape in CODE_LLAMA_SHAPES.values():
        for precision in precisions:
            cells = []
            for profile in profiles:
                if export_refusal(profile, precision, flavour):
                    cells.append(REFUSED)
                    continue
                plan = largest_fitting_context(shape, profile, precision, flavour=flavour)
                cells.append(f"{plan.context} ({plan.total_bytes / GiB:.1f} GiB)" if plan else "no")
            rows.append([shape.name, f"{shape.parameter_count / 1e9:.1f} B", precision, *cells])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


# ------------------------------------------------------------------------------ command
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--table", action="store_true",
                   help="the Code Llama family x packaged profiles x precision table (largest context that fits)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--graph", choices=["fused", "optimum"], default="fused",
                   help="graph flavour the table assumes (default fused: one KV buffer, chunked prefill)")
    p.add_argument("--bundle", help="check this bundle instead")
    p.add_argument("--profile", help="device profile for --bundle (default: the bundle's own)")
    p.add_argument("--context", type=int, help="context to check --bundle at (default: the engine's context limit)")


def run(args: argparse.Namespace) -> int:
    from .profiles import list_profiles, load_profile

    if args.bundle and args.table:
        print("error: give --table or --bundle, not both", file=sys.stderr)
        return 2
    if not args.bundle and (args.profile is not None or args.context is not None):
        print("error: --profile and --context go with --bundle (the table covers every packaged profile at the "
              "largest context that fits)", file=sys.stderr)
        return 2
    if args.bundle:
        from .bundle import load_bundle, manifest_profile_name

        profile = load_profile(args.profile or manifest_profile_name(args.bundle))  # before hashing the files
        bundle = load_bundle(args.bundle)
        limit = engine_context_limit(bundle, profile)
        if args.context is not None and not 1 <= args.context <= limit:
            print(f"error: --context {args.context}: the engine runs this bundle with {profile.name} at 1 to {limit} "
                  f"tokens (the bundle's context_limit {bundle.context_limit}, the profile's max_context "
                  f"{profile.max_context})", file=sys.stderr)
            return 2
        plan = bundle_plan(bundle, profile, args.context)
        refused = (bundle.graph_flavour == FLAVOUR_GQA_SHARED_KV
                   and fused_attention_refusal(profile, bundle.precision, plan.kv_dtype) is not None)
        if refused:  # the engine's check_kv_dtype_for_device: it would not start on the GPU
            print(plan.describe() + f": {'fits' if plan.fits else 'does NOT fit'}, but REFUSED: this bundle's KV "
                  f"cache is {plan.kv_dtype}, and {profile.name} runs on the GPU, where the fused graph's attention "
                  f"takes float16 only (export it for {profile.name}, or run it with a CPU profile)")
            return 1
        print(plan.describe() + (": fits" if plan.fits else ": does NOT fit"))
        return 0 if plan.fits else 1
    if not args.table:
        print("error: give --table or --bundle", file=sys.stderr)
        return 2
    flavour = FLAVOUR_GQA_SHARED_KV if args.graph == "fused" else FLAVOUR_OPTIMUM_KV_CONCAT
    table = fit_table(list_profiles(), flavour=flavour, markdown=args.markdown)
    print(table)
    if REFUSED in table.split():
        print(f"\n{REFUSED_NOTE}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_runtime.memory_fit", description=__doc__.split("\n")[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except EdgeRuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
