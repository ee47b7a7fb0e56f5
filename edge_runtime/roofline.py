"""The memory-bandwidth roofline of a decode step: at batch 1 a step reads every weight once
(and the KV cache held so far), so its speed is at most the memory bandwidth over those bytes.

- `BandwidthProbe`: the host's bandwidth, a numpy copy of an array (bytes read + written, the
  measure issue #8 names) and a numpy max over it (bytes read: what a step does with the
  weights), each the best of a few runs at one thread and at `threads` threads.
- `cuda_bandwidth`: a GPU's, an onnxruntime float16 Neg over a tensor in device memory (bytes
  read + written), the graph written here without the `onnx` package.
- `step_bytes`: what a decode step reads at a context: the weights a step touches
  (`onnx_proto_scan.decode_read_bytes`: the embedding table as one row) plus the KV cache.
- `measure_bandwidth`: the bandwidth measured in a child process (``python -m
  edge_runtime.roofline``), so that its arrays never count in the caller's peak RSS.

`edge-runtime bench` prints each decode speed as a share of that roofline; the peers benchmark
(benchmarks/peers.py) measures with the same probe.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .memory_fit import kv_cache_bytes
from .onnx_proto_scan import decode_read_bytes, input_element_bytes

DEFAULT_PROBE_MIB = 256  # each of the host probe's two arrays: well past any L3 cache
DEFAULT_REPEATS = 5


class BandwidthProbe:
    """Copy bandwidth (bytes read + bytes written per second) and read bandwidth (bytes per
    second of a max over the array, which only reads) over arrays of `n` bytes, allocated once
    (the peers benchmark measures again every turn)."""

    def __init__(self, n: int):
        self.n = n
        self.src = np.ones(n, dtype=np.uint8)
        self.dst = np.zeros(n, dtype=np.uint8)
        np.copyto(self.dst, self.src)  # every page committed before anything is timed

    def _best(self, threads: int, work, repeats: int) -> float:
        n = self.n
        slices = [slice(i * n // threads, (i + 1) * n // threads) for i in range(threads)]
        fastest = float("inf")
        for _ in range(repeats):
            workers = [threading.Thread(target=work, args=(s,)) for s in slices]
            t0 = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            fastest = min(fastest, time.perf_counter() - t0)
        return n / fastest

    def _copy(self, s: slice) -> None:
        np.copyto(self.dst[s], self.src[s])

    def _read(self, s: slice) -> None:
        np.max(self.src[s])

    def measure(self, threads: int, repeats: int = DEFAULT_REPEATS) -> dict:
        """Each the best of `repeats`, one thread and `threads` threads each taking a slice;
        ``bandwidth`` and ``read_bandwidth`` the faster of the two (bytes per second)."""
        one, many = 2 * self._best(1, self._copy, repeats), 2 * self._best(threads, self._copy, repeats)
        read_one, read_many = self._best(1, self._read, repeats), self._best(threads, self._read, repeats)
        return {"one_thread": one, "threads": threads, "all_threads": many, "bandwidth": max(one, many),
                "read_one_thread": read_one, "read_all_threads": read_many,
                "read_bandwidth": max(read_one, read_many)}


# -- a GPU's bandwidth: a one-node onnxruntime graph in device memory ----------------------------------------------
def _key(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _text(field: int, text: str) -> bytes:
    return _len_field(field, text.encode())


FLOAT16 = 10  # TensorProto.FLOAT16


def unary_model_bytes(op_type: str, elem_type: int = FLOAT16) -> bytes:
    """A ModelProto (IR version 9, opset 17) of one `op_type` node from input x to output y,
    both 1-D tensors of `elem_type` and symbolic length n."""
    def value_info(name: str) -> bytes:
        shape = _len_field(1, _text(2, "n"))  # TensorShapeProto.dim { dim_param: "n" }
        tensor = _key(1, 0) + _varint(elem_type) + _len_field(2, shape)  # TypeProto.Tensor
        return _text(1, name) + _len_field(2, _len_field(1, tensor))  # ValueInfoProto { name, type { tensor_type } }

    node = _text(1, "x") + _text(2, "y") + _text(4, op_type)
    graph = _len_field(1, node) + _text(2, "bandwidth") + _len_field(11, value_info("x")) + \
        _len_field(12, value_info("y"))
    opset = _text(1, "") + _key(2, 0) + _varint(17)
    return _key(1, 0) + _varint(9) + _len_field(7, graph) + _len_field(8, opset)


def cuda_bandwidth(nbytes: int, repeats: int = 10, device_id: int = 0) -> dict:
    """Bytes per second read + written by a float16 Neg over an `nbytes` tensor in the GPU's
    memory (CUDA provider, I/O binding: nothing crosses to the host), the best of `repeats`
    after one untimed run."""
    import onnxruntime as ort

    n = nbytes // 2
    session = ort.InferenceSession(unary_model_bytes("Neg"), providers=[("CUDAExecutionProvider",
                                                                         {"device_id": device_id})])
    x = ort.OrtValue.ortvalue_from_shape_and_type((n,), np.float16, "cuda", device_id)
    y = ort.OrtValue.ortvalue_from_shape_and_type((n,), np.float16, "cuda", device_id)
    binding = session.io_binding()
    binding.bind_ortvalue_input("x", x)
    binding.bind_ortvalue_output("y", y)
    session.run_with_iobinding(binding)
    fastest = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run_with_iobinding(binding)  # synchronizes the stream at the end
        fastest = min(fastest, time.perf_counter() - t0)
    return {"bandwidth": 4 * n / fastest, "bytes": 4 * n}


# -- what a step reads ---------------------------------------------------------------------------------------------
def roofline_tokens_per_s(bandwidth_bytes_per_s: float, weight_bytes: int, kv_bytes: int) -> float:
    return bandwidth_bytes_per_s / (weight_bytes + kv_bytes)


def step_bytes(graph: Path, *, layers: int, kv_heads: int, head_dim: int, contexts) -> dict[int, int]:
    """{context: bytes a decode step of `graph` reads}: the weights it touches and its KV cache
    at that many tokens, in the element type of the graph's past_key_values inputs."""
    _, weights = decode_read_bytes(graph)
    element = input_element_bytes(graph, "past_key_values") or 0
    return {c: weights + int(kv_cache_bytes(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim, context=c,
                                            dtype_bytes=element)) for c in contexts}


