"""int8 and int4 bundles of the trained demo model meet their profile's fidelity
thresholds and say so in the manifest; a bundle below its threshold is refused
unless --allow-degraded, and then says it is degraded."""

from __future__ import annotations

import json

import pytest

from edge_runtime.bundle import load_bundle
from edge_runtime.profiles import load_profile, profile_text


@pytest.mark.parametrize("graph,precision", [("optimum", "int8"), ("optimum", "int4"), ("fused", "int4")])
def test_demo_model_quantized_bundle_meets_profile_threshold(demo_checkpoint, tmp_path, graph, precision,
                                                            exporter):
    bundle = load_bundle(exporter(demo_checkpoint, tmp_path / precision, precision=precision, graph=graph))
    assert bundle.graph_flavour == {"optimum": "optimum-kv-concat", "fused": "gqa-shared-kv"}[graph]
    fidelity = bundle.manifest["fidelity"]
    min_agree, max_diff = load_profile("cpu-x86_64").fidelity.for_precision(precision)
    assert fidelity["passed"] is True and fidelity["degraded"] is False
    assert fidelity["greedy_agreement"] >= min_agree and fidelity["max_logit_diff"] <= max_diff
    assert fidelity["threshold"] == {"min_greedy_agreement": min_agree, "max_logit_diff": max_diff}
    assert fidelity["prompts"] == 12  # 8 completion + 4 infill: the demo model has the infilling tokens
    # the held-out corpus: quantization shows (fp32 graphs measure < 1e-6) but stays small
    assert fidelity["corpus_positions"] == 515
    assert 1e-5 < fidelity["kl_divergence_mean"] < 0.01 and fidelity["corpus_top1_agreement"] >= 0.9
    quant = bundle.manifest["quantization"]
    assert quant["method"] == "MatMulNBits" and quant["bits"] == {"int8": 8, "int4": 4}[precision]
    assert any("lm_head" in n for n in quant["excluded_nodes"])
    # the profile's blocks of 128 with zero points and the least-squares scale search, and
    # GPTQ calibrated on the shipped text: only the fused graph's builder does the last two,
    # so the optimum graph takes the profile's optimum_block_size (32), where rounding keeps fidelity
    assert quant["block_size"] == {"fused": 128, "optimum": 32}[graph] and quant["symmetric"] is False
    if graph == "fused":
        assert quant["scale_search"] is True and quant["kept_bits"] == 8 and quant["kept_block_size"] == 128
        assert quant["algorithm"] == "gptq" and quant["calibration"]["text"] == "gptq-calibration.txt"
        # the lm_head in two passes: int4, then its top 32 logits from the int8 rows
        assert quant["lm_head_refine_top_k"] == 32
        assert "/lm_head/refine/GatherBlockQuantized" in quant["excluded_nodes"]
        assert quant["embedding_bits"] == 8  # the token embedding table in int8 blocks
    else:
        assert quant["scale_search"] is False
        assert quant["algorithm"] == "rtn" and quant["calibration"] is None
    # the profile's int8 KV cache (prompts attend in float); the optimum graph keeps a float one
    if graph == "fused":
        assert bundle.manifest["kv_cache"]["prompt_attention"] == "float"
        assert bundle.manifest["kv_cache"]["int8_kernel_rows_after_cache"] == 32
        assert bundle.manifest["profile"]["kv_cache_dtype"] == "int8"
    else:
        assert bundle.manifest["kv_cache"] is None and bundle.manifest["profile"]["kv_cache_dtype"] == "float32"


