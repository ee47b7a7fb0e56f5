"""Build the `gqa-shared-kv` decoder graph straight from a checkpoint's safetensors.

No torch export: every weight is read lazily from the ``*.safetensors`` files,
converted (transposed, cast or block-quantized with onnxruntime's own
quantizer) and appended to the external data file ``model.onnx.data`` one
tensor -- or one slice of a tensor -- at a time, so peak memory stays around
one layer's weights even for a 7B checkpoint. The graph is written in the style
of onnxruntime-genai's model builder, with contrib ops that onnxruntime's CPU
and CUDA providers both implement:

====================  =========================================================
inputs                ``input_ids`` int64 [batch, seq];
                      ``past_key_values.{i}.key/value`` [batch, kv_heads,
                      max_seq, head_dim] -- ONE buffer per layer and k/v, as
                      long as the decoder's context (at most ``max_length``);
                      ``seqlens_k`` int32 [batch] (total length - 1);
                      ``total_sequence_length`` int32 scalar;
                      ``logits_start`` int64 [1], optional (an initializer
                      that is also an input, -1 unless fed): the first of
                      the positions whose logits are computed, from the end
outputs               ``logits`` float32 [batch, rows, vocab]: the last
                      position only (rows 1) unless ``logits_start`` says
                      -rows (drafted tokens verified in one run, generator.py);
                      ``present.{i}.key/value``: the same buffers as the past
                      inputs (bind one OrtValue to both: past_present_share_buffer)
embedding             Gather on the float table (GatherBlockQuantized on int8
                      blocks with ``embedding_bits``)
per layer             SimplifiedLayerNormalization (layer 0) or
                      SkipSimplifiedLayerNormalization (residual add fused);
                      q/k/v projection packed into one MatMul[NBits] whose
                      output is GroupQueryAttention's packed-QKV input
                      (do_rotary=1, rotary_interleaved=0, cos/sin caches
                      [max_length, head_dim/2] from rope_theta); o_proj;
                      SkipSimplifiedLayerNormalization; gate and up
                      MatMul[NBits]; SiLU as Sigmoid+Mul (onnxruntime fuses it
                      into QuickGelu(alpha=1)); Mul; down_proj
head                  Slice the last position(s) of the residual stream, final
                      SkipSimplifiedLayerNormalization, lm_head (float MatMul
                      when kept unquantized, else MatMulNBits; with
                      ``head_refine_top_k``, MatMulNBits int4 then TopK,
                      GatherBlockQuantized of those int8 rows, MatMul,
                      ScatterElements), Cast to float32 when activations are
                      float16
====================  =========================================================

Precisions: ``fp32`` and ``fp16`` keep every weight in that float type;
``int4``/``int8`` use MatMulNBits (block-wise along K, symmetric or with zero
points) with float32 activations unless ``io_dtype="float16"`` is asked for (the
CUDA provider's GroupQueryAttention exists only for float16/bfloat16, so GPU
bundles need float16 activations). The KV cache always has the activation
dtype. Logits are always float32: one Cast of [1, 1, vocab] per step is free
and the sampler then never converts.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.gqa_decoder import LOGITS_START  # optional input: -rows of logits to compute (default -1)
from edge_runtime.memory_fit import data_file_padding  # the alignment memory_fit's estimate bounds
from edge_runtime.profiles import LM_HEAD_NODE, node_matches  # keep_unquantized patterns against node names
from edge_runtime.profiles import EMBEDDING_BLOCK_SIZE  # the int8 embedding table's blocks (embedding_bits)

from .checkpoint import CheckpointInfo, read_safetensors_header, rope_parameters
from .gptq import InverseHessian, gptq_quantize, inverse_hessian

if TYPE_CHECKING:
    from .calibration import LayerwiseHessians

FLAVOUR = "gqa-shared-kv"
"""The graph flavour name recorded in bundles (``graph.flavour``)."""

GRAPH_FILE = "model.onnx"
DATA_SUFFIX = ".data"
OPSET = 21
IR_VERSION = 10
MS_DOMAIN = "com.microsoft"
PRECISIONS = ("int4", "int8", "fp16", "fp32")
BITS = {"int4": 4, "int8": 8}

# Graph I/O names (the decoder binds them by name).
INPUT_IDS = "input_ids"
SEQLENS_K = "seqlens_k"
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
LOGITS = "logits"
# Metadata keys written into the model (read back by edge_runtime.gqa_decoder).
META_FLAVOUR = "edge_runtime.graph_flavour"
META_MAX_LENGTH = "edge_runtime.max_length"
META_PRECISION = "edge_runtime.precision"
META_IO_DTYPE = "edge_runtime.io_dtype"

Precision = Literal["int4", "int8", "fp32", "fp16"]
IODType = Literal["float32", "float16"]
Progress = Callable[[str], None]

_CHUNK_BYTES = 64 << 20  # float32 working set of one conversion slice
_ROUNDING_THREADS = 4  # round-to-nearest slices in flight (memory: up to this many float32 slices)
_MIN_TASK_ROWS = 256  # rows of a weight per rounding task, at least


class GraphBuildError(EdgeRuntimeError, ValueError):
    """The checkpoint cannot be expressed as a `gqa-shared-kv` graph (the message says why)."""


def past_key_name(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value_name(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key_name(layer: int) -> str:
    return f"present.{layer}.key"


def present_value_name(layer: int) -> str:
    return f"present.{layer}.value"


# -- reading safetensors lazily --------------------------------------------------------------------
# how each float dtype the checkpoint check lets through (checkpoint.FLOAT_DTYPES) is stored
_ST_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # converted to float32 by shifting into the high half
    "F64": np.dtype("<f8"),
}


@dataclass(frozen=True)
class _TensorLocation:
    file: Path
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`


class SafetensorsReader:
    """Reads tensors (or row ranges of them) from ``*.safetensors`` files on demand.

    The safetensors header (8-byte little-endian length, then JSON with each
    tensor's dtype, shape and byte range) is parsed here, so bfloat16 works
    without torch and a read allocates exactly the array it returns (no mmap
    pages linger in the resident set).
    """

    def __init__(self, files: Sequence[Path]) -> None:
        self._index: dict[str, _TensorLocation] = {}
        for file in files:
            header, base = read_safetensors_header(file)
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                if entry["dtype"] not in _ST_DTYPES:
                    raise GraphBuildError(f"{file.name}: tensor {name} has dtype {entry['dtype']}, "
                                          f"not one of {', '.join(_ST_DTYPES)}")
                begin, _end = entry["data_offsets"]
                self._index[name] = _TensorLocation(file, entry["dtype"], tuple(entry["shape"]), base + begin)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def shape(self, name: str) -> tuple[int, ...]:
        return self._location(name).shape

    def _location(self, name: str) -> _TensorLocation:
        try:
            return self._index[name]
        except KeyError:
            raise GraphBuildError(f"tensor {name} is missing from the checkpoint's safetensors files") from None

    def read(self, name: str, rows: tuple[int, int] | None = None, *, raw: bool = False) -> np.ndarray:
        """The tensor (or rows [r0, r1) of its first axis) as float32, or in its
        stored dtype with ``raw`` (bfloat16 then comes back as float32 anyway)."""
        loc = self._location(name)
        dtype = _ST_DTYPES[loc.dtype]
        shape = loc.shape
        row_elems = math.prod(shape[1:]) if len(shape) > 1 else 1
        offset = loc.offset
        if rows is not None:
            r0, r1 = rows
            offset += r0 * row_elems * dtype.itemsize
            shape = (r1 - r0, *shape[1:])
        count = math.prod(shape)
        data = np.fromfile(loc.file, dtype=dtype, count=count, offset=offset).reshape(shape)
        if loc.dtype == "BF16":
            return (data.astype(np.uint32) << 16).view(np.float32)
        if raw:
            return data
        return data.astype(np.float32, copy=False)


# -- the external data file --------------------------------------------------------------------------
class ExternalDataWriter:
    """Appends tensors to one external data file and makes the TensorProtos that point into it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = path.name
        self._file = open(path, "wb")
        self._offset = 0

    def close(self) -> None:
        self._file.close()

    def _align(self, nbytes: int) -> None:
        pad = data_file_padding(nbytes, self._offset)
        if pad:
            self._file.write(b"\0" * pad)
            self._offset += pad

    def _proto(self, name: str, dtype: np.dtype, shape: Sequence[int], offset: int, length: int):
        from onnx import TensorProto, helper

        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        tensor.dims.extend(int(d) for d in shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    def add(self, name: str, array: np.ndarray):
        """Write one whole array; returns its TensorProto."""
        return self.add_chunks(name, array.dtype, array.shape, iter((array,)))

    def add_chunks(self, name: str, dtype: np.dtype, shape: Sequence[int], chunks: Iterator[np.ndarray]):
        """Write a tensor given as consecutive C-order pieces (only one is in memory at a time)."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        self._align(nbytes)
        start = self._offset
        for chunk in chunks:
            if chunk.dtype != dtype:
                raise AssertionError(f"{name}: chunk dtype {chunk.dtype} != {dtype}")
            data = np.ascontiguousarray(chunk)
            self._file.write(memoryview(data).cast("B"))
            self._offset += data.nbytes
        if self._offset - start != nbytes:
            raise AssertionError(f"{name}: wrote {self._offset - start} bytes, expected {nbytes}")
        return self._proto(name, dtype, shape, start, nbytes)


# -- block quantization (onnxruntime's own kernels, so the layout is MatMulNBits') -------------------
@dataclass(frozen=True)
class BlockQuantized:
    """A [K, N] weight quantized for MatMulNBits: B [N, k_blocks, blob], scales [N, k_blocks],
    zero_points [N, ceil(k_blocks * bits / 8)] (None when symmetric)."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None


def _padded_to_blocks(weight_kn: np.ndarray, *, bits: int, block_size: int) -> tuple[np.ndarray, int]:
    """The [K, N] weight zero-padded along K to whole blocks, and the block count (after
    checking ``bits`` and ``block_size`` are what MatMulNBits takes)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, not {block_size}")
    k = weight_kn.shape[0]
    k_blocks = (k + block_size - 1) // block_size
    pad = k_blocks * block_size - k
    return (weight_kn if not pad else np.pad(weight_kn, ((0, pad), (0, 0)))), k_blocks


def block_quantize(weight_kn: np.ndarray, *, bits: int, block_size: int, symmetric: bool) -> BlockQuantized:
    """Quantize a float32/float16 weight of shape [K, N] (MatMul's B) block-wise along K
    with ``onnxruntime.capi._pybind_state.quantize_matmul_{4,8}bits`` -- the functions
    onnxruntime's MatMulNBitsQuantizer calls. Scales come out in the weight's dtype."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    k, n = weight_kn.shape
    weight, k_blocks = _padded_to_blocks(weight_kn, bits=bits, block_size=block_size)
    weight = np.ascontiguousarray(weight)
    kpack = 8 // bits
    packed = np.zeros((n, k_blocks, block_size // kpack), dtype=np.uint8)
    scales = np.zeros((n, k_blocks), dtype=weight.dtype)
    zero_points = np.zeros((n, (k_blocks + kpack - 1) // kpack), dtype=np.uint8)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(packed, weight, scales, zero_points, block_size, n, k, symmetric)
    return BlockQuantized(packed, scales, None if symmetric else zero_points)


SCALE_SEARCH_STEPS = 16  # candidate ranges per block tried by block_quantize_mse
_SEARCH_ROWS = 256  # rows of N per task of the search (numpy releases the GIL: tasks run on every core)


def _inverse(scale: np.ndarray) -> np.ndarray:
    """1 / scale, and 0 where the scale is 0 (an all-zero block)."""
    return np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)


def _search_block_scales(w: np.ndarray, *, bits: int, symmetric: bool, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Per block of ``w`` [rows, blocks, block], the scale and zero point (float) of the
    candidate range whose round-to-nearest reconstruction has the least squared error."""
    qmax = float((1 << bits) - 1)
    half = float(1 << (bits - 1))
    if symmetric:  # the largest magnitude, with its sign, maps to -half (-8 of -8..7), as in llama.cpp's Q4_0
        amax_at = np.abs(w).argmax(axis=-1)[..., None]
        full = np.take_along_axis(w, amax_at, axis=-1)[..., 0] / -half
    else:
        lo, hi = np.minimum(w.min(axis=-1), 0.0), np.maximum(w.max(axis=-1), 0.0)
        full = (hi - lo) / qmax
    best_err = np.full(full.shape, np.inf, dtype=np.float32)
    best_scale = full.copy()
    best_zp = np.full(full.shape, half, dtype=np.float32)
    r = np.empty_like(w)
    q = np.empty_like(w)
    for factor in np.linspace(1.0, 0.7, steps, dtype=np.float32):
        scale = full * factor
        inv = _inverse(scale)
        zp = best_zp if symmetric else np.clip(np.rint(-lo * inv), 0, qmax).astype(np.float32)
        np.multiply(w, inv[..., None], out=r)
        r += zp[..., None]  # w / scale + zero point: the unrounded code
        np.rint(r, out=q)
        np.clip(q, 0, qmax, out=q)
        q -= r
        np.square(q, out=q)
        err = q.sum(axis=-1) * scale * scale
        better = err < best_err
        best_err[better] = err[better]
        best_scale[better] = scale[better]
        if not symmetric:
            best_zp[better] = zp[better]
    return best_scale, best_zp


def block_quantize_mse(weight_kn: np.ndarray, *, bits: int, block_size: int, symmetric: bool,
                       steps: int = SCALE_SEARCH_STEPS) -> BlockQuantized:
    """Like ``block_quantize`` (same MatMulNBits layout), but each block's scale (and zero
    point) is the one of ``steps`` candidate ranges -- the block's full range shrunk by up to
    30 % -- whose round-to-nearest reconstruction has the least squared error. Plain
    round-to-nearest spends the codes on the block's extremes; shrinking the range clips one
    or two outliers and rounds the many small weights more finely. Symmetric blocks map their
    largest magnitude to the extra negative code (-8 of -8..7; the scale is negative when that
    weight is positive). Row slices run on a thread pool (numpy releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    n = weight_kn.shape[1]
    w, k_blocks = _padded_to_blocks(np.asarray(weight_kn, dtype=np.float32), bits=bits, block_size=block_size)
    w = np.ascontiguousarray(w.T).reshape(n, k_blocks, block_size)  # [N, blocks, block]
    qmax = (1 << bits) - 1
    scales = np.empty((n, k_blocks), dtype=np.float32)
    zps = np.empty((n, k_blocks), dtype=np.float32)
    codes = np.empty(w.shape, dtype=np.uint8)

    dtype = weight_kn.dtype if weight_kn.dtype in (np.float16, np.float32) else np.float32

    def task(r0: int) -> None:
        part = w[r0:r0 + _SEARCH_ROWS]
        s, z = _search_block_scales(part, bits=bits, symmetric=symmetric, steps=steps)
        s = s.astype(dtype).astype(np.float32)  # the codes are rounded against the scale as stored
        codes[r0:r0 + _SEARCH_ROWS] = np.clip(np.rint(part * _inverse(s)[..., None]) + z[..., None], 0, qmax)
        scales[r0:r0 + _SEARCH_ROWS], zps[r0:r0 + _SEARCH_ROWS] = s, z

    starts = range(0, n, _SEARCH_ROWS)
    if len(starts) > 1:
        with ThreadPoolExecutor(max_workers=min(len(starts), os.cpu_count() or 1)) as pool:
            list(pool.map(task, starts))
    else:
        task(0)
    return pack_codes(codes, scales, zps, bits=bits, symmetric=symmetric, scale_dtype=dtype)


def pack_codes(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, *, bits: int, symmetric: bool,
               scale_dtype: np.dtype) -> BlockQuantized:
    """Codes [N, blocks, block] (0..2^bits-1), scales and zero points [N, blocks] in
    MatMulNBits' layout: two 4-bit codes a byte, low nibble first; zero points packed alike
    (dropped when ``symmetric``: MatMulNBits' default is the middle code)."""
    k_blocks = codes.shape[1]
    zp_codes = zero_points.astype(np.uint8)
    if bits == 4:
        packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
        zp_pairs = np.pad(zp_codes, ((0, 0), (0, k_blocks % 2)), constant_values=1 << (bits - 1))
        packed_zp = (zp_pairs[:, 0::2] | (zp_pairs[:, 1::2] << 4)).astype(np.uint8)
    else:
        packed, packed_zp = codes, zp_codes
    return BlockQuantized(np.ascontiguousarray(packed), scales.astype(scale_dtype),
                          None if symmetric else np.ascontiguousarray(packed_zp))


def dequantize_reference(q: BlockQuantized, k: int, *, bits: int, block_size: int) -> np.ndarray:
    """The float [K, N] weight a MatMulNBits node computes with (for tests)."""
    n, k_blocks, _ = q.packed.shape
    if bits == 4:
        low, high = q.packed & 0x0F, q.packed >> 4
        values = np.stack([low, high], axis=-1).reshape(n, k_blocks, block_size)
    else:
        values = q.packed.reshape(n, k_blocks, block_size)
    if q.zero_points is None:
        zp = np.full((n, k_blocks), 1 << (bits - 1), dtype=np.float32)
    elif bits == 4:
        zp = np.stack([q.zero_points & 0x0F, q.zero_points >> 4], axis=-1).reshape(n, -1)[:, :k_blocks]
    else:
        zp = q.zero_points[:, :k_blocks]
    w = (values.astype(np.float32) - zp[..., None].astype(np.float32)) * q.scales[..., None].astype(np.float32)
    return w.reshape(n, k_blocks * block_size)[:, :k].T


# -- rotary tables ---------------------------------------------------------------------------------------
def rotary_caches(head_dim: int, max_length: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [max_length, head_dim/2] for GroupQueryAttention (non-interleaved,
    i.e. Hugging Face's rotate_half: the first and second halves of a head form the pairs).
    inv_freq and the angles are float32 products as in transformers' LlamaRotaryEmbedding;
    cos/sin are evaluated in float64 and rounded once."""
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32)
                                             / np.float32(head_dim)))).astype(np.float32)
    angles = np.outer(np.arange(max_length, dtype=np.float32), inv_freq).astype(np.float32)
    return np.cos(angles.astype(np.float64)), np.sin(angles.astype(np.float64))


# -- the builder -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildOptions:
    """What `build_decoder_graph` was asked for.

    Packing (measured on 2 x86 cores, int4, 8 layers of 2048, accuracy level 4,
    decode steps alternated in one process): q/k/v in one MatMulNBits, gate+up in
    one plus a Split, and all separate were within noise of each other (about 22
    tok/s decode at context 128, 88-94 tok/s prefill with one thread). q/k/v stay
    packed by default -- GroupQueryAttention takes the packed output directly, so
    it is one node instead of three with nothing added -- and gate/up stay
    separate (packing them adds a Split copy for nothing measurable)."""

    precision: Precision
    block_size: int
    symmetric: bool
    accuracy_level: int
    keep_unquantized: tuple[str, ...]
    max_length: int
    io_dtype: IODType
    pack_qkv: bool = True
    pack_gate_up: bool = False
    # the optional logits_start input (prompt lookup's runs of several rows, on the CPU); without it
    # the last position's Slice has a constant start, as graphs had before the input existed
    logits_start_input: bool = True
    keep_bits: int | None = None
    keep_block_size: int | None = None  # the kept layers' block size (None: block_size)
    scale_search: bool = False  # least-squares block scales (block_quantize_mse) instead of round-to-nearest
    head_refine_top_k: int = 0  # > 0: the lm_head in two passes (int4, then its top k logits from int8 rows)
    # 8: the token embedding table as int8 blocks of EMBEDDING_BLOCK_SIZE (GatherBlockQuantized); None: float
    embedding_bits: int | None = None

    @property
    def bits(self) -> int | None:
        return BITS.get(self.precision)

    @property
    def float_dtype(self) -> np.dtype:
        return np.dtype(np.float16 if self.io_dtype == "float16" else np.float32)


class _Builder:
    def __init__(self, info: CheckpointInfo, out_path: Path, opts: BuildOptions, progress: Progress | None,
                 hessians: LayerwiseHessians | None = None) -> None:
        from onnx import TensorProto

        self.info = info
        self.hessians = hessians
        self._hinv: tuple[np.ndarray, InverseHessian] | None = None  # the last Hessian and its inverse
        # GPTQ's time by part, said at the end (where a 7B's export hour goes)
        self.gptq_seconds = {"calibration": 0.0, "Hessian inverses": 0.0, "column loops": 0.0}
        self.arch = info.architecture
        self.opts = opts
        self.progress = progress
        self.reader = SafetensorsReader(info.weight_files)
        self.data = ExternalDataWriter(out_path.with_name(out_path.name + DATA_SUFFIX))
        self.nodes: list = []
        self.initializers: list = []
        self.quantized_nodes: list[str] = []
        self.float_nodes: list[str] = []
        self.kept_nodes: list[str] = []  # matched keep_unquantized, stored at keep_bits
        self.elem = TensorProto.FLOAT16 if opts.io_dtype == "float16" else TensorProto.FLOAT

    # -- primitives
    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str], name: str, *, domain: str = "",
             **attrs) -> None:
        from onnx import helper

        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, domain=domain or None,
                                           **attrs))

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.data.add(name, np.ascontiguousarray(array)))
        return name

    def inline_const(self, name: str, array: np.ndarray) -> str:
        """A tiny shape-like constant stored in the graph itself (shape inference reads it)."""
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def float_weight(self, name: str, array: np.ndarray) -> str:
        return self.const(name, array.astype(self.opts.float_dtype))

    # -- linear layers: x [.., K] @ concat(parts).T -> [.., N]
    def _kn(self, parts: Sequence[str], node_name: str) -> tuple[int, int]:
        """K and N of x @ concat(parts).T: the parts' shared input width and summed rows."""
        shapes = [self.reader.shape(p) for p in parts]
        k = shapes[0][1]
        if any(len(s) != 2 or s[1] != k for s in shapes):
            raise GraphBuildError(f"{node_name}: weights {parts} have incompatible shapes {shapes}")
        return k, sum(s[0] for s in shapes)

    def linear(self, x: str, parts: Sequence[str], node_name: str, out: str) -> str:
        k, n = self._kn(parts, node_name)
        bits = self.opts.bits
        if bits is not None and not node_matches(node_name, self.opts.keep_unquantized):
            self._quantized_linear(x, parts, node_name, out, k, n, bits, self.opts.block_size)
            self.quantized_nodes.append(node_name)
        elif bits is not None and self.opts.keep_bits:
            self._quantized_linear(x, parts, node_name, out, k, n, self.opts.keep_bits,
                                   self.opts.keep_block_size or self.opts.block_size)
            self.kept_nodes.append(node_name)
        else:
            self._float_linear(x, parts, node_name, out, k, n)
            self.float_nodes.append(node_name)
        return out

    def _float_linear(self, x: str, parts: Sequence[str], node_name: str, out: str, k: int, n: int) -> None:
        dtype = self.opts.float_dtype
        sources = [self.reader.read(p, raw=True) for p in parts]  # stored dtype: fp16 stays 2 bytes
        cols = max(1, _CHUNK_BYTES // (4 * n))

        def chunks() -> Iterator[np.ndarray]:  # rows k0:k1 of W.T = columns k0:k1 of W
            for k0 in range(0, k, cols):
                k1 = min(k, k0 + cols)
                yield np.concatenate([s[:, k0:k1] for s in sources], axis=0).T.astype(dtype)

        weight = f"{node_name}.weight"
        self.initializers.append(self.data.add_chunks(weight, dtype, (k, n), chunks()))
        self.node("MatMul", [x, weight], [out], node_name)

    def _quantized_linear(self, x: str, parts: Sequence[str], node_name: str, out: str, k: int, n: int,
                          bits: int, block: int) -> None:
        b_name, scales, zero_points = self._quantized_weight(parts, node_name, k, n, bits, block)
        inputs = [x, b_name, self.const(f"{node_name}.weight_scales", scales)]
        if zero_points is not None:
            inputs.append(self.const(f"{node_name}.weight_zero_points", zero_points))
        attrs = {"K": k, "N": n, "bits": bits, "block_size": block}
        if self.opts.accuracy_level:
            attrs["accuracy_level"] = self.opts.accuracy_level
        self.node("MatMulNBits", inputs, [out], node_name + f"_Q{bits}", domain=MS_DOMAIN, **attrs)

    def _quantized_weight(self, parts: Sequence[str], node_name: str, k: int, n: int, bits: int,
                          block: int, *, flat: bool = False,
                          error_feedback: bool = True) -> tuple[str, np.ndarray, np.ndarray | None]:
        """Quantize concat(parts) [N, K] block-wise and stream its codes into the data file as
        ``{node_name}.weight_Q{bits}`` ([N, blocks, block*bits/8] uint8, MatMulNBits' B; with
        ``flat``, [N, blocks*block*bits/8], GatherBlockQuantized's data); returns that name, the
        scales [N, blocks] and the zero points (None when symmetric). ``error_feedback`` False
        rounds each block on its own even where GPTQ runs (a table that is gathered, not
        multiplied: its rows have no input whose Hessian could steer the rounding)."""
        opts = self.opts
        dtype = opts.float_dtype
        k_blocks = (k + block - 1) // block
        kpack = 8 // bits
        rows_per_chunk = max(1, _CHUNK_BYTES // (4 * k))
        scales: list[np.ndarray] = []
        zero_points: list[np.ndarray] = []
        hinv = self._inverse_hessian(parts[0]) if self.hessians is not None and error_feedback else None

        def quantize_rows(task: tuple[str, int, int]) -> BlockQuantized:
            part, r0, r1 = task
            if hinv is not None:
                t0 = time.perf_counter()
                q = gptq_quantize(self.reader.read(part, (r0, r1)), hinv, bits=bits, block_size=block,
                                  symmetric=opts.symmetric, scale_search=opts.scale_search, scale_dtype=dtype)
                self.gptq_seconds["column loops"] += time.perf_counter() - t0
                return q
            w_kn = np.ascontiguousarray(self.reader.read(part, (r0, r1)).T.astype(dtype))
            quantize = block_quantize_mse if opts.scale_search else block_quantize
            return quantize(w_kn, bits=bits, block_size=block, symmetric=opts.symmetric)

        def packed_chunks() -> Iterator[np.ndarray]:  # rows of the output dimension N, part by part
            """Slices of rows, quantized and yielded in order. Round to nearest runs them on a
            thread pool: the reads, fp16 -> fp32 casts and transposes (numpy releases the GIL)
            overlap onnxruntime's quantizer, which holds the GIL but uses every core itself.
            GPTQ (its timers) and the scale search (a thread pool of its own) go one at a time."""
            pooled = hinv is None and not opts.scale_search
            workers = min(_ROUNDING_THREADS, os.cpu_count() or 1) if pooled else 1
            tasks = []
            for part in parts:
                rows = self.reader.shape(part)[0]
                step = min(rows_per_chunk, max(_MIN_TASK_ROWS, -(-rows // workers)))
                tasks += [(part, r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for q in pool.map(quantize_rows, tasks) if pooled else map(quantize_rows, tasks):
                    scales.append(q.scales)
                    if q.zero_points is not None:
                        zero_points.append(q.zero_points)
                    yield q.packed

        b_name = f"{node_name}.weight_Q{bits}"
        shape = (n, k_blocks * block // kpack) if flat else (n, k_blocks, block // kpack)
        self.initializers.append(self.data.add_chunks(b_name, np.uint8, shape, packed_chunks()))
        return b_name, np.concatenate(scales), np.concatenate(zero_points) if zero_points else None

    def refined_head(self, x: str, parts: Sequence[str], node_name: str, out: str) -> str:
        """The lm_head in two passes: every logit from the int4 weights (MatMulNBits, the bytes
        of the other layers), then the ``head_refine_top_k`` largest recomputed from an int8 copy
        of the same weights (``keep_bits``, blocks of ``keep_block_size``), of which only those
        tokens' rows are read: GatherBlockQuantized (their codes, dequantized), one small MatMul,
        ScatterElements over the int4 logits. A decode step reads the int4 head's bytes plus
        ``k`` int8 rows; the tokens that decide greedy decoding and sampling get the int8 head's
        logits (docs/performance.md, "The lm_head in two passes")."""
        opts = self.opts
        k, n = self._kn(parts, node_name)
        top_k = min(opts.head_refine_top_k, n)
        at = node_name.rsplit("/", 1)[0]
        coarse = f"{at}/coarse/output"
        self._quantized_linear(x, parts, node_name, coarse, k, n, opts.bits, opts.block_size)
        block = opts.keep_block_size or opts.block_size
        codes, scales, zero_points = self._quantized_weight(parts, f"{at}/refine", k, n, 8, block, flat=True)

        def name(part: str) -> str:
            return f"{at}/refine/{part}"

        self.node("TopK", [coarse, self.inline_const(name("k"), np.array([top_k], dtype=np.int64))],
                  [name("top_values"), name("top_indices")], name("TopK"), axis=-1, largest=1, sorted=0)
        idx = name("top_indices")  # [batch, rows, k]
        rows = self._gathered_rows(f"{at}/refine", codes, idx, scales, zero_points, bits=8, block=block, k=k)
        last = self.inline_const(name("last_axis"), np.array([-1], dtype=np.int64))
        self.node("Unsqueeze", [x, last], [name("x_column")], name("Unsqueeze_x"))
        self.node("MatMul", [rows, name("x_column")], [name("dots")], name("MatMul"))
        self.node("Squeeze", [name("dots"), last], [name("logits")], name("Squeeze_dots"))
        self.node("ScatterElements", [coarse, idx, name("logits")], [out], name("ScatterElements"), axis=-1)
        self.quantized_nodes.append(node_name)
        self.kept_nodes.append(f"{at}/refine")
        return out

    def quantized_embedding(self, embed: str, vocab: int, hidden: int, out: str) -> None:
        """The token embedding table as int8 blocks along the hidden axis (``embedding_bits``;
        blocks of EMBEDDING_BLOCK_SIZE, the profile's symmetry; the lm_head's int8 copy's layout):
        the prompt's rows are gathered and dequantized by GatherBlockQuantized. 1.16 bytes a
        weight against a float32 table's 4, which are resident memory more than they are read: a
        step reads one row."""
        at, bits = "/model/embed_tokens", self.opts.embedding_bits
        codes, scales, zero_points = self._quantized_weight([embed], at, hidden, vocab, bits, EMBEDDING_BLOCK_SIZE,
                                                            flat=True, error_feedback=False)
        self._gathered_rows(at, codes, INPUT_IDS, scales, zero_points, bits=bits, block=EMBEDDING_BLOCK_SIZE,
                            k=hidden, out=out)

    def _gathered_rows(self, name: str, codes: str, indices: str, scales: np.ndarray, zero_points: np.ndarray | None,
                       *, bits: int, block: int, k: int, out: str | None = None) -> str:
        """The rows `indices` names of a table `_quantized_weight(flat=True)` stored as ``codes``,
        dequantized by GatherBlockQuantized (scales and zero points as ``{name}.weight_*``), the
        padding columns of its last block sliced off: [..., k] float; returns its name (``out``
        where given)."""
        table = [codes, indices, self.const(f"{name}.weight_scales", scales)]
        if zero_points is not None:  # else GatherBlockQuantized's default for uint8, 128: MatMulNBits' too
            table.append(self.const(f"{name}.weight_zero_points", zero_points))
        padded = scales.shape[1] * block != k
        rows = f"{name}/rows" if padded or out is None else out  # [..., blocks * block]
        self.node("GatherBlockQuantized", table, [rows], f"{name}/GatherBlockQuantized", domain=MS_DOMAIN,
                  bits=bits, block_size=block, gather_axis=0, quantize_axis=1)
        if not padded:
            return rows
        sliced = out or f"{name}/rows_k"
        self.node("Slice", [rows, self.inline_const(f"{name}/k_start", np.array([0], dtype=np.int64)),
                            self.inline_const(f"{name}/k_end", np.array([k], dtype=np.int64)),
                            self.inline_const(f"{name}/k_axis", np.array([-1], dtype=np.int64))],
                  [sliced], f"{name}/Slice_rows")
        return sliced

    def _inverse_hessian(self, weight: str) -> InverseHessian:
        """GPTQ's inverse Hessian of a weight's input: every part of a node and nodes that read
        the same input (gate and up) share one Hessian, inverted once."""
        t0 = time.perf_counter()
        hessian = self.hessians.for_weight(weight)  # runs the calibration of the next layer when due
        t1 = time.perf_counter()
        self.gptq_seconds["calibration"] += t1 - t0
        if self._hinv is None or self._hinv[0] is not hessian:
            self._hinv = (hessian, inverse_hessian(hessian))
            self.gptq_seconds["Hessian inverses"] += time.perf_counter() - t1
        return self._hinv[1]

    # -- norms
    def rms_norm(self, x: str, weight: str, node_name: str, out: str) -> str:
        w = self.float_weight(f"{node_name}.weight", self.reader.read(weight))
        self.node("SimplifiedLayerNormalization", [x, w], [out], node_name, axis=-1, epsilon=self.eps,
                  stash_type=1)
        return out

    def skip_rms_norm(self, x: str, skip: str, weight: str, node_name: str, out: str,
                      residual_out: str) -> tuple[str, str]:
        w = self.float_weight(f"{node_name}.weight", self.reader.read(weight))
        self.node("SkipSimplifiedLayerNormalization", [x, skip, w], [out, "", "", residual_out], node_name,
                  domain=MS_DOMAIN, epsilon=self.eps)
        return out, residual_out

    # -- the model
    @property
    def eps(self) -> float:
        return float(self.info.config.get("rms_norm_eps", 1e-6))

    def say(self, text: str) -> None:
        if self.progress:
            self.progress(text)

    def build(self):
        from onnx import TensorProto, helper

        arch, opts = self.arch, self.opts
        hd, kv_heads = arch.head_dim, arch.num_kv_heads

        cos, sin = rotary_caches(hd, opts.max_length, arch.rope_theta)
        cos_name = self.float_weight("cos_cache", cos)
        sin_name = self.float_weight("sin_cache", sin)

        self.say("embedding")
        embed = "model.embed_tokens.weight"
        vocab, hidden = self.reader.shape(embed)
        if opts.embedding_bits:
            self.quantized_embedding(embed, vocab, hidden, "/model/embed_tokens/output")
        else:
            rows = max(1, _CHUNK_BYTES // (4 * hidden))
            table = self.data.add_chunks(
                "model.embed_tokens.weight", opts.float_dtype, (vocab, hidden),
                (self.reader.read(embed, (r, min(vocab, r + rows))).astype(opts.float_dtype)
                 for r in range(0, vocab, rows)))
            self.initializers.append(table)
            self.node("Gather", [table.name, INPUT_IDS], ["/model/embed_tokens/output"],
                      "/model/embed_tokens/Gather")

        residual = "/model/embed_tokens/output"
        pending: str | None = None  # the last block's output, not yet added to the residual stream
        for layer in range(arch.num_layers):
            self.say(f"layer {layer + 1}/{arch.num_layers}")
            src = f"model.layers.{layer}"
            at = f"/model/layers.{layer}"
            if pending is None:
                h = self.rms_norm(residual, f"{src}.input_layernorm.weight", f"{at}/input_layernorm",
                                  f"{at}/input_layernorm/output")
            else:
                h, residual = self.skip_rms_norm(pending, residual, f"{src}.input_layernorm.weight",
                                                 f"{at}/input_layernorm", f"{at}/input_layernorm/output",
                                                 f"{at}/input_layernorm/residual")
            attn = self.attention(h, layer, src, at, cos_name, sin_name)
            h, residual = self.skip_rms_norm(attn, residual, f"{src}.post_attention_layernorm.weight",
                                             f"{at}/post_attention_layernorm",
                                             f"{at}/post_attention_layernorm/output",
                                             f"{at}/post_attention_layernorm/residual")
            pending = self.mlp(h, src, at)

        self.say("final norm and lm_head")
        assert pending is not None
        last = {}
        # with logits_start_input, also a graph input (below): an initializer a run may override
        starts = self.inline_const(LOGITS_START if opts.logits_start_input else "/model/last/starts",
                                   np.array([-1], dtype=np.int64))
        ends = self.inline_const("/model/last/ends", np.array([np.iinfo(np.int64).max], dtype=np.int64))
        axes = self.inline_const("/model/last/axes", np.array([1], dtype=np.int64))
        for key, tensor in (("block", pending), ("residual", residual)):
            last[key] = f"/model/last/{key}"
            self.node("Slice", [tensor, starts, ends, axes], [last[key]], f"/model/last/Slice_{key}")
        h, _ = self.skip_rms_norm(last["block"], last["residual"], "model.norm.weight", "/model/norm",
                                  "/model/norm/output", "/model/norm/residual")
        # as transformers (the fidelity reference) chooses: the embedding when config.json ties them,
        # even with a stale lm_head.weight beside it
        tied = bool(self.info.config.get("tie_word_embeddings", False))
        head_weight = "lm_head.weight" if "lm_head.weight" in self.reader and not tied else "model.embed_tokens.weight"
        head_out = LOGITS if opts.io_dtype == "float32" else "/lm_head/output"
        if opts.head_refine_top_k:
            self.refined_head(h, [head_weight], LM_HEAD_NODE, head_out)
        else:
            self.linear(h, [head_weight], LM_HEAD_NODE, head_out)
        if head_out != LOGITS:
            self.node("Cast", [head_out], [LOGITS], "/lm_head/Cast", to=TensorProto.FLOAT)
        if self.hessians is not None:
            self.say("GPTQ: " + ", ".join(f"{part} {sec:.1f} s" for part, sec in self.gptq_seconds.items()))

        kv_shape = ["batch_size", kv_heads, "max_sequence_length", hd]
        inputs = [helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch_size", "sequence_length"])]
        rows = "logits_rows" if opts.logits_start_input else 1
        outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch_size", rows, vocab])]
        for layer in range(arch.num_layers):
            for past, present in ((past_key_name(layer), present_key_name(layer)),
                                  (past_value_name(layer), present_value_name(layer))):
                inputs.append(helper.make_tensor_value_info(past, self.elem, kv_shape))
                outputs.append(helper.make_tensor_value_info(present, self.elem, kv_shape))
        inputs.append(helper.make_tensor_value_info(SEQLENS_K, TensorProto.INT32, ["batch_size"]))
        inputs.append(helper.make_tensor_value_info(TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, []))
        if opts.logits_start_input:  # an input with a default: the initializer above (an overridable initializer)
            inputs.append(helper.make_tensor_value_info(LOGITS_START, TensorProto.INT64, [1]))

        graph = helper.make_graph(self.nodes, f"{self.info.name}-{FLAVOUR}", inputs, outputs,
                                  initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid(MS_DOMAIN, 1)],
                                  producer_name="edge-runtime graph_builder", ir_version=IR_VERSION)
        helper.set_model_props(model, {
            META_FLAVOUR: FLAVOUR,
            META_MAX_LENGTH: str(opts.max_length),
            META_PRECISION: opts.precision,
            META_IO_DTYPE: opts.io_dtype,
        })
        return model

    def attention(self, h: str, layer: int, src: str, at: str, cos: str, sin: str) -> str:
        arch = self.arch
        q, k, v = (f"{src}.self_attn.{p}_proj.weight" for p in ("q", "k", "v"))
        if self.opts.pack_qkv:
            qkv = self.linear(h, [q, k, v], f"{at}/attn/qkv_proj/MatMul", f"{at}/attn/qkv_proj/output")
            gqa_in = [qkv, "", ""]
        else:
            gqa_in = [self.linear(h, [w], f"{at}/attn/{p}_proj/MatMul", f"{at}/attn/{p}_proj/output")
                      for w, p in ((q, "q"), (k, "k"), (v, "v"))]
        self.node("GroupQueryAttention",
                  [*gqa_in, past_key_name(layer), past_value_name(layer), SEQLENS_K, TOTAL_SEQUENCE_LENGTH,
                   cos, sin],
                  [f"{at}/attn/output", present_key_name(layer), present_value_name(layer)],
                  f"{at}/attn/GroupQueryAttention", domain=MS_DOMAIN,
                  num_heads=arch.num_heads, kv_num_heads=arch.num_kv_heads,
                  scale=1.0 / math.sqrt(arch.head_dim), do_rotary=1, rotary_interleaved=0)
        return self.linear(f"{at}/attn/output", [f"{src}.self_attn.o_proj.weight"], f"{at}/attn/o_proj/MatMul",
                           f"{at}/attn/o_proj/output")

    def mlp(self, h: str, src: str, at: str) -> str:
        gate_w, up_w = f"{src}.mlp.gate_proj.weight", f"{src}.mlp.up_proj.weight"
        if self.opts.pack_gate_up:
            gate_up = self.linear(h, [gate_w, up_w], f"{at}/mlp/gate_up_proj/MatMul", f"{at}/mlp/gate_up/output")
            gate, up = f"{at}/mlp/gate/output", f"{at}/mlp/up/output"
            self.node("Split", [gate_up], [gate, up], f"{at}/mlp/Split", axis=-1, num_outputs=2)
        else:
            gate = self.linear(h, [gate_w], f"{at}/mlp/gate_proj/MatMul", f"{at}/mlp/gate_proj/output")
            up = self.linear(h, [up_w], f"{at}/mlp/up_proj/MatMul", f"{at}/mlp/up_proj/output")
        self.node("Sigmoid", [gate], [f"{at}/mlp/act/Sigmoid/output"], f"{at}/mlp/act/Sigmoid")
        self.node("Mul", [gate, f"{at}/mlp/act/Sigmoid/output"], [f"{at}/mlp/act/output"], f"{at}/mlp/act/Mul")
        self.node("Mul", [f"{at}/mlp/act/output", up], [f"{at}/mlp/gated/output"], f"{at}/mlp/Mul")
        return self.linear(f"{at}/mlp/gated/output", [f"{src}.mlp.down_proj.weight"], f"{at}/mlp/down_proj/MatMul",
                           f"{at}/mlp/down_proj/output")


def check_supported(info: CheckpointInfo) -> None:
    """Refuse Llama variants the graph does not express (with the reason)."""
    cfg, arch = info.config, info.architecture
    rope = rope_parameters(cfg)
    if rope["rope_type"] != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        raise GraphBuildError(f"{info.name}: RoPE scaling {scaling!r} is not supported (Code Llama uses plain RoPE)")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise GraphBuildError(f"{info.name}: {flag}=true is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise GraphBuildError(f"{info.name}: hidden_act {cfg.get('hidden_act')!r} is not supported (silu)")
    if arch.head_dim % 16:
        raise GraphBuildError(f"{info.name}: head_dim {arch.head_dim} is not a multiple of 16, which "
                              "GroupQueryAttention's fused rotary embedding requires")
    if arch.num_heads % arch.num_kv_heads:
        raise GraphBuildError(f"{info.name}: {arch.num_heads} heads are not a multiple of "
                              f"{arch.num_kv_heads} kv heads")


def build_decoder_graph(info: CheckpointInfo, out_path: Path, *, precision: Precision, block_size: int = 32,
                        symmetric: bool = True, accuracy_level: int = 0, keep_unquantized: tuple[str, ...] = (),
                        max_length: int, io_dtype: IODType | None = None, pack_qkv: bool = True,
                        pack_gate_up: bool = False, keep_bits: int | None = None,
                        keep_block_size: int | None = None, scale_search: bool = False, hessians: LayerwiseHessians | None = None,
                        logits_start_input: bool = True, head_refine_top_k: int = 0,
                        embedding_bits: int | None = None,
                        progress: Progress | None = None) -> list[Path]:
    """Write ``out_path`` (e.g. ``model.onnx``) and ``out_path + '.data'`` for the
    `gqa-shared-kv` flavour; returns both paths.

    ``precision`` int4/int8 quantize every projection (MatMulNBits, ``block_size``
    along K, ``symmetric`` or with zero points, ``accuracy_level`` as the
    attribute; 0 leaves it unset) except nodes matching ``keep_unquantized``
    (substring or fnmatch pattern on the node name, e.g. ``"lm_head"`` matches
    ``/lm_head/MatMul``). fp16/fp32 keep every weight in float. ``io_dtype``
    (activations and KV cache) defaults to float16 for fp16 and float32
    otherwise; GPU bundles want float16. ``max_length`` sizes the rotary tables:
    the longest context (prompt + generated) the graph can run. ``keep_bits`` (8) stores
    the layers matched by ``keep_unquantized`` as MatMulNBits of that many bits (the same
    symmetry; blocks of ``keep_block_size``, default ``block_size``) instead of float, when
    ``precision`` is int4/int8; None keeps them in float. An int8 lm_head reads 3.5x fewer
    bytes per token than a float32 one (benchmarks/peers.py measures what that buys); in
    blocks of 128 rather than 32 it reads 8 % fewer, and onnxruntime's 8-bit kernel runs it
    faster (docs/performance.md, "The lm_head's blocks"). ``scale_search`` picks each block's
    scale (and zero point) by least squared error (``block_quantize_mse``) instead of
    onnxruntime's round-to-nearest over the block's full range; the layout is the same.
    ``hessians`` (``calibration.LayerwiseHessians``) quantizes every MatMulNBits weight with
    GPTQ (``gptq.py``: rounding errors fed forward onto the columns not yet quantized, by the
    calibration inputs' Hessian), each block's scale by ``scale_search``'s rule.
    ``logits_start_input``: the optional ``logits_start`` input (runs of several rows for
    prompt lookup); the export leaves it out of GPU bundles until the GPU paths are tested with it.
    ``head_refine_top_k`` > 0 (int4, ``keep_bits`` 8, float32 activations): the lm_head in two
    passes, every logit from int4 weights and the ``head_refine_top_k`` largest recomputed
    from an int8 copy (``_Builder.refined_head``) instead of an int8 lm_head.
    ``embedding_bits`` 8 (float32 activations): the token embedding table as int8 blocks of
    EMBEDDING_BLOCK_SIZE (``_Builder.quantized_embedding``) instead of float.
    """
    import onnx

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if io_dtype is None:
        io_dtype = "float16" if precision == "fp16" else "float32"
    if io_dtype not in ("float32", "float16"):
        raise ValueError(f"io_dtype must be float32 or float16, not {io_dtype!r}")
    if precision == "fp32" and io_dtype != "float32":
        raise ValueError("fp32 precision needs float32 activations")
    if max_length < 1:
        raise ValueError(f"max_length must be positive, not {max_length}")
    if keep_bits not in (None, 4, 8):
        raise ValueError(f"keep_bits must be None, 4 or 8, not {keep_bits!r}")
    if keep_block_size is not None and (keep_block_size < 16 or keep_block_size & (keep_block_size - 1)):
        raise ValueError(f"keep_block_size must be a power of two >= 16, not {keep_block_size!r}")
    if head_refine_top_k < 0:
        raise ValueError(f"head_refine_top_k must be 0 or positive, not {head_refine_top_k}")
    if head_refine_top_k and (precision != "int4" or keep_bits != 8 or io_dtype != "float32"):
        raise ValueError("head_refine_top_k needs precision int4, keep_bits 8 and float32 activations "
                         f"(here {precision}, keep_bits {keep_bits}, {io_dtype})")
    if embedding_bits not in (None, 8) or (embedding_bits and io_dtype != "float32"):
        raise ValueError(f"embedding_bits must be None, or 8 with float32 activations, not {embedding_bits!r} "
                         f"with {io_dtype}")
    check_supported(info)
    opts = BuildOptions(precision=precision, block_size=block_size, symmetric=symmetric,
                        accuracy_level=accuracy_level, keep_unquantized=tuple(keep_unquantized),
                        max_length=max_length, io_dtype=io_dtype, pack_qkv=pack_qkv, pack_gate_up=pack_gate_up,
                        keep_bits=keep_bits, keep_block_size=keep_block_size, scale_search=scale_search,
                        logits_start_input=logits_start_input, head_refine_top_k=head_refine_top_k,
                        embedding_bits=embedding_bits)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    builder = _Builder(info, out_path, opts, progress, hessians)
    try:
        model = builder.build()
    finally:
        builder.data.close()
    onnx.save_model(model, str(out_path))  # initializers are all external: the proto is small
    return [out_path, builder.data.path]
