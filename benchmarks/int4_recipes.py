"""Int4 recipes side by side on the trained demo model (issue #8: "choose by measuring").

For each recipe it builds the fused decoder graph of the demo model
(``graph_builder.build_decoder_graph``) and measures, against torch fp32 greedy decoding
of the same checkpoint (``export/fidelity.py``, the export's own prompts):

* greedy agreement (mean share of 32 generated tokens before the first difference),
  its minimum over prompts, teacher-forced agreement, max logit difference;
* the bytes one decode step reads (every weight except the embedding table) -- what
  decode speed is proportional to when the step is memory bound.

Recipes (block 32, accuracy level 4 throughout):

* ``asym`` / ``sym``: zero points or not; ``rtn`` = onnxruntime's round-to-nearest over
  the block's range, ``mse`` = the least-squares scale search (``block_quantize_mse``);
* ``head8`` / ``head4``: lm_head as MatMulNBits int8 (the CPU profiles' ``keep_bits``)
  or int4 like every other layer (onnxruntime-genai's recipe is ``sym rtn head4``).

    python benchmarks/int4_recipes.py                   # all recipes, ~2 min each on 2 cores
    python benchmarks/int4_recipes.py --recipes asym-mse-head8 sym-mse-head4 --out /tmp/recipes

The demo model is trained on first use (``export/demo_model.py``, cached). Small models
are harsher than 7B ones: the numbers rank recipes, they do not forecast Code Llama 7B.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Recipe:
    name: str
    symmetric: bool
    scale_search: bool
    head_bits: int  # 8: lm_head kept as int8; 4: quantized with the rest


def all_recipes() -> dict[str, Recipe]:
    out = {}
    for sym in (False, True):
        for search in (False, True):
            for head in (8, 4):
                r = Recipe(f"{'sym' if sym else 'asym'}-{'mse' if search else 'rtn'}-head{head}", sym, search, head)
                out[r.name] = r
    return out


def weight_bytes_per_step(graph: Path) -> int:
    """Bytes of every initializer a decode step reads: all but the embedding table."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        if "embed_tokens" in t.name:
            continue
        length = next((int(e.value) for e in t.external_data if e.key == "length"), None)
        total += length if length is not None else len(t.raw_data)
    return total


def measure(recipe: Recipe, checkpoint: Path, work: Path) -> dict:
    from edge_export import fidelity
    from edge_export.checkpoint import read_checkpoint
    from edge_export.graph_builder import build_decoder_graph
    from edge_runtime.bundle import FLAVOUR_GQA_SHARED_KV

    info = read_checkpoint(checkpoint)
    graph = work / recipe.name / "model.onnx"
    t0 = time.perf_counter()
    build_decoder_graph(info, graph, precision="int4", block_size=32, symmetric=recipe.symmetric,
                        accuracy_level=4, keep_unquantized=("lm_head",) if recipe.head_bits == 8 else (),
                        keep_bits=8 if recipe.head_bits == 8 else None, max_length=512,
                        scale_search=recipe.scale_search)
    build_s = time.perf_counter() - t0
    report = fidelity.measure(info.path, graph, info.architecture, info.tokenizer_path, info.chat_format,
                              flavour=FLAVOUR_GQA_SHARED_KV)
    return {"recipe": recipe.name, "greedy_agreement": round(report.greedy_agreement, 3),
            "greedy_agreement_min": round(report.greedy_agreement_min, 3),
            "teacher_forced_agreement": round(report.teacher_forced_agreement, 3),
            "max_logit_diff": round(report.max_logit_diff, 3), "mean_logit_diff": round(report.mean_logit_diff, 4),
            "weight_bytes_per_step": weight_bytes_per_step(graph), "build_s": round(build_s, 1)}


def format_table(rows: list[dict]) -> str:
    head = ("| recipe | greedy agreement (min) | teacher-forced | max logit diff | weights read per step |\n"
            "|---|---|---|---|---|")
    lines = [f"| {r['recipe']} | {r['greedy_agreement']:.3f} ({r['greedy_agreement_min']:.2f}) | "
             f"{r['teacher_forced_agreement']:.3f} | {r['max_logit_diff']:.3f} | "
             f"{r['weight_bytes_per_step'] / 2**20:.1f} MiB |" for r in rows]
    return "\n".join([head, *lines])


def main(argv: list[str] | None = None) -> int:
    recipes = all_recipes()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", choices=sorted(recipes), default=list(recipes))
    p.add_argument("--checkpoint", type=Path, help="default: the trained demo model (cached)")
    p.add_argument("--out", type=Path, default=Path("int4-recipes"), help="writes <out>.json")
    args = p.parse_args(argv)
    if args.checkpoint is None:
        from edge_export.demo_model import ensure_demo_model

        args.checkpoint = ensure_demo_model()
    rows = []
    with tempfile.TemporaryDirectory(prefix="int4-recipes-") as tmp:
        for name in args.recipes:
            print(f"[recipes] {name} ...", file=sys.stderr, flush=True)
            rows.append(measure(recipes[name], args.checkpoint, Path(tmp)))
            print(f"[recipes] {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    table = format_table(rows)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": " ".join(["python", "benchmarks/int4_recipes.py", *(argv or sys.argv[1:])]),
         "checkpoint": str(args.checkpoint), "rows": rows, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
