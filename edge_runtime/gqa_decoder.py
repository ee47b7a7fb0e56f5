"""Drives the `gqa-shared-kv` graph flavour (export/graph_builder.py).

The graph's GroupQueryAttention nodes read and write ONE key and ONE value
buffer per layer, shaped [1, kv_heads, L, head_dim] for a fixed L: the same
memory is bound as `past_key_values.{i}.*` input and `present.{i}.*` output
(past_present_share_buffer), and each step writes only the new tokens' rows in
place. Nothing is concatenated or copied between steps.

Allocation and binding happen once per decoder, not per request:

* the KV buffers are allocated on the first `new_cache` for the decoder's
  `max_length` (the engine's context limit) and reused by every request -- a
  new request only resets the length. Nothing needs clearing: attention reads
  positions below `seqlens_k + 1` only, and those are rewritten by the request
  before they are read. Why not per request: the buffer's shape does not depend
  on the request, the device profile's memory budget already plans for the full
  context, and re-allocating gigabytes per request (cudaMalloc on a GPU) would
  buy nothing. On the CPU the buffers are anonymous mappings committed 4 KiB at
  a time as rows are written (`allocate_host_lazily`), so the resident KV
  follows the longest context actually used, not max_length.
* a request may keep the start of the previous one's cache (`new_cache(capacity,
  prompt)`): the decoder records the ids whose keys and values its buffers hold,
  and a new prompt that begins with the same ids prefills only the rest (a chat's
  next turn, an editor's next completion in the same file). The keys and values
  of a position depend only on the ids up to it, so the kept rows are those the
  new prompt would write, up to rounding (rows a decode step wrote were computed
  one token at a time). At least the prompt's last id is run, for its logits.
* every input and output is bound once to memory that stays put: the KV
  buffers, `seqlens_k` and `total_sequence_length`, the token and the logits
  buffer. On the CPU the small inputs are host arrays written in place (I/O
  binding binds them by pointer, so the next run reads the new values without
  rebinding). On a GPU the token and `seqlens_k` are device buffers written
  with `update_inplace`: onnxruntime copies a host input bound for a GPU
  kernel ONCE, when it is bound (IOBinding::BindInput), so a host array
  written in place afterwards would never reach the GPU again.
  `total_sequence_length` is read on the host by GroupQueryAttention and stays
  a host array. `prefill` binds `input_ids` to the prompt; the first `decode`
  after it binds the token buffer back. A decode step is three scalar writes
  and `run_with_iobinding`.
* an int8-cache graph (export/kv_cache_quant.py) attends in float over a prompt and
  returns the prompt's new rows' codes alone ([1, kv_heads, S, head_dim]; the graph's
  metadata says so, META_PROMPT_PRESENT): for such a run the present outputs are bound to
  arrays of that shape, copied into the buffers at the rows after the cached ones, and
  bound back to the buffers. A prompt touches its own rows only, not the buffers' whole
  length. Which runs take that branch follows from the rows (`_prompt_branch`).

`prefill` returns only the LAST position's logits, as [1, V] (the graph
computes no others); the engine and `generator.prefill` take `[-1]` of it.

CUDA graphs (`cuda_graph=True`, from the profile's CUDA provider option
`enable_cuda_graph = "1"`): onnxruntime records a decode step's kernels once and
replays them, so a step costs one launch instead of one per node (hundreds at
7B). A replay reuses the recorded addresses and copies nothing, so the logits
too stay in a device buffer, read back after the step (the token and
`seqlens_k` already live on the device, as above). `total_sequence_length`
stays on the host, where GroupQueryAttention reads it when a step is recorded: a
replay keeps the recorded value (measured on an H200: a total that grew with each
step left replays attending to the recording's length, and greedy tokens parted
from plain CUDA's within a few steps). So decode steps in this mode pass the
buffer's length, the same at every step, as onnxruntime-genai's static attention
mask does under graph capture; GroupQueryAttention takes each row's length from
`seqlens_k`, which lives on the device. Prefill runs are not recorded
(`gpu_graph_id` -1): their shapes change with every prompt.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .bundle import Architecture
from .errors import BundleError, ConfigError
from .kv_cache import DeviceBuffer, allocate
from .onnx_decoder import ORT_TO_NUMPY, check_graph_matches

META_MAX_LENGTH = "edge_runtime.max_length"  # written by export/graph_builder.py
# An int8-cache graph (export/kv_cache_quant.py) runs up to this many new rows after cached
# ones through onnxruntime's int8 kernel (a short follow-up over the prompt cache), more, or a
# first prompt, in float. So a prompt's later chunks are kept longer than this (`prefill`):
# a long first prompt attends in float all through, as the fidelity figures assume.
INT8_STEP_ROWS_MAX = 32
# An int8-cache graph's metadata (export/kv_cache_quant.py, revision 5 on): its prompt branch
# returns the new rows' codes alone as the present outputs, [1, kv_heads, S, head_dim], for the
# decoder to copy into its buffers; a run takes that branch when its S new rows are more than
# 1 (no cached rows) or META_INT8_KERNEL_ROWS (after cached ones). Without it (older bundles)
# the branch returns the whole buffer and the present outputs stay bound to the buffers.
META_PROMPT_PRESENT = "edge_runtime.int8_prompt_present"
PROMPT_PRESENT_NEW_ROWS = "new_rows"
META_INT8_KERNEL_ROWS = "edge_runtime.int8_kernel_rows"
# The graph's optional input (export/graph_builder.py): -rows of positions whose logits it computes.
LOGITS_START = "logits_start"
# An int8 cache keeps a shorter common start than this not at all: kept rows change what the rest
# attends to by the int8 cache's error (a fresh prompt attends in float), and fewer rows save less
# than a few decode steps' time (an infill after a completion shares only <s>).
INT8_MIN_KEPT_ROWS = 16
VERIFY_ROWS_MAX = 16  # a token and up to 15 drafts verified in one run (`verify`)


@dataclass
class SharedKVCache:
    """One request's view of the decoder's shared key/value buffers.

    `capacity` is the request's limit (prompt + new tokens); `buffer_length` is
    the buffers' allocated length (the decoder's max_length, >= capacity).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    capacity: int
    buffer_length: int
    dtype: np.dtype
    device: str
    buffers: list[tuple[DeviceBuffer, DeviceBuffer]] = field(default_factory=list)
    length: int = 0  # tokens held

    @property
    def nbytes(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.buffer_length * self.head_dim * self.dtype.itemsize

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (1, self.num_kv_heads, self.buffer_length, self.head_dim)

    def past(self, layer: int) -> tuple[DeviceBuffer, DeviceBuffer]:
        return self.buffers[layer]

    def present(self, layer: int) -> tuple[DeviceBuffer, DeviceBuffer]:
        """The same buffers as `past`: the graph writes the new rows in place."""
        return self.buffers[layer]

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens

    def rewind(self, tokens: int) -> None:
        """Forget the last `tokens` rows (drafts the model did not confirm): the next run
        writes over them, and attention never reads past `length`."""
        if not 0 <= tokens <= self.length:
            raise ValueError(f"cannot rewind {tokens} of {self.length} rows")
        self.length -= tokens

    def reset(self) -> None:
        self.length = 0


def allocate_host_lazily(n_elements: int, dtype: np.dtype) -> DeviceBuffer:
    """A zeroed host buffer whose pages are committed only when written, 4 KiB at a time.

    numpy asks for transparent huge pages on big arrays (madvise), and one write
    then commits 2 MiB. Each layer's buffer is [kv_heads, L, head_dim]: every
    head's rows start a new region, so with huge pages the first prefill would
    make the whole max-length cache resident. An anonymous private mapping
    advised against huge pages keeps the resident KV proportional to the tokens
    actually held."""
    nbytes = max(1, n_elements * np.dtype(dtype).itemsize)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        region.madvise(mmap.MADV_NOHUGEPAGE)
    array = np.frombuffer(region, dtype=dtype, count=n_elements)
    return DeviceBuffer(array.ctypes.data, (region, array))


def host_rows(buffer: DeviceBuffer, dtype: np.dtype, shape: tuple[int, int, int]) -> np.ndarray:
    """A numpy view [kv_heads, length, head_dim] of a host KV buffer."""
    import ctypes

    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * n).from_address(buffer.ptr), dtype=dtype).reshape(shape)