def physical_cores(cpus: Path = Path("/sys/devices/system/cpu")) -> int:
    """This machine's physical cores -- what onnxruntime's intra-op pool takes when a profile
    leaves its threads at 0 (it counts every core, whatever this process's affinity): the
    distinct (package, core) pairs of the CPUs under `cpus`; os.cpu_count() where those files
    are missing."""
    cores = set()
    for cpu in cpus.glob("cpu[0-9]*"):
        try:
            cores.add(((cpu / "topology" / "physical_package_id").read_text().strip(),
                       (cpu / "topology" / "core_id").read_text().strip()))
        except OSError:
            continue
    return len(cores) or os.cpu_count() or 1


# -- measured in a child process -----------------------------------------------------------------------------------
def measure_bandwidth(*, threads: int, device: str = "cpu", device_id: int = 0, mib: int = DEFAULT_PROBE_MIB,
                      timeout_s: float = 300.0) -> dict:
    """The bandwidth (``bandwidth``, and on the host ``read_bandwidth``, bytes per second) of
    `device` ("cpu", or "cuda" and its `device_id`), measured by ``python -m
    edge_runtime.roofline`` in a child process. RuntimeError with the child's words if it fails
    or does not finish within `timeout_s`."""
    argv = [sys.executable, "-m", "edge_runtime.roofline", "--device", device, "--device-id", str(device_id),
            "--threads", str(threads), "--mib", str(mib)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"measuring the {device} memory bandwidth took over {timeout_s:.0f} s") from exc
    if done.returncode != 0:
        raise RuntimeError(f"measuring the {device} memory bandwidth failed: "
                           f"{(done.stderr.strip().splitlines() or ['no message'])[-1]}")
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_runtime.roofline",
                                description="Measure this machine's memory bandwidth, as edge-runtime bench does; "
                                            "prints JSON (bytes per second).")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--device-id", type=int, default=0, help="which GPU (the profile's device_id)")
    p.add_argument("--threads", type=int, default=1, help="host threads (the engine's intra-op threads)")
    p.add_argument("--mib", type=int, default=DEFAULT_PROBE_MIB, help="MiB of each array (GPU: of the tensor)")
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    a = p.parse_args(argv)
    if a.threads < 1 or a.mib < 1 or a.repeats < 1 or a.device_id < 0:
        p.error("--threads, --mib and --repeats must be at least 1, --device-id at least 0")
    if a.device == "cuda":
        result = {"device": "cuda", "device_id": a.device_id,
                  "method": f"onnxruntime float16 Neg over {a.mib} MiB in device memory",
                  **cuda_bandwidth(a.mib << 20, max(a.repeats, 2), a.device_id)}
    else:
        result = {"device": "cpu", "method": f"numpy copy (read + written) and max (read) of {a.mib} MiB",
                  **BandwidthProbe(a.mib << 20).measure(a.threads, a.repeats)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
