"""Int4 recipes side by side on the trained demo model (issue #8: "choose by measuring").

For each recipe it builds the fused decoder graph of the demo model
(``graph_builder.build_decoder_graph``) and measures, against torch fp32 greedy decoding
of the same checkpoint (``export/fidelity.py``, the export's own prompts):

* greedy agreement (mean share of 32 generated tokens before the first difference, ties
  within 0.05 logits not a difference, as the export gates), its minimum over prompts, the
  strict figure (every flip a difference: the greedy output's), teacher-forced agreement,
  max logit difference;
* on the whole held-out corpus (``export/assets/fidelity-corpus.txt``, about 1,870
  positions): mean and 99th percentile KL divergence from torch, and top-1 agreement --
  the numbers that rank close recipes (12 prompts' greedy agreement moves by 0.08 when
  one prompt flips);
* the bytes one decode step reads (every weight except the embedding table) -- what
  decode speed is proportional to when the step is memory bound.

Recipes (block 32 and accuracy level 4 unless ``--block-size`` / ``--accuracy-level``):

* ``asym`` / ``sym``: zero points or not; ``rtn`` = onnxruntime's round-to-nearest over
  the block's range, ``mse`` = the least-squares scale search (``block_quantize_mse``),
  ``gptq`` = GPTQ's error feedback with the least-squares scales, calibrated on
  ``export/assets/gptq-calibration.txt`` (``export/gptq.py``, ``export/calibration.py``);
* ``head8`` / ``head4`` / ``headf``: lm_head as MatMulNBits int8 (the CPU profiles'
  ``keep_bits``), int4 like every other layer (onnxruntime-genai's recipe is ``sym rtn
  head4``), or kept in float (the GPU profiles');
* ``head8rN`` / ``head8b128rN``: the lm_head in two passes: every logit from int4 weights,
  then the N largest recomputed from int8 rows of the same weights (the CPU profiles'
  ``lm_head_refine_top_k``);
* ``+kv8`` after any of them: the graph keeps an int8 KV cache (static per-channel scales
  calibrated as the export does, ``export/kv_cache_quant.py``; the CPU profiles'
  ``[kv_cache] bits = 8``) instead of a float32 one.

    python benchmarks/int4_recipes.py                   # all recipes, ~15 s each on 2 cores
    python benchmarks/int4_recipes.py --recipes asym-mse-head8 sym-mse-head4 --out /tmp/recipes
    python benchmarks/int4_recipes.py --recipes asym-rtn-headf asym-mse-headf --block-size 128 --accuracy-level 0
                                                        # the GPU profiles' layout

``--speed`` measures decode speed instead, on the peers benchmark's Code Llama-shaped
random checkpoint (``benchmarks/peers.py``'s, built there if missing: 8 layers of 2048,
vocab 32016): every recipe's graph in one process, decode steps alternated recipe by
recipe (argmax after each, as the engine does), thread-pool spinning off, so that load
from other processes hits every recipe alike -- on a shared machine, separate runs
minutes apart differ by more than the recipes do. Tokens/s from the median step.

    python benchmarks/int4_recipes.py --speed --recipes asym-rtn-head8 sym-mse-head8 sym-rtn-head4 --threads 2
    python benchmarks/int4_recipes.py --speed --recipes sym-mse-head8 sym-mse-head8+kv8 --contexts 128 1024 2048

The demo model is trained on first use (``export/demo_model.py``, cached). Small models
are harsher than 7B ones: the numbers rank recipes, they do not forecast Code Llama 7B.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


@dataclass(frozen=True)
class Recipe:
    name: str
    symmetric: bool
    scale_search: bool
    head_bits: int  # 8: lm_head kept as int8; 4: quantized with the rest; 0: kept in float
    kv_bits: int = 0  # 8: int8 KV cache (export/kv_cache_quant.py), name suffix "+kv8"; 0: float
    gptq: bool = False  # GPTQ error feedback (export/gptq.py) on top of the scale rule
    head_block: int = 0  # the int8 lm_head's block size (0: the layout's), name suffix "b128"
    head_refine: int = 0  # > 0: the lm_head in two passes, int4 then its top N from int8 rows; suffix "rN"


@dataclass(frozen=True)
class Layout:
    block_size: int = 32
    accuracy_level: int = 4


def row_name(recipe: str, layout: Layout, layouts: list[Layout]) -> str:
    """The recipe's name, with what tells the layouts of one run apart: @bN, @accN or both."""
    suffix = ""
    if len({lay.block_size for lay in layouts}) > 1:
        suffix += f"@b{layout.block_size}"
    if len({lay.accuracy_level for lay in layouts}) > 1:
        suffix += f"@acc{layout.accuracy_level}"
    return recipe + suffix


