"""The KV cache: buffers allocated once per request, for the length it can reach.

The `optimum-kv-concat` graph reads `past` (length T) and writes `present`
(length T+S) as new tensors. Each layer's keys and values get two flat
buffers of the full capacity; a tensor of shape [1, H, T, D] is the contiguous
prefix of a flat buffer, so the graph reads past from one buffer and writes
present straight into the other through I/O binding, and the two swap roles
after every step. Nothing is allocated or copied by the token loop in Python;
on a GPU both buffers live in device memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class DeviceBuffer:
    """A flat buffer on the host (numpy) or on a device (an onnxruntime OrtValue)."""

    ptr: int
    keepalive: object  # the numpy array or OrtValue that owns the memory


def allocate(ort, n_elements: int, dtype: np.dtype, device: str, device_id: int = 0) -> DeviceBuffer:
    """A zeroed buffer. On a device it is copied from a host array of zeros: untouched pages
    of np.zeros all map the kernel's zero page, so the copy commits no host memory. Zeroed
    like the host buffers, so no kernel ever reads leftovers of an earlier allocation."""
    arr = np.zeros(n_elements, dtype=dtype)
    if device == "cpu":
        return DeviceBuffer(arr.ctypes.data, arr)
    value = ort.OrtValue.ortvalue_from_numpy(arr, device, device_id)
    return DeviceBuffer(value.data_ptr(), value)


@dataclass
class KVCache:
    """Ping-pong key/value buffers for every layer, sized for `capacity` tokens."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    capacity: int
    dtype: np.dtype
    device: str
    # buffers[side][layer] = (key buffer, value buffer); `side` flips every step.
    buffers: list[list[tuple[DeviceBuffer, DeviceBuffer]]] = field(default_factory=list)
    length: int = 0  # tokens held
    side: int = 0  # which buffer set holds the current past

    @classmethod
    def allocate(cls, ort, *, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: np.dtype, device: str, device_id: int = 0) -> "KVCache":
        n = num_kv_heads * capacity * head_dim
        buffers = [[(allocate(ort, n, dtype, device, device_id), allocate(ort, n, dtype, device, device_id))
                    for _ in range(num_layers)]
                   for _side in range(2)]
        return cls(num_layers, num_kv_heads, head_dim, capacity, np.dtype(dtype), device, buffers)

    @property
    def nbytes(self) -> int:
        return 4 * self.num_layers * self.num_kv_heads * self.capacity * self.head_dim * self.dtype.itemsize

    def shape(self, length: int) -> tuple[int, int, int, int]:
        return (1, self.num_kv_heads, length, self.head_dim)

    def past(self, layer: int) -> tuple[DeviceBuffer, DeviceBuffer]:
        return self.buffers[self.side][layer]

    def present(self, layer: int) -> tuple[DeviceBuffer, DeviceBuffer]:
        return self.buffers[1 - self.side][layer]

    def advance(self, new_tokens: int) -> None:
        """After a step wrote `present`, it becomes the past."""
        self.length += new_tokens
        self.side = 1 - self.side

    def reset(self) -> None:
        self.length = 0
        self.side = 0
