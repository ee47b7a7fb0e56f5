"""Export a checkpoint to ONNX with a KV cache using optimum's exporter
(task text-generation-with-past). Graph flavour: `optimum-kv-concat`."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from .checkpoint import CheckpointInfo

EXTERNAL_DATA_THRESHOLD = 2 * 1024**3  # protobuf's 2 GB limit


def export_onnx(info: CheckpointInfo, workdir: Path) -> Path:
    """Write `workdir/model.onnx` (+ external data for models over 2 GB) in fp32;
    returns the graph path."""
    from optimum.exporters.onnx import main_export

    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("transformers", "optimum", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(
            str(info.path),
            output=str(workdir),
            task="text-generation-with-past",
            device="cpu",
            dtype="fp32",
            do_validation=False,  # fidelity.py measures the result against torch instead
            no_post_process=True,
            local_files_only=True,
        )
    graph = workdir / "model.onnx"
    if not graph.is_file():
        raise RuntimeError(f"optimum's exporter wrote no model.onnx into {workdir}")
    return graph
