"""Weight quantization with onnxruntime's own block-wise quantizer (MatMulNBits,
4 or 8 bits), and fp16 conversion for GPU profiles.

Per-tensor dynamic int8 quantization is deliberately absent: it wrecks LLM
accuracy. Layers matching `keep_unquantized` (e.g. the lm_head) stay in float.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_runtime.profiles import node_matches

from .onnx_export import EXTERNAL_DATA_THRESHOLD

BITS = {"int4": 4, "int8": 8}


@dataclass(frozen=True)
class QuantRecipe:
    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int
    keep_unquantized: tuple[str, ...]
    algorithm: str = "rtn"  # "rtn" (round to nearest), "hqq" (optimum graph) or "gptq" (fused graph)
    # least-squares block scales: only the fused graph's builder (graph_builder.block_quantize_mse) does
    # this; quantize_weights, onnxruntime's quantizer, never does
    scale_search: bool = False

    def as_manifest(self, excluded_nodes: list[str]) -> dict:
        return {"method": "MatMulNBits", **asdict(self), "keep_unquantized": list(self.keep_unquantized),
                "excluded_nodes": excluded_nodes}


def _model_size(model) -> int:
    try:
        return model.ByteSize()
    except ValueError:  # over 2 GB
        return EXTERNAL_DATA_THRESHOLD + 1


def quantize_weights(graph: Path, out: Path, recipe: QuantRecipe) -> tuple[list[Path], list[str]]:
    """MatMulNBits-quantize every MatMul weight except the kept layers.
    Returns (files written, names of the nodes left in float)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    model = onnx.load(str(graph))  # loads external data too
    excluded = [n.name for n in model.graph.node if n.op_type == "MatMul" and node_matches(n.name, recipe.keep_unquantized)]
    if recipe.algorithm == "hqq":
        algo = HQQWeightOnlyQuantConfig(block_size=recipe.block_size, bits=recipe.bits)
    elif recipe.algorithm == "rtn":
        algo = DefaultWeightOnlyQuantConfig(block_size=recipe.block_size, is_symmetric=recipe.symmetric,
                                            accuracy_level=recipe.accuracy_level or None, bits=recipe.bits)
    else:
        raise ValueError(f"unknown quantization algorithm {recipe.algorithm!r} (rtn, hqq)")
    quantizer = MatMulNBitsQuantizer(model, bits=recipe.bits, block_size=recipe.block_size,
                                     is_symmetric=recipe.symmetric, accuracy_level=recipe.accuracy_level or None,
                                     nodes_to_exclude=excluded, algo_config=algo)
    with warnings.catch_warnings():
        # onnxruntime's HQQ hands torch read-only numpy arrays (it only reads them): torch's
        # "not writable" UserWarning, with its source line, is not the user's to act on
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        quantizer.process()
    qmodel = quantizer.model.model
    if recipe.algorithm == "hqq" and recipe.accuracy_level:
        for node in qmodel.graph.node:
            if node.op_type == "MatMulNBits":
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", recipe.accuracy_level))
    del model
    return _save(qmodel, out), excluded


def _save(model, out: Path) -> list[Path]:
    import onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    if _model_size(model) > EXTERNAL_DATA_THRESHOLD:
        data_name = out.name + ".data"
        onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        return [out, out.parent / data_name]
    onnx.save_model(model, str(out))
    return [out]


def convert_fp16(graph: Path, out: Path) -> list[Path]:
    """All float weights and activations, the KV cache and logits included, to fp16."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(graph))
    model = convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)
    return _save(model, out)


def copy_float(graph: Path, out: Path) -> list[Path]:
    """fp32: the exported graph as it is, re-saved under the bundle's file name."""
    import onnx

    return _save(onnx.load(str(graph)), out)
