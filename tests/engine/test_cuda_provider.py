"""The CUDA path: I/O binding keeps the KV cache in device memory, and greedy
tokens equal the CPU provider's. Runs where onnxruntime-gpu sees a GPU."""

from __future__ import annotations

import pytest

from edge_runtime.engine import Engine
from edge_runtime.profiles import load_profile
from edge_runtime.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.gpu


def test_cuda_engine_matches_cpu_and_keeps_cache_on_device(tiny_bundle):
    gpu = Engine.from_bundle(tiny_bundle, profile=load_profile("nvidia-gpu"))
    cpu = Engine.from_bundle(tiny_bundle, profile=load_profile("cpu-x86_64"))
    assert gpu.info.provider == "CUDAExecutionProvider"
    cache = gpu.decoder.new_cache(16)
    assert cache.device == "cuda"
    key, _ = cache.past(0)
    assert type(key.keepalive).__name__ == "OrtValue" and key.keepalive.device_name().lower() == "cuda"
    request = GenerationRequest(mode="complete", prompt="def fib(n):", max_tokens=32,
                                sampling=SamplingParams(temperature=0.0))
    assert gpu.complete(request).token_ids == cpu.complete(request).token_ids
