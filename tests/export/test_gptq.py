"""GPTQ (export/gptq.py) and its calibration Hessians (export/calibration.py)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_export.calibration import LayerwiseHessians
from edge_export.checkpoint import read_checkpoint
from edge_export.gptq import gptq_quantize, inverse_hessian
from edge_export.graph_builder import block_quantize_mse, dequantize_reference


class InputSource:
    """Activations with strongly correlated channels and a few loud ones, as LLM inputs have:
    every draw from one source shares its correlations."""

    def __init__(self, rng: np.random.Generator, k: int) -> None:
        self.rng = rng
        mix = rng.standard_normal((k, k)).astype(np.float32) / np.sqrt(k)
        self.mix = np.eye(k, dtype=np.float32) + 2 * mix
        self.mix[:, rng.choice(k, 4, replace=False)] *= 8

    def draw(self, tokens: int) -> np.ndarray:
        return (self.rng.standard_normal((tokens, self.mix.shape[0])) @ self.mix).astype(np.float32)


def correlated_inputs(rng: np.random.Generator, tokens: int, k: int) -> np.ndarray:
    return InputSource(rng, k).draw(tokens)


def deq_nk(q, k: int, bits: int, block: int) -> np.ndarray:
    return dequantize_reference(q, k, bits=bits, block_size=block).T  # [N, K]


def test_inverse_hessian_is_the_upper_cholesky_factor_of_the_damped_inverse():
    """U upper triangular with a positive diagonal and U^T U = (H + damping)^-1, checked
    against numpy's float64 inverse; inputs that never fire are reported, not inverted."""
    rng = np.random.default_rng(3)
    k = 160
    x = correlated_inputs(rng, 600, k).astype(np.float64)
    x[:, [7, 120]] = 0.0  # two inputs never seen
    h = x.T @ x
    hinv = inverse_hessian(h, damp=0.01)
    assert hinv.upper.shape == (k, k) and hinv.upper.dtype == np.float32 and hinv.upper.flags.c_contiguous
    assert list(np.flatnonzero(hinv.dead)) == [7, 120]
    u = hinv.upper.astype(np.float64)
    assert np.array_equal(np.tril(u, -1), np.zeros((k, k))) and (np.diag(u) > 0).all()
    damped = h.copy()
    diag = np.diag(damped).copy()
    diag[diag <= 0] = 1.0
    damped[np.diag_indices(k)] = diag + 0.01 * diag.mean()
    expected = np.linalg.inv(damped)
    assert np.abs(u.T @ u - expected).max() <= 1e-5 * np.abs(expected).max()
    # the factor is the unique one: numpy's Cholesky of the inverse, transposed
    assert np.allclose(u, np.linalg.cholesky(expected).T, rtol=1e-3, atol=1e-4 * np.abs(u).max())


def test_an_indefinite_hessian_is_damped_more_and_a_non_square_one_refused():
    h = np.array([[1.0, 1.05], [1.05, 1.0]])  # eigenvalues 2.05 and -0.05: 1 % damping is not enough
    u = inverse_hessian(h, damp=0.01).upper.astype(np.float64)
    damped = h + 0.1 * np.eye(2)  # the second try: ten times the damping
    assert np.allclose(u.T @ u, np.linalg.inv(damped), rtol=1e-4)
    with pytest.raises(ValueError, match="not positive definite"):  # eigenvalue -2: still -1 after 100x
        inverse_hessian(np.array([[1.0, 3.0], [3.0, 1.0]]), damp=0.01)
    with pytest.raises(ValueError, match="square"):
        inverse_hessian(np.ones((3, 4)))


