"""The CUDA path, where onnxruntime-gpu sees a GPU (the lent GPU machine; `pytest -m gpu`).

The nvidia-gpu profile's bundles of the trained demo model (int4: block 128, zero
points, GPTQ, float16 activations; fp16), run by the CUDA provider with the KV cache
in device memory, meet the profile's fidelity bar against torch fp32, as the export
measured them on the CPU provider; with CUDA graphs on, decoding gives the same tokens
as without."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.bundle import load_bundle
from edge_runtime.engine import Engine
from edge_runtime.profiles import load_profile, profile_text
from edge_runtime.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(temperature=0.0)


def cuda_profile(graph: bool):
    """nvidia-gpu with `enable_cuda_graph` set as `graph` says (the profile's default is on)."""
    return load_profile("nvidia-gpu").with_provider_options("CUDAExecutionProvider",
                                                            enable_cuda_graph="1" if graph else "0")


def greedy_continuation(engine, ids: np.ndarray, n: int) -> list[int]:
    """`n` greedy tokens after `ids`, from `engine`'s decoder."""
    d = engine.decoder
    cache = d.new_cache(len(ids) + n)
    token = int(d.prefill(cache, ids)[-1].argmax())
    tokens = []
    for _ in range(n):
        tokens.append(token)
        token = int(np.asarray(d.decode(cache, token)).argmax())
    return tokens


def teacher_forced(engine, ids: np.ndarray, forced: list[int]) -> np.ndarray:
    """Logits [1 + len(forced), V]: the prompt's last position, then each forced token's step."""
    cache = engine.decoder.new_cache(len(ids) + len(forced))
    steps = [engine.decoder.prefill(cache, ids)[-1].copy()]
    steps += [np.array(engine.decoder.decode(cache, t), dtype=np.float32) for t in forced]
    return np.stack(steps)


@pytest.fixture(scope="module")
def gpu_bundles(demo_checkpoint, tmp_path_factory, exporter):
    # the export's own check runs on the CPU provider; the tests below hold the CUDA provider to the bar
    root = tmp_path_factory.mktemp("gpu-bundles")
    return {precision: exporter(demo_checkpoint, root / precision, precision=precision, profile="nvidia-gpu",
                                allow_degraded=True)
            for precision in ("int4", "fp16")}


def test_cuda_engine_keeps_the_kv_cache_in_device_memory(gpu_bundles):
    engine = Engine.from_bundle(gpu_bundles["int4"], profile="nvidia-gpu")
    assert engine.info.provider == "CUDAExecutionProvider"
    assert engine.session.get_providers()[0] == "CUDAExecutionProvider"
    assert engine.decoder.cuda_graph  # the profile's default
    cache = engine.decoder.new_cache(16)
    assert cache.device == "cuda"
    key, value = cache.past(0)
    for buffer in (key, value):
        assert type(buffer.keepalive).__name__ == "OrtValue" and buffer.keepalive.device_name().lower() == "cuda"
    result = engine.complete(GenerationRequest(mode="complete", prompt="def fibonacci(n):\n    ", max_tokens=24,
                                               sampling=GREEDY))
    assert result.usage.completion_tokens >= 1 and result.text.strip()


@pytest.mark.parametrize("precision", ["int4", "fp16"])
def test_cuda_provider_meets_the_profiles_fidelity_bar_against_torch(gpu_bundles, demo_checkpoint, precision):
    """fidelity.measure as the export runs it, with the CUDA provider instead of the CPU one:
    greedy agreement and logit difference within the profile's bar, and the corpus KL
    divergence about what the export measured on the CPU provider."""
    from edge_export import fidelity

    bundle = load_bundle(gpu_bundles[precision])
    report = fidelity.measure(demo_checkpoint, bundle.graph_path, bundle.architecture, bundle.tokenizer_path,
                              bundle.chat_format, corpus_tokens=512, flavour=bundle.graph_flavour,
                              providers=[("CUDAExecutionProvider", {"device_id": "0"}), "CPUExecutionProvider"],
                              device="cuda")
    on_cpu = bundle.manifest["fidelity"]
    print(f"{precision}: CUDA greedy agreement {report.greedy_agreement:.3f}, max logit diff "
          f"{report.max_logit_diff:.3f}, KL {report.kl_divergence_mean:.3g}; the export's CPU provider: "
          f"{on_cpu['greedy_agreement']:.3f}, {on_cpu['max_logit_diff']:.3f}, {on_cpu['kl_divergence_mean']:.3g}")
    min_agree, max_diff = load_profile("nvidia-gpu").fidelity.for_precision(precision)
    assert report.greedy_agreement >= min_agree and report.max_logit_diff <= max_diff, report.as_manifest()
    kl_cpu = on_cpu["kl_divergence_mean"]
    assert abs(report.kl_divergence_mean - kl_cpu) <= 0.25 * kl_cpu + 2e-4, (report.kl_divergence_mean, kl_cpu)


def test_cuda_graph_decoding_gives_the_tokens_of_plain_cuda(gpu_bundles):
    """Decode steps recorded once and replayed: the same greedy tokens and logits as without,
    over two requests (the second replays the first's recording with new inputs)."""
    plain = Engine.from_bundle(gpu_bundles["int4"], profile=cuda_profile(graph=False))
    graphed = Engine.from_bundle(gpu_bundles["int4"], profile=cuda_profile(graph=True))
    assert graphed.decoder.cuda_graph and not plain.decoder.cuda_graph
    for prompt in ("def fibonacci(n):\n    ", "import os\nimport sys\n\ndef main():\n"):
        request = GenerationRequest(mode="complete", prompt=prompt, max_tokens=32, sampling=GREEDY)
        assert graphed.complete(request).token_ids == plain.complete(request).token_ids
    ids = np.asarray(plain.tokenizer.encode("class Stack:\n    def push(self, x):"), dtype=np.int64)
    logits = []
    for engine in (plain, graphed):
        d = engine.decoder
        cache = d.new_cache(len(ids) + 8)
        token = int(d.prefill(cache, ids)[-1].argmax())
        steps = []
        for _ in range(6):
            step = np.array(d.decode(cache, token), dtype=np.float32)
            steps.append(step)
            token = int(step.argmax())
        logits.append(np.stack(steps))
    assert np.abs(logits[0] - logits[1]).max() < 1e-2


@pytest.mark.parametrize("attention", ["default", "no-flash-attention"])
def test_a_short_requests_recording_replays_right_after_a_long_prompt(gpu_bundles, monkeypatch, attention):
    """The decode step is recorded during a short request; a 701-token prompt after it (attention
    kernels work in tiles of 64 to 256 positions) replays that recording: teacher-forced, its
    logits are plain CUDA's at every step. (A replay once kept the recording's
    total_sequence_length and attended to its ~12 positions: logits 3 to 4 off from the first
    step.) Also with onnxruntime's flash attention off, as on GPUs where GroupQueryAttention
    takes another kernel."""
    if attention == "no-flash-attention":
        monkeypatch.setenv("ORT_DISABLE_FLASH_ATTENTION", "1")  # read when the session is made
    plain = Engine.from_bundle(gpu_bundles["int4"], profile=cuda_profile(graph=False))
    graphed = Engine.from_bundle(gpu_bundles["int4"], profile=cuda_profile(graph=True))
    short = GenerationRequest(mode="complete", prompt="def fibonacci(n):\n    ", max_tokens=8, sampling=GREEDY)
    for engine in (plain, graphed):
        engine.complete(short)
    source = (Path(__file__).resolve().parents[2] / "edge_runtime" / "sampling.py").read_text()
    ids = np.asarray([1] + plain.tokenizer.encode(source)[:700])
    assert len(ids) == 701
    forced = greedy_continuation(plain, ids, 16)  # plain CUDA's, fed to both
    assert np.abs(teacher_forced(plain, ids, forced) - teacher_forced(graphed, ids, forced)).max() < 1e-2


@pytest.mark.parametrize("variant", ["cuda", "cuda-graph"])
def test_a_follow_up_prompt_on_cuda_reuses_the_cached_rows_and_gives_the_uncached_tokens(gpu_bundles, variant):
    """The prompt cache on the GPU: the next turn prefills only its new part into the device
    buffers and decodes as a run of its whole prompt does."""
    engine = Engine.from_bundle(gpu_bundles["fp16"], profile=cuda_profile(graph=variant == "cuda-graph"))

    def complete(prompt, **kw):
        return engine.complete(GenerationRequest(mode="complete", prompt=prompt, max_tokens=16, sampling=GREEDY,
                                                 **kw))

    first = complete("def fibonacci(n):\n    ")
    follow_up = "def fibonacci(n):\n    " + first.text + "\n\ndef main():\n"
    cached = complete(follow_up)
    assert cached.usage.cached_prompt_tokens >= first.usage.prompt_tokens - 1
    uncached = complete(follow_up, cache_prompt=False)
    assert uncached.usage.cached_prompt_tokens == 0
    assert cached.token_ids == uncached.token_ids


def test_every_node_of_a_decode_step_runs_on_the_gpu(gpu_bundles, tmp_path):
    """onnxruntime's profile of prefill and decode steps: no node falls back to the CPU
    provider (each would copy activations between host and device inside the step)."""
    import json
    from collections import Counter

    import onnxruntime as ort

    from edge_runtime.gqa_decoder import SharedKVDecoder

    bundle = load_bundle(gpu_bundles["int4"])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(str(bundle.graph_path), sess_options=options,
                                   providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    decoder = SharedKVDecoder(ort, session, bundle.architecture, device="cuda", max_length=64)
    cache = decoder.new_cache(32)
    token = int(decoder.prefill(cache, np.asarray([1, 822, 18755, 29898, 29876, 1125]))[-1].argmax())
    for _ in range(4):
        token = int(decoder.decode(cache, token).argmax())
    events = json.loads(open(session.end_profiling()).read())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    by_provider = Counter((e["args"]["op_name"], e["args"]["provider"]) for e in nodes)
    assert nodes and {p for _, p in by_provider} == {"CUDAExecutionProvider"}, by_provider


@pytest.mark.parametrize("chunks", [1, 2])
def test_fp16_graph_steps_on_cuda_equal_the_cpu_providers(tiny_checkpoint, tmp_path, chunks):
    """One float16 graph on the two providers, step by step (prefill in `chunks` pieces, then
    teacher-forced decode steps): the first step that differs says which path is off."""
    import onnxruntime as ort

    from edge_export.checkpoint import read_checkpoint
    from edge_export.graph_builder import build_decoder_graph
    from edge_runtime.gqa_decoder import SharedKVDecoder

    info = read_checkpoint(tiny_checkpoint)
    graph = build_decoder_graph(info, tmp_path / "model.onnx", precision="fp16", max_length=128)[0]
    ids = np.asarray([1, 822, 18755, 29898, 29876, 1125, 13, 1678])
    steps = {}
    for device, providers in (("cpu", ["CPUExecutionProvider"]),
                              ("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"])):
        session = ort.InferenceSession(str(graph), providers=providers)
        decoder = SharedKVDecoder(ort, session, info.architecture, device=device, max_length=128)
        cache = decoder.new_cache(len(ids) + 8)
        for piece in np.array_split(ids, chunks):
            prefill = decoder.prefill(cache, piece)[-1].copy()
        steps[device] = [prefill] + [np.array(decoder.decode(cache, t), dtype=np.float32)
                                     for t in (29871, 13, 1678, 736, 29889)]
    for i, (cpu, cuda) in enumerate(zip(steps["cpu"], steps["cuda"])):
        what = "prefill" if i == 0 else f"decode step {i}"
        assert np.abs(cpu - cuda).max() < 0.05 * max(1.0, float(np.abs(cpu).max())), what


FPA_INTB = {"ep.cuda.fpa_intb_gemm": "1"}  # onnxruntime's TensorRT-LLM int4 kernels (GEMV for decode steps)


@pytest.fixture(scope="module")
def symmetric_int4(demo_checkpoint, tmp_path_factory, exporter):
    """nvidia-gpu's int4 in the layout onnxruntime's TensorRT-LLM kernels take: symmetric (no
    zero points), block 32 (its default build's only block size)."""
    root = tmp_path_factory.mktemp("fpa-intb")
    text, blocks = re.subn(r"(?m)^block_size = 128", "block_size = 32", profile_text("nvidia-gpu"))
    text, symmetric = re.subn(r"(?m)^symmetric = false", "symmetric = true", text)
    assert blocks == symmetric == 1
    (root / "nvidia-gpu.toml").write_text(text)
    return exporter(demo_checkpoint, root / "int4-b32-sym", precision="int4", profile=str(root / "nvidia-gpu.toml"),
                    allow_degraded=True)


@pytest.mark.parametrize("graph", [False, True])
def test_onnxruntimes_tensorrt_llm_int4_kernels_give_the_logits_of_its_default_ones(symmetric_int4, graph):
    """The profile's session_config turning on onnxruntime's TensorRT-LLM int4 kernels
    (ep.cuda.fpa_intb_gemm): a prompt and 32 teacher-forced decode steps give the default
    kernels' logits within float16 rounding and the same greedy picks, with CUDA graphs too."""
    default = Engine.from_bundle(symmetric_int4, profile=cuda_profile(graph))
    fpa = Engine.from_bundle(symmetric_int4, profile=cuda_profile(graph).with_session_config(FPA_INTB))
    ids = np.asarray(default.tokenizer.encode("import os\nimport sys\n\ndef main(argv):\n    "), dtype=np.int64)
    forced = greedy_continuation(default, ids, 32)
    ours, theirs = teacher_forced(fpa, ids, forced), teacher_forced(default, ids, forced)
    print(f"fpA_intB vs default kernels: max |logit diff| {np.abs(ours - theirs).max():.4f}")
    assert np.abs(ours - theirs).max() < 0.1
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.95


def test_the_profiles_session_config_runs_onnxruntimes_tensorrt_llm_int4_kernels(symmetric_int4):
    """The decode step's kernels, traced on the GPU (benchmarks/gpu_kernels.py): with
    ep.cuda.fpa_intb_gemm on, onnxruntime's TensorRT-LLM int4 kernels (namespace fpA_intB) run
    the weights of a symmetric block-32 bundle; without it, they do not."""
    import importlib.util

    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():  # the trace is torch's CUPTI profiler: a CPU build of torch has none
        pytest.skip("torch has no CUDA here: the kernel trace needs a CUDA build of torch")
    bench = Path(__file__).resolve().parents[2] / "benchmarks"
    spec = importlib.util.spec_from_file_location("bench_gpu_kernels", bench / "gpu_kernels.py")
    gpu_kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_kernels)

    def kernels(session_config):
        s = gpu_kernels.trace_decode(symmetric_int4, profile="nvidia-gpu", variant="cuda", context=32, steps=4,
                                     session_config=session_config)
        return [k["kernel"] for k in s["kernels"]]

    on, off = kernels(FPA_INTB), kernels(None)
    assert any("fpa_intb" in name.lower() for name in on), on
    assert not any("fpa_intb" in name.lower() for name in off), off


def test_bench_gives_the_gpu_roofline(gpu_bundles):
    """`edge-runtime bench` on a CUDA bundle measures the GPU's own memory (a Neg in device
    memory), not the host's, and gives each decode speed against it."""
    from edge_runtime.bench import run_bench

    r = run_bench(str(gpu_bundles["int4"]), profile="nvidia-gpu", prefill_tokens=16, contexts=(16, 48),
                  decode_tokens=8, bandwidth_mib=256)
    assert r.provider == "CUDAExecutionProvider"
    assert r.bandwidth["device"] == "cuda" and r.bandwidth["bandwidth"] > 0 and "read_bandwidth" not in r.bandwidth
    assert set(r.roofline_percent) == {16, 48} and r.read_roofline_percent == {}
    for ctx, tps in r.decode_tokens_per_s.items():
        assert r.roofline_percent[ctx] == pytest.approx(100 * tps * r.step_bytes[ctx] / r.bandwidth["bandwidth"])
    assert r.step_bytes[48] > r.step_bytes[16]  # the float16 KV cache of 32 more tokens