CORPUS_TOKENS = 100_000  # the whole fidelity corpus
HEADS = {8: "head8", 4: "head4", 0: "headf"}
REFINE_TOP_K = (8, 32, 128)  # the head in two passes: how many of the int4 head's top logits int8 rows recompute


def all_recipes(*, kv8: bool = False) -> dict[str, Recipe]:
    """The weight recipes (float KV cache); with ``kv8``, also each one with an int8 KV cache."""
    out = {}
    for sym in (False, True):
        for method in ("rtn", "mse", "gptq"):
            for head, suffix in HEADS.items():
                r = Recipe(f"{'sym' if sym else 'asym'}-{method}-{suffix}", sym, method != "rtn", head,
                           gptq=method == "gptq")
                out[r.name] = r
                if head == 8:  # the profile's keep_block_size: the int8 lm_head in blocks of 128
                    out[f"{r.name}b128"] = dataclasses.replace(r, name=f"{r.name}b128", head_block=128)
                    for top in REFINE_TOP_K:  # the head in two passes (int4, then the top N from int8)
                        for base in (r, out[f"{r.name}b128"]):
                            out[f"{base.name}r{top}"] = dataclasses.replace(base, name=f"{base.name}r{top}",
                                                                            head_refine=top)
    if kv8:
        out.update({f"{r.name}+kv8": dataclasses.replace(r, name=f"{r.name}+kv8", kv_bits=8)
                    for r in list(out.values())})
    return out


def build(recipe: Recipe, checkpoint_info, graph: Path, *, layout: Layout, max_length: int) -> None:
    from edge_export.graph_builder import build_decoder_graph

    hessians = None
    if recipe.gptq:  # as the export does (--algorithm gptq, the shipped calibration text)
        from edge_export.calibration import calibration_for

        hessians = calibration_for(checkpoint_info).hessians()
    build_decoder_graph(checkpoint_info, graph, precision="int4", block_size=layout.block_size,
                        symmetric=recipe.symmetric, accuracy_level=layout.accuracy_level,
                        keep_unquantized=("lm_head",) if recipe.head_bits != 4 else (),
                        keep_bits=8 if recipe.head_bits == 8 else None, keep_block_size=recipe.head_block or None,
                        max_length=max_length, scale_search=recipe.scale_search, hessians=hessians,
                        head_refine_top_k=recipe.head_refine)
    if recipe.kv_bits == 8:  # as the export does (--kv-cache-bits 8)
        from edge_export.kv_cache_quant import add_int8_kv_cache
        from edge_runtime.tokenizer import CodeLlamaTokenizer

        add_int8_kv_cache(graph, checkpoint_info.architecture,
                          CodeLlamaTokenizer.from_file(checkpoint_info.tokenizer_path), max_length=max_length)


def weight_bytes_per_step(graph: Path) -> int:
    """Bytes of the weights one decode step reads (the embedding table: one row)."""
    from peers import onnx_weight_bytes

    return onnx_weight_bytes(graph)[1]


def measure(recipe: Recipe, checkpoint: Path, work: Path, layout: Layout = Layout()) -> dict:
    from edge_export import fidelity
    from edge_export.checkpoint import read_checkpoint
    from edge_runtime.bundle import FLAVOUR_GQA_SHARED_KV

    info = read_checkpoint(checkpoint)
    graph = work / recipe.name / "model.onnx"
    t0 = time.perf_counter()
    build(recipe, info, graph, layout=layout, max_length=512)
    build_s = time.perf_counter() - t0
    report = fidelity.measure(info.path, graph, info.architecture, info.tokenizer_path, info.chat_format,
                              corpus_tokens=CORPUS_TOKENS, flavour=FLAVOUR_GQA_SHARED_KV)
    return {"recipe": recipe.name, "greedy_agreement": round(report.greedy_agreement, 3),
            "greedy_agreement_min": round(report.greedy_agreement_min, 3),
            "greedy_agreement_strict": round(report.greedy_agreement_strict, 3),
            "teacher_forced_agreement": round(report.teacher_forced_agreement, 3),
            "max_logit_diff": round(report.max_logit_diff, 3), "mean_logit_diff": round(report.mean_logit_diff, 4),
            "corpus_positions": report.corpus_positions, "kl_divergence_mean": round(report.kl_divergence_mean, 6),
            "kl_divergence_p99": round(report.kl_divergence_p99, 5),
            "corpus_top1_agreement": round(report.corpus_top1_agreement, 4),
            "weight_bytes_per_step": weight_bytes_per_step(graph), "build_s": round(build_s, 1)}


