"""benchmarks/gpu_kernels.py: the summary it makes of a GPU trace (here, from events written
by hand and from a real PyTorch trace file), and on a GPU (`pytest -m gpu`) the trace of our
decode steps: the loop copies only a token and a position in, and the logits out."""

from __future__ import annotations

import pytest


def kernel(name, ts, dur):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}


def test_kernel_names_lose_return_type_templates_and_parameters(gpu_kernels):
    name = gpu_kernels.kernel_name
    assert name("void onnxruntime::contrib::cuda::MatMulFloatInt4Kernel<half, 128, true>(half*, int)") == \
        "onnxruntime::contrib::cuda::MatMulFloatInt4Kernel"
    assert name("void f<g<int>, 2>::h<3>(float*)") == "f::h"
    assert name("ampere_fp16_s16816gemm_fp16_64x64_ldg8_f2f_stages_64x5_tn") == \
        "ampere_fp16_s16816gemm_fp16_64x64_ldg8_f2f_stages_64x5_tn"


def test_summary_per_step_busy_union_copies_and_kernels_by_name(gpu_kernels):
    events = [
        kernel("void a<1>(int)", 0, 10), kernel("void a<2>(int)", 5, 10),  # overlap: busy 15, not 20
        kernel("void b(float)", 100, 2),
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pageable -> Device)", "ts": 200, "dur": 1,
         "args": {"bytes": 8}},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pageable)", "ts": 300, "dur": 4,
         "args": {"bytes": 64032}},
        {"ph": "X", "cat": "gpu_memset", "name": "Memset (Device)", "ts": 400, "dur": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1000},  # not the GPU's
        kernel("void a<1>(int)", 1000, 10), kernel("void b(float)", 1100, 2),
    ]
    s = gpu_kernels.summarize(events, steps=2, wall_us_per_step=100.0)
    assert s["gpu_busy_us_per_step"] == pytest.approx((15 + 2 + 1 + 4 + 1 + 10 + 2) / 2)
    assert s["gpu_idle_us_per_step"] == pytest.approx(100 - 17.5)
    assert s["kernels_per_step"] == 2.5 and s["memsets_per_step"] == 0.5
    assert s["short_kernel_us_per_step"] == pytest.approx(2.0)  # the two 2-us calls of b
    assert s["copies_per_step"] == {"DtoH": {"count": 0.5, "bytes": 32016, "us": 2.0},
                                    "HtoD": {"count": 0.5, "bytes": 4, "us": 0.5}}
    assert [(r["kernel"], r["calls_per_step"], r["us_per_step"]) for r in s["kernels"]] == [("a", 1.5, 15.0),
                                                                                            ("b", 1.0, 2.0)]
    assert s["kernels"][0]["percent_of_busy"] == pytest.approx(100 * 15 / 17.5)
    table = gpu_kernels.format_summary(s, top=1)
    assert "| a | 1.5 | 15.0 | 10.00 |" in table and "(1 other kernels) | 1.0 | 2.0" in table
    assert "DtoH 0.5 (32016 B" in table


def test_reads_pytorchs_own_trace_file(gpu_kernels, tmp_path):
    """The file format is PyTorch's: its events load, and a CPU-only trace has no GPU work."""
    torch = pytest.importorskip("torch")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(64, 64) @ torch.ones(64, 64)
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    events = gpu_kernels.load_trace(tmp_path / "trace.json")
    assert any(e["name"] == "aten::mm" for e in events)
    assert gpu_kernels.summarize(events, steps=1, wall_us_per_step=1.0)["kernels"] == []


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["cuda", "cuda-graph"])
def test_decode_steps_copy_only_a_token_in_and_the_logits_out(gpu_kernels, tiny_checkpoint, exporter, tmp_path,
                                                              variant):
    """The issue's "no host copies in the loop": with the KV cache in device memory and bound
    once, a decode step moves a token id and the sequence length to the GPU (a few bytes) and
    the last position's logits back; no cache or weights cross."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():  # the trace is torch's CUPTI profiler: a CPU build of torch has none
        pytest.skip("torch has no CUDA here: the kernel trace needs a CUDA build of torch")
    bundle = exporter(tiny_checkpoint, tmp_path / "int4", precision="int4", profile="nvidia-gpu", skip_fidelity=True,
                      allow_degraded=True)
    s = gpu_kernels.trace_decode(bundle, profile="nvidia-gpu", variant=variant, context=64, steps=8)
    print(gpu_kernels.format_summary(s))
    copies = s["copies_per_step"]
    assert copies.get("HtoD", {"bytes": 0})["bytes"] <= 64, copies
    vocab = 32016
    assert copies["DtoH"]["bytes"] <= 4 * vocab + 64, copies
    assert s["kernels_per_step"] >= 2 * 5  # two layers' projections at least: the trace saw the step