@pytest.mark.parametrize("symmetric", [True, False])
def test_uncorrelated_inputs_leave_nothing_to_feed_forward(symmetric):
    """With a diagonal Hessian no column's error moves to another: GPTQ is the per-block
    least-squares search, code for code."""
    rng = np.random.default_rng(0)
    w = (rng.standard_t(df=3, size=(40, 96)) * 0.02).astype(np.float32)  # [N, K]
    hinv = inverse_hessian(np.diag(rng.uniform(0.5, 2.0, 96)))
    got = gptq_quantize(w, hinv, bits=4, block_size=32, symmetric=symmetric, scale_search=True)
    want = block_quantize_mse(np.ascontiguousarray(w.T), bits=4, block_size=32, symmetric=symmetric)
    np.testing.assert_array_equal(got.packed, want.packed)
    np.testing.assert_array_equal(got.scales, want.scales)
    if not symmetric:
        np.testing.assert_array_equal(got.zero_points, want.zero_points)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_output_error_on_the_calibration_inputs_is_below_round_to_nearest(bits, symmetric):
    """What GPTQ minimises: || X W^T - X Q^T || on inputs like the calibration ones."""
    rng = np.random.default_rng(bits)
    k, n = 128, 64
    w = (rng.standard_t(df=4, size=(n, k)) * 0.02).astype(np.float32)
    source = InputSource(rng, k)
    x = source.draw(512)
    held_out = source.draw(256)  # same distribution, other tokens
    hinv = inverse_hessian(x.T.astype(np.float64) @ x)
    before = w.copy()
    gptq = deq_nk(gptq_quantize(w, hinv, bits=bits, block_size=32, symmetric=symmetric, scale_search=True),
                  k, bits, 32)
    np.testing.assert_array_equal(w, before)  # the caller's weight is not the working copy
    mse = deq_nk(block_quantize_mse(np.ascontiguousarray(w.T), bits=bits, block_size=32, symmetric=symmetric),
                 k, bits, 32)
    for inputs in (x, held_out):
        ref = inputs @ w.T
        err_gptq = np.linalg.norm(inputs @ gptq.T - ref)
        err_mse = np.linalg.norm(inputs @ mse.T - ref)
        assert err_gptq < 0.8 * err_mse


def test_gptq_weights_run_in_onnxruntime_matmulnbits_as_dequantized():
    """The codes, scales and zero points are MatMulNBits' layout (K padded to whole blocks)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    k, n = 80, 24  # 80 = 2.5 blocks of 32: the last block is padded
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = correlated_inputs(rng, 200, k)
    q = gptq_quantize(w, inverse_hessian(x.T @ x), bits=4, block_size=32, symmetric=False, scale_search=False)
    node = helper.make_node("MatMulNBits", ["x", "B", "scales", "zp"], ["y"], domain="com.microsoft", K=k, N=n,
                            bits=4, block_size=32)
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, n])],
                              initializer=[numpy_helper.from_array(q.packed, "B"),
                                           numpy_helper.from_array(q.scales, "scales"),
                                           numpy_helper.from_array(q.zero_points, "zp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x[:5]})
    np.testing.assert_allclose(y, x[:5] @ deq_nk(q, k, 4, 32).T, rtol=1e-4, atol=1e-4)


def test_inputs_never_seen_get_zero_weights_and_float16_scales_are_honoured():
    rng = np.random.default_rng(4)
    k, n = 64, 16
    x = rng.standard_normal((100, k)).astype(np.float32)
    x[:, 10] = 0.0  # a dead input channel
    w = rng.standard_normal((n, k)).astype(np.float32)
    q = gptq_quantize(w, inverse_hessian(x.T @ x), bits=4, block_size=32, symmetric=True, scale_search=True,
                      scale_dtype=np.dtype(np.float16))
    assert q.scales.dtype == np.float16
    deq = deq_nk(q, k, 4, 32)
    assert np.all(deq[:, 10] == 0)
    assert np.linalg.norm(x @ deq.T - x @ w.T) / np.linalg.norm(x @ w.T) < 0.15


def test_a_hessian_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="Hessian is for 8 inputs"):
        gptq_quantize(np.ones((4, 16), np.float32), inverse_hessian(np.eye(8)), bits=4, block_size=16,
                      symmetric=True, scale_search=False)


# -- the calibration Hessians ------------------------------------------------------------------------------------------
def test_layerwise_hessians_equal_the_full_models_inputs(tiny_checkpoint):
    """Layer by layer (one LlamaDecoderLayer at a time, weights from the safetensors files) the
    inputs of every linear are those of the whole Hugging Face model on the same windows."""
    import torch
    from transformers import AutoModelForCausalLM

    windows = [[1, 822, 18755, 29898, 29876, 1125, 13], [1, 5215, 2897, 13]]
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32).eval()
    seen: dict[str, np.ndarray] = {}

    def recorder(name: str):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double().numpy()
            seen[name] = seen.get(name, 0) + x.T @ x
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(recorder(name + ".weight"))
    with torch.no_grad():
        for ids in windows:
            model(torch.tensor([ids]))

    hessians = LayerwiseHessians(read_checkpoint(tiny_checkpoint), windows)
    assert hessians.tokens == 11
    layers = model.config.num_hidden_layers
    names = [f"model.layers.{i}.{part}.weight" for i in range(layers)
             for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + ["lm_head.weight"]
    for name in names:
        np.testing.assert_allclose(hessians.for_weight(name), seen[name], rtol=2e-4, atol=1e-3, err_msg=name)
    with pytest.raises(ValueError, match="passed already"):
        hessians.for_weight("model.layers.0.mlp.down_proj.weight")
    with pytest.raises(KeyError, match="no calibration Hessian"):
        hessians.for_weight("model.norm.weight")