def speed(recipes: list[Recipe], checkpoint: Path, work: Path, *, threads: int, contexts: list[int],
          steps: int, layouts: Sequence[Layout] = (Layout(),)) -> list[dict]:
    """Decode tokens/s per recipe (and layout: several accuracy levels are named
    ``NAME@accN``) and context, steps alternated across them in one process."""
    import numpy as np

    from decode_graphs import cpu_decoder
    from edge_export.checkpoint import read_checkpoint
    from edge_export.kv_cache_quant import REWRITE_REVISION
    from edge_runtime.bundle import FLAVOUR_GQA_SHARED_KV

    info = read_checkpoint(checkpoint)
    arch = info.architecture
    longest = max(contexts) + steps + 8
    decoders, graphs = {}, {}
    for layout in layouts:
        for r in recipes:
            name = row_name(r.name, layout, layouts)
            graph = work / name / "model.onnx"
            stamp = work / name / "stamp.json"
            wanted = {"checkpoint": str(checkpoint), "config_sha256": info.config_sha256, "recipe": r.__dict__,
                      "layout": layout.__dict__, "max_length": longest,
                      "kv_rewrite": REWRITE_REVISION if r.kv_bits else None}
            if not (graph.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == wanted):
                print(f"[recipes] building {name} for {checkpoint.name} ...", file=sys.stderr, flush=True)
                build(r, info, graph, layout=layout, max_length=longest)
                stamp.write_text(json.dumps(wanted))
            graphs[name] = graph
            decoders[name] = cpu_decoder(graph, arch, FLAVOUR_GQA_SHARED_KV, threads=threads, max_length=longest,
                                         spinning=False)[0]
    rng = np.random.default_rng(0)
    rows = {name: {"recipe": name, "weight_bytes_per_step": weight_bytes_per_step(graph), "decode_tokens_per_s": {}}
            for name, graph in graphs.items()}
    for ctx in contexts:
        prompt = [1, *rng.integers(100, 32000, size=ctx - 1).tolist()]
        state = {}
        for name, d in decoders.items():
            cache = d.new_cache(ctx + steps + 4)
            token = int(np.argmax(d.prefill(cache, prompt)[-1]))
            state[name] = [cache, int(np.argmax(d.decode(cache, token)))]  # one untimed step
        times: dict[str, list[float]] = {name: [] for name in decoders}
        for _ in range(steps):
            for name, d in decoders.items():
                cache, token = state[name]
                t0 = time.perf_counter()
                state[name][1] = int(np.argmax(d.decode(cache, token)))
                times[name].append(time.perf_counter() - t0)
        for name in decoders:
            rows[name]["decode_tokens_per_s"][ctx] = round(1.0 / float(np.median(times[name])), 2)
        print(f"[recipes] context {ctx}: " + ", ".join(f"{n} {rows[n]['decode_tokens_per_s'][ctx]}"
                                                      for n in decoders), file=sys.stderr, flush=True)
    return list(rows.values())


def format_speed_table(rows: list[dict], contexts: list[int]) -> str:
    first = rows[0]
    head = ("| recipe | weights read per step | " + " | ".join(f"decode tok/s @{c}" for c in contexts) + " | "
            + " | ".join(f"vs {first['recipe']} @{c}" for c in contexts) + " |\n"
            + "|---" * (2 + 2 * len(contexts)) + "|")
    lines = [f"| {r['recipe']} | {r['weight_bytes_per_step'] / 2**20:.0f} MiB | "
             + " | ".join(f"{r['decode_tokens_per_s'][c]:.1f}" for c in contexts) + " | "
             + " | ".join(f"{r['decode_tokens_per_s'][c] / first['decode_tokens_per_s'][c]:.2f}x" for c in contexts)
             + " |" for r in rows]
    return "\n".join([head, *lines])


def format_table(rows: list[dict]) -> str:
    head = ("| recipe | corpus KL divergence mean (p99) | corpus top-1 | greedy agreement (min; strict) | teacher-forced "
            "| max logit diff | weights read per step |\n|---|---|---|---|---|---|---|")
    lines = [f"| {r['recipe']} | {r['kl_divergence_mean']:.5f} ({r['kl_divergence_p99']:.4f}) | "
             f"{r['corpus_top1_agreement']:.4f} | {r['greedy_agreement']:.3f} ({r['greedy_agreement_min']:.2f}; "
             f"{r.get('greedy_agreement_strict', float('nan')):.3f}) | "
             f"{r['teacher_forced_agreement']:.3f} | {r['max_logit_diff']:.3f} | "
             f"{r['weight_bytes_per_step'] / 2**20:.1f} MiB |" for r in rows]
    return "\n".join([head, *lines])