def test_gptq_brings_the_int4_bundle_closer_to_torch_than_rounding(demo_checkpoint, tmp_path, exporter):
    """On the held-out corpus (not the calibration text) the profile's GPTQ bundle diverges
    from torch fp32 less than the same recipe rounded block by block (--algorithm rtn)."""
    kl = {}
    for algorithm in ("gptq", "rtn"):
        path = exporter(demo_checkpoint, tmp_path / algorithm, precision="int4", graph="fused", algorithm=algorithm,
                        fidelity_corpus_tokens=1024)
        manifest = json.loads((path / "bundle.json").read_text())
        kl[algorithm] = manifest["fidelity"]["kl_divergence_mean"]
        # a rounded int4 head's tail crosses the int4 max-logit bar: rtn keeps the int8 head in one pass
        assert manifest["quantization"]["lm_head_refine_top_k"] == {"gptq": 32, "rtn": 0}[algorithm]
    assert kl["gptq"] < 0.8 * kl["rtn"]


def test_gpu_profile_int4_bundle_with_float16_scales_meets_its_threshold(demo_checkpoint, tmp_path, exporter):
    """The GPU profiles' layout (float16 activations and scales, block 128, zero points, float
    lm_head) through GPTQ: the codes are taken against the scales as stored in float16, and
    the bundle passes its profile's bar against torch (measured on the CPU provider)."""
    import onnx
    from onnx import TensorProto

    path = exporter(demo_checkpoint, tmp_path / "gpu-int4", precision="int4", profile="nvidia-gpu")
    manifest = json.loads((path / "bundle.json").read_text())
    quant, fidelity = manifest["quantization"], manifest["fidelity"]
    assert quant["algorithm"] == "gptq" and quant["block_size"] == 128 and quant["symmetric"] is False
    assert fidelity["passed"] is True and fidelity["kl_divergence_mean"] < 0.002
    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    scales = {i.name: i.data_type for i in model.graph.initializer if i.name.endswith("weight_scales")}
    assert scales and set(scales.values()) == {TensorProto.FLOAT16}


def test_below_threshold_fails_with_numbers_unless_allowed(tiny_checkpoint, tmp_path, exporter):
    from edge_export.pipeline import ExportError

    strict = tmp_path / "strict.toml"
    text = profile_text("cpu-x86_64")
    strict.write_text(text.replace('name = "cpu-x86_64"', 'name = "strict"', 1)
                      .replace("fp32 = 0.01 }", "fp32 = 0.0 }"))
    with pytest.raises(ExportError, match=r"max logit difference .* > 0 .*--allow-degraded"):
        exporter(tiny_checkpoint, tmp_path / "b", profile=str(strict))
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()
    exporter(tiny_checkpoint, tmp_path / "b", profile=str(strict), allow_degraded=True)
    fidelity = json.loads((tmp_path / "b" / "bundle.json").read_text())["fidelity"]
    assert fidelity["passed"] is False and fidelity["degraded"] is True and fidelity["problems"]


def test_int8_kv_cache_bundle_serves_what_torch_generates(demo_checkpoint, tmp_path, exporter):
    """An int4 bundle exported with --kv-cache-bits 8 keeps an int8 KV cache; the engine
    drives it like any other, its memory plan counts a byte per element, and its greedy
    tokens on a prompt the int4 graph keeps whole (fidelity per prompt) are torch's."""
    import numpy as np

    import torch_reference
    from edge_runtime.engine import Engine
    from edge_runtime.types import GenerationRequest, SamplingParams

    path = exporter(demo_checkpoint, tmp_path / "int4-kv8", precision="int4", graph="fused", kv_cache_bits=8)
    fidelity = json.loads((path / "bundle.json").read_text())["fidelity"]
    assert fidelity["passed"] is True and fidelity["kl_divergence_mean"] < 0.01
    engine = Engine.from_bundle(path)
    assert engine.decoder.kv_dtype == np.int8
    arch, memory = engine.bundle.architecture, engine.info.memory
    assert memory.kv_dtype == "int8"
    assert memory.kv_cache_bytes == 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * memory.context
    # a completion prompt whose 32 greedy tokens the export found identical to torch's (which
    # prompts hold a near-tie that int4 noise flips depends on how the demo model trained)
    from edge_export.fidelity import COMPLETION_PROMPTS

    whole = [prompt for prompt, row in zip(COMPLETION_PROMPTS, fidelity["per_prompt"])
             if row["mode"] == "complete" and row["greedy_agreement_strict"] == 1.0]
    assert whole, fidelity["per_prompt"]
    items = list(engine.generate(GenerationRequest(mode="complete", prompt=whole[0], max_tokens=16,
                                                   sampling=SamplingParams(temperature=0.0))))
    result = items[-1]
    expected = torch_reference.greedy(demo_checkpoint, list(result.prompt_token_ids), 16, frozenset({2}))
    assert list(result.token_ids) == expected