def graph_max_length(session) -> int | None:
    """The longest context the graph's rotary tables cover (from its metadata), if recorded."""
    value = session.get_modelmeta().custom_metadata_map.get(META_MAX_LENGTH)
    return int(value) if value else None


def graph_int8_kernel_rows(session) -> int | None:
    """An int8-cache graph's int8-kernel share (from its metadata, revision 5 on), if recorded."""
    value = session.get_modelmeta().custom_metadata_map.get(META_INT8_KERNEL_ROWS)
    return int(value) if value else None


GQA_INPUTS = ("input_ids", "seqlens_k", "total_sequence_length")


def check_kv_dtype_for_device(kv_dtype: str, device: str) -> None:
    """ConfigError unless the fused graph's KV cache can stay on `device`. CUDA's
    GroupQueryAttention is float16-only: onnxruntime would run a float32 or int8 one on the
    CPU, reading a host copy of the device KV buffers made when they were bound."""
    if device != "cpu" and kv_dtype != "float16":
        raise ConfigError(f"this bundle's KV cache is {kv_dtype}, and on the GPU the fused graph's attention runs in "
                          "float16 only: export it for the GPU profile (fp16, int8 or int4, float16 KV cache), or "
                          "run this bundle with a CPU profile")


def chunk_bounds(n: int, chunk: int | None, short: int = INT8_STEP_ROWS_MAX) -> list[tuple[int, int]]:
    """[start, end) of each prefill chunk of an n-id prompt: `chunk` ids each, except that a
    last piece of `short` ids or fewer (the graph's int8-kernel share) shares the one before
    it evenly (so every chunk after the first is longer than that, and at most `chunk`)."""
    if not chunk or n <= chunk:
        return [(0, n)]
    bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    (a, _), (_, z) = bounds[-2], bounds[-1]
    if z - bounds[-1][0] <= short and chunk > 2 * short:
        middle = (a + z) // 2
        bounds[-2:] = [(a, middle), (middle, z)]
    return bounds


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    """How many ids `a` and `b` share from the start."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class SharedKVDecoder:
    """The `gqa-shared-kv` flavour: inputs input_ids, past_key_values.{i}.key/value
    (shared buffers), seqlens_k, total_sequence_length; outputs logits [1, 1, V] of the
    last position and present.{i}.key/value (the same buffers)."""

    def __init__(self, ort, session, arch: Architecture, *, device: str, max_length: int,
                 huge_pages: bool = False, prefill_chunk: int | None = None, cuda_graph: bool = False,
                 int8_kernel_rows: int | None = None, device_id: int = 0) -> None:
        """`huge_pages`: on the CPU, allocate the KV buffers with numpy (transparent huge
        pages, fully resident after the first prefill) instead of committing 4 KiB
        pages as tokens arrive (the default; see `allocate_host_lazily`).
        `prefill_chunk`: feed prompts longer than this in chunks of this many tokens
        (GroupQueryAttention's subsequent-prompt path; same logits). The CPU kernel's
        scratch for attention scores is heads x chunk x max_length floats, so
        chunking bounds it: 2 GiB for a 4000-token prompt of a 7B at max_length
        4096 in one shot, 256 MiB in chunks of 512.
        `int8_kernel_rows`: an int8-cache graph runs up to this many new rows after
        cached ones through the int8 kernel (the bundle's manifest says how many, the graph's
        metadata too since revision 5 -- a value that differs from the graph's is a BundleError;
        None: the graph's, else what this exporter bakes in); no prefill chunk after the
        first is that short, so a long first prompt attends in float all through.
        `cuda_graph`: the session was created with the CUDA provider's
        enable_cuda_graph; keep the decode step's inputs and logits in device buffers
        and run decode steps as graph 1, prefills unrecorded (module docstring)."""
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be positive, not {prefill_chunk}")
        self.ort = ort
        self.huge_pages = huge_pages
        self.prefill_chunk = prefill_chunk
        self.session = session
        self.arch = arch
        self.device = device
        self.device_id = device_id  # which GPU the buffers live on (the session's)
        check_graph_matches(session, arch, GQA_INPUTS)
        limit = graph_max_length(session)
        if limit is not None and max_length > limit:
            raise ValueError(f"max_length {max_length} exceeds the graph's rotary tables ({limit} positions)")
        self.max_length = max_length
        # the graph's prompt branch returns only the new rows' codes (META_PROMPT_PRESENT)
        meta = session.get_modelmeta().custom_metadata_map
        self._prompt_new_rows = meta.get(META_PROMPT_PRESENT) == PROMPT_PRESENT_NEW_ROWS
        graph_rows = graph_int8_kernel_rows(session)
        if int8_kernel_rows is not None and graph_rows is not None and int8_kernel_rows != graph_rows:
            # a run's outputs are bound by the graph's share (META_PROMPT_PRESENT): the manifest's must be it
            raise BundleError(f"bundle.json's kv_cache.int8_kernel_rows_after_cache ({int8_kernel_rows}) is not "
                              f"the graph's ({graph_rows}); re-export the bundle")
        self.int8_kernel_rows = next(r for r in (int8_kernel_rows, graph_rows, INT8_STEP_ROWS_MAX) if r is not None)
        inputs = {i.name: i for i in session.get_inputs()}
        self.kv_dtype = np.dtype(ORT_TO_NUMPY[inputs["past_key_values.0.key"].type])
        check_kv_dtype_for_device(str(self.kv_dtype), device)
        self.logits_dtype = np.dtype(ORT_TO_NUMPY[session.get_outputs()[0].type])
        self.vocab_size = arch.vocab_size
        # Host buffers bound once by pointer and written in place by the loop.
        self._token = np.zeros((1, 1), dtype=np.int64)
        self._seqlens_k = np.zeros(1, dtype=np.int32)
        self._total_len = np.zeros((), dtype=np.int32)
        self._logits = np.zeros((1, 1, self.vocab_size), dtype=self.logits_dtype)
        # verifying drafts (`verify`): graphs with the logits_start input, on the CPU for now (the
        # GPU paths, plain and recorded, are not tested with it yet)
        optional = {i.name for i in session.get_overridable_initializers()}
        self.verify_rows_max = VERIFY_ROWS_MAX if LOGITS_START in optional and device == "cpu" and not cuda_graph else 0
        self._logits_start = np.full(1, -1, dtype=np.int64)
        self._rows = np.zeros((1, self.verify_rows_max, self.vocab_size), dtype=self.logits_dtype)
        self._binding = session.io_binding()
        self.cuda_graph = cuda_graph
        # the step's inputs in device buffers written in place (module docstring): on a GPU, and
        # in the CUDA-graph mode (which tests run on the CPU too); the logits there in graph mode
        self._inputs_on_device = device != "cpu" or cuda_graph
        self._logits_on_device = cuda_graph
        # copies: on the CPU an OrtValue made from an array would share its memory, and the
        # tests that run this mode there would pass without the update_inplace a GPU needs
        on_device = ort.OrtValue.ortvalue_from_numpy
        if self._inputs_on_device:
            self._token_dev = on_device(self._token.copy(), device, device_id)
            self._seqlens_dev = on_device(self._seqlens_k.copy(), device, device_id)
        if self._logits_on_device:
            self._logits_dev = on_device(self._logits.copy(), device, device_id)
        self._prefill_options = self._decode_options = None
        if cuda_graph:
            self._prefill_options, self._decode_options = ort.RunOptions(), ort.RunOptions()
            self._prefill_options.add_run_config_entry("gpu_graph_id", "-1")  # not recorded
            self._decode_options.add_run_config_entry("gpu_graph_id", "1")
        self._buffers: list[tuple[DeviceBuffer, DeviceBuffer]] | None = None
        self._active: SharedKVCache | None = None
        self._held_ids = np.zeros(max_length, dtype=np.int64)  # the ids of the active cache's rows
        self._ids_bound_to_token = False

    # -- cache ----------------------------------------------------------------------------------
    def new_cache(self, capacity: int, prompt: np.ndarray | None = None) -> SharedKVCache:
        """The cache for a new request. The buffers are the decoder's own (allocated and
        bound on the first call); a cache returned earlier becomes unusable.

        With `prompt` (the request's ids), the new cache keeps the rows of the longest
        common start of the previous cache's ids and `prompt`, all but its last id at
        most (with an int8 cache, none if fewer than INT8_MIN_KEPT_ROWS): the new cache's
        `length` says how many, and `prompt[length:]` is what to prefill."""
        if capacity > self.max_length:
            raise ValueError(f"cache capacity {capacity} exceeds the decoder's maximum {self.max_length}")
        if self._buffers is None:
            self._allocate_and_bind()
        assert self._buffers is not None
        keep = 0
        if prompt is not None and self._active is not None and len(prompt) > 1:
            keep = common_prefix_length(self._held_ids[:min(self._active.length, len(prompt) - 1, capacity)], prompt)
            if self.kv_dtype == np.int8 and keep < INT8_MIN_KEPT_ROWS:
                keep = 0  # the prompt runs as a first one would, in float: a fresh engine's logits
        self._active = SharedKVCache(self.arch.num_layers, self.arch.num_kv_heads, self.arch.head_dim,
                                     capacity=capacity, buffer_length=self.max_length, dtype=self.kv_dtype,
                                     device=self.device, buffers=self._buffers, length=keep)
        return self._active

    def _allocate_and_bind(self) -> None:
        n = self.arch.num_kv_heads * self.max_length * self.arch.head_dim

        def buffer() -> DeviceBuffer:
            if self.device == "cpu" and not self.huge_pages:
                return allocate_host_lazily(n, self.kv_dtype)
            return allocate(self.ort, n, self.kv_dtype, self.device, self.device_id)

        self._buffers = [(buffer(), buffer()) for _ in range(self.arch.num_layers)]
        shape = (1, self.arch.num_kv_heads, self.max_length, self.arch.head_dim)
        b = self._binding
        if self._logits_on_device:
            b.bind_ortvalue_output("logits", self._logits_dev)
        else:
            b.bind_output("logits", "cpu", 0, self.logits_dtype, self._logits.shape, self._logits.ctypes.data)
        if self._inputs_on_device:
            b.bind_ortvalue_input("seqlens_k", self._seqlens_dev)
        else:
            b.bind_input("seqlens_k", "cpu", 0, np.int32, self._seqlens_k.shape, self._seqlens_k.ctypes.data)
        for layer, (k, v) in enumerate(self._buffers):
            for kind, buf in (("key", k), ("value", v)):
                b.bind_input(f"past_key_values.{layer}.{kind}", self.device, self.device_id, self.kv_dtype, shape,
                             buf.ptr)
        self._bind_present_to_buffers()
        b.bind_input("total_sequence_length", "cpu", 0, np.int32, (), self._total_len.ctypes.data)
        if self.verify_rows_max:
            b.bind_input(LOGITS_START, "cpu", 0, np.int64, (1,), self._logits_start.ctypes.data)

    def _bind_present_to_buffers(self) -> None:
        """present.{i}.* -> the shared buffers themselves (the kernels write their rows in place)."""
        assert self._buffers is not None
        shape = (1, self.arch.num_kv_heads, self.max_length, self.arch.head_dim)
        for layer, (k, v) in enumerate(self._buffers):
            for kind, buf in (("key", k), ("value", v)):
                self._binding.bind_output(f"present.{layer}.{kind}", self.device, self.device_id, self.kv_dtype,
                                          shape, buf.ptr)

    def _prompt_branch(self, past: int, new: int) -> bool:
        """Whether `new` rows after `past` cached ones take an int8-cache graph's prompt branch
        (float attention; export/kv_cache_quant.py): more than one row of a first prompt, more
        than the int8 kernel's share after cached rows."""
        return new > (1 if past == 0 else self.int8_kernel_rows)

    def _stage_present(self, new: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Bind present.{i}.* to arrays for `new` rows, where the prompt branch writes them."""
        shape = (1, self.arch.num_kv_heads, new, self.arch.head_dim)
        staged = [(np.empty(shape, self.kv_dtype), np.empty(shape, self.kv_dtype)) for _ in range(self.arch.num_layers)]
        for layer, pair in enumerate(staged):
            for kind, rows in zip(("key", "value"), pair):
                self._binding.bind_output(f"present.{layer}.{kind}", "cpu", 0, self.kv_dtype, shape, rows.ctypes.data)
        return staged

    def _copy_staged(self, staged: list[tuple[np.ndarray, np.ndarray]], past: int) -> None:
        """The staged rows into the buffers at [past, past + new)."""
        assert self._buffers is not None
        shape = (self.arch.num_kv_heads, self.max_length, self.arch.head_dim)
        for pair, buffers in zip(staged, self._buffers):
            for rows, buf in zip(pair, buffers):
                host_rows(buf, self.kv_dtype, shape)[:, past:past + rows.shape[2]] = rows[0]

    # -- steps ----------------------------------------------------------------------------------
    def _check(self, cache: SharedKVCache, new_tokens: int) -> int:
        if cache is not self._active:
            raise ValueError("this KV cache is stale: the decoder's buffers were handed to a newer request")
        total = cache.length + new_tokens
        if total > cache.capacity:
            raise ValueError(f"{total} tokens exceed the KV cache capacity {cache.capacity}")
        return total

    def _run(self, cache: SharedKVCache, total: int, new_tokens: int, options=None) -> None:
        self._seqlens_k[0] = total - 1
        # a recorded decode step keeps the host scalars it was recorded with: there the total is
        # the buffer's length, the same at every step, and seqlens_k (on the device) bounds attention
        recorded = self.cuda_graph and options is self._decode_options
        self._total_len[()] = self.max_length if recorded else total
        if self._inputs_on_device:
            self._seqlens_dev.update_inplace(self._seqlens_k)
        if not (self._prompt_new_rows and self._prompt_branch(cache.length, new_tokens)):
            self.session.run_with_iobinding(self._binding, options)
        else:  # the prompt branch returns the new rows alone (META_PROMPT_PRESENT)
            staged = self._stage_present(new_tokens)
            try:
                self.session.run_with_iobinding(self._binding, options)
                self._copy_staged(staged, cache.length)
            finally:
                self._bind_present_to_buffers()
        cache.advance(new_tokens)

    def _last_logits(self) -> np.ndarray:
        """The logits buffer [1, 1, V]: the host one, or a host copy of the device one."""
        return self._logits_dev.numpy() if self._logits_on_device else self._logits

    def prefill(self, cache: SharedKVCache, ids: np.ndarray,
                interrupted: Callable[[], bool] | None = None) -> np.ndarray | None:
        """Run the prompt (int64 ids [S]) -- or the next piece of it -- through the graph;
        returns the logits of its LAST position only, as a new float32 array [1, V].

        `interrupted` is asked before each chunk after the first: when it says so, no more
        chunks run and None comes back (a cancel waits for one chunk, not the whole prompt);
        the cache holds the chunks that ran, for the next request to keep."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(1, -1)
        self._check(cache, ids.shape[1])  # the whole prompt fits before any chunk runs
        for start, end in chunk_bounds(ids.shape[1], self.prefill_chunk, self.int8_kernel_rows):
            if start and interrupted is not None and interrupted():
                return None
            chunk = ids[:, start:end]  # a contiguous view of the row
            total = self._check(cache, chunk.shape[1])
            self._binding.bind_input("input_ids", "cpu", 0, np.int64, chunk.shape, chunk.ctypes.data)
            self._ids_bound_to_token = False
            self._held_ids[total - chunk.shape[1]:total] = chunk[0]  # before the run counts the rows in
            self._run(cache, total, chunk.shape[1], self._prefill_options)
        return self._last_logits()[0].astype(np.float32)  # a copy: the buffer is reused by decode

    def decode(self, cache: SharedKVCache, token: int) -> np.ndarray:
        """Feed one token; returns the next-token logits [V] (a buffer reused every step)."""
        total = self._check(cache, 1)
        if not self._ids_bound_to_token:
            if self._inputs_on_device:
                self._binding.bind_ortvalue_input("input_ids", self._token_dev)
            else:
                self._binding.bind_input("input_ids", "cpu", 0, np.int64, (1, 1), self._token.ctypes.data)
            self._ids_bound_to_token = True
        self._token[0, 0] = token
        if self._inputs_on_device:
            self._token_dev.update_inplace(self._token)
        self._held_ids[total - 1] = token  # before the run counts the row in (an interrupt may come between)
        self._run(cache, total, 1, self._decode_options)
        return self._last_logits()[0, 0]

    def verify(self, cache: SharedKVCache, ids: np.ndarray) -> np.ndarray:
        """Feed `ids` (a token, then drafts of the ones after it) in one run; returns the logits
        of each of their positions, [S, V]: row i predicts the id after ids[i]. A view of a
        buffer the next `verify` reuses. The cache holds all S rows after it: `cache.rewind`
        drops those of drafts the logits do not confirm. Only where `verify_rows_max` > 0
        (a graph with the logits_start input, on the CPU), at most that many ids."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(1, -1)
        n = ids.shape[1]
        if not 1 <= n <= self.verify_rows_max:
            raise ValueError(f"verify takes 1 to {self.verify_rows_max} ids, not {n}")
        total = self._check(cache, n)
        b = self._binding
        b.bind_input("input_ids", "cpu", 0, np.int64, ids.shape, ids.ctypes.data)
        self._ids_bound_to_token = False
        b.bind_output("logits", "cpu", 0, self.logits_dtype, (1, n, self.vocab_size), self._rows.ctypes.data)
        self._logits_start[0] = -n
        self._held_ids[total - n:total] = ids[0]  # before the run counts the rows in
        try:
            self._run(cache, total, n, self._prefill_options)
        finally:
            self._logits_start[0] = -1
            b.bind_output("logits", "cpu", 0, self.logits_dtype, self._logits.shape, self._logits.ctypes.data)
        return self._rows[0, :n]

    def all_position_logits(self, cache: SharedKVCache, ids: np.ndarray) -> np.ndarray:
        """Logits [S, V] (float32) of every position of `ids`, one token per run.

        The graph computes only the last position's logits, so this feeds the
        tokens one at a time (S runs): for fidelity checks and teacher forcing,
        not for serving."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((ids.shape[0], self.vocab_size), dtype=np.float32)
        start = 0
        if cache.length == 0:
            out[0] = self.prefill(cache, ids[:1])[-1]
            start = 1
        for i in range(start, ids.shape[0]):
            out[i] = self.decode(cache, int(ids[i]))
        return out