def main(argv: list[str] | None = None) -> int:
    recipes = all_recipes(kv8=True)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", choices=sorted(recipes),
                   default=[name for name, r in all_recipes().items() if not r.head_refine],
                   help="default: every weight recipe with a float KV cache and a one-pass lm_head; "
                        "NAME+kv8: with an int8 KV cache")
    p.add_argument("--checkpoint", type=Path, help="default: the trained demo model (cached)")
    p.add_argument("--out", type=Path, default=Path("int4-recipes"), help="writes <out>.json")
    p.add_argument("--speed", action="store_true", help="measure decode speed instead of fidelity")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="--speed: intra-op threads")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 2048], help="--speed: contexts held")
    p.add_argument("--steps", type=int, default=64, help="--speed: decode steps per recipe and context")
    p.add_argument("--block-size", type=int, nargs="+", default=[32],
                   help="MatMulNBits block size along K; --speed takes several (rows NAME@bN)")
    p.add_argument("--accuracy-level", type=int, nargs="+", choices=[0, 1, 2, 3, 4], default=[4],
                   help="MatMulNBits accuracy_level (0: unset, as the GPU profiles); --speed takes several "
                        "(each recipe at each level, rows NAME@accN)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="--speed: where the graphs are kept (default: <peers workdir>/int4-recipes)")
    args = p.parse_args(argv)
    if (len(args.accuracy_level) > 1 or len(args.block_size) > 1) and not args.speed:
        p.error("several --accuracy-level or --block-size values are for --speed (fidelity: one layout a run)")
    if any(b < 16 or b & (b - 1) for b in args.block_size):
        p.error(f"--block-size {args.block_size}: MatMulNBits takes powers of two from 16")
    args.layouts = [Layout(block, level) for block in args.block_size for level in args.accuracy_level]
    args.layout = args.layouts[0]
    if args.speed:
        return main_speed(args, [recipes[n] for n in args.recipes])
    if args.checkpoint is None:
        from edge_export.demo_model import ensure_demo_model

        args.checkpoint = ensure_demo_model()
    rows = []
    with tempfile.TemporaryDirectory(prefix="int4-recipes-") as tmp:
        for name in args.recipes:
            print(f"[recipes] {name} ...", file=sys.stderr, flush=True)
            rows.append(measure(recipes[name], args.checkpoint, Path(tmp), args.layout))
            print(f"[recipes] {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    table = format_table(rows)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": " ".join(["python", "benchmarks/int4_recipes.py", *(argv or sys.argv[1:])]),
         "checkpoint": str(args.checkpoint), "layout": args.layout.__dict__, "rows": rows, "table": table}, indent=2))
    return 0


def main_speed(args, chosen: list[Recipe]) -> int:
    import peers  # benchmarks/peers.py: its checkpoint and work folder

    if args.checkpoint is None:
        args.checkpoint = peers.CACHE / "peers-bench" / "checkpoint"
        if not (args.checkpoint / "config.json").is_file():
            print(f"[recipes] building the checkpoint {peers.SHAPE_DEFAULTS} ...", file=sys.stderr, flush=True)
            from edge_export.synthetic import build_checkpoint_streamed

            d = peers.SHAPE_DEFAULTS
            build_checkpoint_streamed(args.checkpoint, hidden_size=d["hidden"], intermediate_size=d["intermediate"],
                                      num_layers=d["layers"], num_heads=d["heads"], num_kv_heads=d["kv_heads"],
                                      seed=d["seed"], dtype="float16", max_position_embeddings=16384)
    work = args.workdir or (peers.CACHE / "peers-bench" / "int4-recipes")
    rows = speed(chosen, args.checkpoint, work, threads=args.threads, contexts=args.contexts, steps=args.steps,
                 layouts=args.layouts)
    table = format_speed_table(rows, args.contexts)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": " ".join(["python", "benchmarks/int4_recipes.py", *(sys.argv[1:])]),
         "checkpoint": str(args.checkpoint), "threads": args.threads,
         "layouts": [layout.__dict__ for layout in args.layouts], "rows": rows,
         "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    from edge_runtime.cli import run_script

    sys.exit(run_script(main))