def test_greedy_agreement_goes_through_ties_and_stops_at_a_real_difference():
    """A token torch ranks within TIE_LOGITS of its own first is a tie: the measure goes on
    along torch's tokens; a token torch ranks lower ends it. The strict measure stops at both."""
    import numpy as np

    from edge_export.fidelity import TIE_LOGITS, agreement_through_ties, prefix_agreement

    ref = [5, 6, 7, 8]
    logits = np.zeros((4, 10), dtype=np.float32)
    logits[np.arange(4), ref] = 3.0
    logits[1, 2] = 3.0 - TIE_LOGITS / 2  # position 1: token 2 nearly as likely as torch's 6
    logits[3, 4] = 3.0 - 4 * TIE_LOGITS  # position 3: token 4 clearly less likely than 8
    assert agreement_through_ties(ref, [5, 2, 7, 8], logits) == 1.0
    assert prefix_agreement(ref, [5, 2, 7, 8]) == 0.25
    assert agreement_through_ties(ref, [5, 2, 7, 4], logits) == 0.75
    assert agreement_through_ties(ref, [9, 6, 7, 8], logits) == 0.0


def test_thresholds_pass_at_the_bar_and_refuse_nan():
    """At exactly the threshold a bundle passes (a minimum and a maximum, README); a NaN logit
    difference -- the graph put NaN in some logits -- is not within any bar (NaN > x is False)."""
    from edge_export.fidelity import FidelityReport
    from edge_export.pipeline import check_fidelity

    profile = load_profile("cpu-x86_64")
    min_agree, max_diff = profile.fidelity.for_precision("int4")

    def report(agreement, diff):
        return FidelityReport(n_tokens=32, prompts=1, greedy_agreement=agreement, greedy_agreement_min=agreement,
                              teacher_forced_agreement=1.0, max_logit_diff=diff, mean_logit_diff=0.0, per_prompt=())

    assert check_fidelity(report(min_agree, max_diff), profile, "int4") == []
    assert len(check_fidelity(report(min_agree - 1e-9, max_diff + 1e-9), profile, "int4")) == 2
    assert check_fidelity(report(1.0, float("nan")), profile, "int4") == ["max logit difference nan > 1"]
    assert len(check_fidelity(report(float("nan"), 0.0), profile, "int4")) == 1


def test_fidelity_is_measured_with_the_profile_session_config(tiny_checkpoint, tmp_path, exporter):
    """The engine opens the graph with the profile's session_config (engine.make_session); the
    measure must too, or a setting that changes the kernels' numbers (ARM's bfloat16 fast math)
    would be served unmeasured. `session.load_model_format = "ORT"` shows that it is applied:
    no .onnx file opens under it, so the export stops at the measure, naming it."""
    from edge_export.pipeline import ExportError

    profile = tmp_path / "cfg.toml"
    text = profile_text("cpu-x86_64")
    profile.write_text(text.replace('name = "cpu-x86_64"', 'name = "cfg"\n'
                                    'session_config = { "session.load_model_format" = "ORT" }', 1))
    assert load_profile(str(profile)).ort_session_config() == {"session.load_model_format": "ORT"}
    with pytest.raises(ExportError, match=r"could not open model.onnx with session config .*load_model_format"):
        exporter(tiny_checkpoint, tmp_path / "b", profile=str(profile))
    assert not (tmp_path / "b").exists()
