"""Decode speed side by side with the peers (issue #8): our int4 bundle, onnxruntime-genai's
int4 model (built by its own builder) and llama.cpp's Q4_0 (llama-cpp-python), all made
from the same Code Llama-shaped checkpoint, on this machine's CPU, at batch 1.

    python benchmarks/peers.py --out results/peers            # or: edge-runtime bench --peers
    python benchmarks/peers.py --checkpoint ~/models/CodeLlama-7b-hf --out results/peers-7b

What it does:

1. takes ``--checkpoint`` or builds a random one (default: hidden 2048, intermediate 5504,
   8 layers, 16 heads, vocab 32016, float16, seed 0; ``build_checkpoint_streamed``);
2. prepares each engine's model from it, once (cached in ``--workdir`` by a stamp of the
   checkpoint and the recipe):
   * ``edge-runtime``: ``edge-runtime export --graph fused`` with the cpu-x86_64 profile's
     int4 recipe (MatMulNBits in blocks of 128 with zero points, GPTQ with the least-squares
     scale search, accuracy level 4, lm_head kept as int8), fidelity skipped (random
     weights); the recipe is part of the cache stamp; the profile keeps an int8 KV cache;
   * ``edge-runtime/f32kv``: the same export with ``--kv-cache-bits 0`` (a float32 KV cache);
   * ``edge-runtime/genai-recipe``: the same graph and engine loop with onnxruntime-genai's
     recipe (symmetric int4 in ``--block-size`` blocks, lm_head int4:
     ``graph_builder.build_decoder_graph``, a bare graph run by the engine's decoder) -- the
     same bytes as onnxruntime-genai's model, so the two rows compare graph + loop alone;
     on the demo model this recipe's greedy
     agreement is below the profile's 0.7 bar (0.66 symmetric; an int4 lm_head 0.615), so
     no profile ships it;
   * ``onnxruntime-genai``: ``python -m onnxruntime_genai.models.builder -p int4 -e cpu``
     with ``int4_block_size`` = ``--block-size`` (default: ours, the profile's: the issue's "same
     block size"; its own default is 32) and ``int4_is_symmetric=true`` (its other defaults:
     accuracy level 4 on CPU, every MatMul quantized, lm_head included; before, this passed
     ``block_size``, a key the builder ignores, and got its default, also 32 and symmetric);
   * ``llama.cpp``: llama.cpp's ``convert_hf_to_gguf.py`` (from the llama-cpp-python sdist,
     see scripts/install-peers.sh) to an f16 GGUF, then ``llama_model_quantize`` to Q4_0
     (block 32; llama.cpp's defaults keep output.weight at Q6_K);
3. measures the memory bandwidth: the best of several copies of a 512 MiB numpy array,
   one thread and ``--threads`` threads (each copying its slice), counting the bytes
   read plus the bytes written (the issue's measure); and the read bandwidth, the best of
   several maxima over the same array (only reads, as a decode step reads its weights;
   on the 2-core development VM about 0.75 of the copy figure); once before every round,
   each figure aggregated over the rounds as the engines' numbers are (``--aggregate``:
   the median, or the highest), so that a % of roofline divides like by like (on a shared
   VM one measurement swings by 30 %: one taken while a neighbour is busy would inflate
   every % of roofline, one taken in a quiet moment deflate every median's);
4. runs each engine in its own subprocess (so peak RSS is the engine's own), ``--rounds``
   times, engines interleaved, the order rotating by one a round (``round_order``: no engine
   always runs first, right after the bandwidth measure), keeping each number's median round
   (``--aggregate best``: its best round; on a shared 2-core VM single rounds of one engine
   swing by 30 %, so a best-of favours whichever engine had a lucky round): a ``--prefill-tokens``
   prompt (best of 3: prefill tokens/s and time to first token = prefill + picking the
   first token), then per context C: prefill C tokens, one untimed step, then
   ``--decode-tokens`` single-token steps each followed by a greedy pick (decode
   tokens/s = 1 / median step time);
5. the roofline: tokens/s the bandwidth allows if every byte a decode step must read is
   read once: the weights (every initializer / GGUF tensor except the token-embedding
   table, of which one row) plus the KV cache held at context C (2 x layers x kv heads x
   head dim x C x the engine's KV element size: int8 for ours, fp32 for ``f32kv``,
   ``genai-recipe`` and onnxruntime-genai, f16 for llama.cpp); and the read roofline, the
   same bytes over the read bandwidth;
6. then decodes with every engine that came through the rounds open in one process (under
   the peers' interpreter), taking turns: per context, ``--paired-blocks`` turns (default
   40; 0 skips this), in each one untimed and ``--paired-steps`` timed steps of every
   engine, the order rotating, a 50 ms pause between two engines. Ours ÷ engine is the
   median over the turns of ours' tokens/s over the engine's in the same turn: two figures
   measured a fraction of a second apart under the same load, where the rounds' medians
   compare figures taken minutes apart (on a shared VM a round's decode swings by ±30 %);
   the middle half of the turns' ratios says how far they agree. Each turn first measures the
   bandwidth again (best of 2 copies and 2 reads, 1 and ``--threads`` threads), and the turns'
   % of the roofline is the median over the turns of an engine's tokens/s over the roofline of
   the bandwidth measured in that turn (the rounds' table divides a median of rounds by a
   median of measures taken before them, where one copy figure swings by 30 % or more). Left
   out with a note when the engines' peak RSS in the rounds, added up, would not fit the
   memory available;
7. prints the rounds' table and the paired one, writes ``<out>.json`` and ``<out>.png``
   (decode tokens/s against context, one line per engine: the rounds' medians, and beside
   them the turns'; skipped with a message without matplotlib).

All engines get the same number of threads (``--threads``, default: every core).
A peer that is not installed is skipped with a message; one whose process fails (preparing its
model or in a round) is left out of the table with a note saying when and why, and the run
goes on with the others (ours failing stops it). The peers run under
``--peer-python`` (default: ``~/.cache/edge-runtime/peers-venv/bin/python`` when it exists,
made by ``scripts/install-peers.sh``, else this interpreter).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_graphs import cpu_decoder, peak_rss, prompt_ids  # noqa: E402  (the steps both benchmarks run alike)
from edge_runtime.onnx_proto_scan import decode_read_bytes, input_element_bytes  # noqa: E402
from edge_runtime.memory_fit import kv_cache_bytes  # noqa: E402
from edge_runtime.roofline import BandwidthProbe  # noqa: E402

OURS = "edge-runtime"
OURS_F32KV = "edge-runtime/f32kv"  # our bundle exported with --kv-cache-bits 0 (float32 KV cache)
OURS_GENAI_RECIPE = "edge-runtime/genai-recipe"  # our graph + loop, onnxruntime-genai's recipe (same bytes)
OUR_ENGINES = (OURS, OURS_F32KV, OURS_GENAI_RECIPE)  # run in this interpreter
GENAI = "onnxruntime-genai"
LLAMACPP = "llama.cpp"
ENGINES = (OURS, OURS_F32KV, OURS_GENAI_RECIPE, GENAI, LLAMACPP)
PEER_MODULES = {GENAI: "onnxruntime_genai", LLAMACPP: "llama_cpp"}
CACHE = Path(os.environ.get("EDGE_RUNTIME_CACHE", Path.home() / ".cache" / "edge-runtime"))
DEFAULT_PEER_PYTHON = CACHE / "peers-venv" / "bin" / "python"
DEFAULT_CONVERT = CACHE / "peers" / "llama.cpp" / "convert_hf_to_gguf.py"
PROFILE = "cpu-x86_64"
SHAPE_DEFAULTS = dict(hidden=2048, intermediate=5504, layers=8, heads=16, kv_heads=16, seed=0)


# -- the arithmetic (tests/bench/test_peers.py) ------------------------------------------------------------
@dataclass
class ModelInfo:
    """What the roofline needs to know about one engine's prepared model."""

    engine: str
    precision: str  # in words, e.g. "int4 b32 asym, lm_head fp32"
    model_bytes: int  # files on disk
    weight_bytes_per_token: int  # weights one decode step reads (embedding: one row)
    kv_bytes_per_element: int  # 4 (fp32) or 2 (f16)


@dataclass
class EngineRun:
    engine: str
    prefill_tokens: int = 0
    prefill_tokens_per_s: float = 0.0
    ttft_ms: float = 0.0
    decode_tokens_per_s: dict[int, float] = field(default_factory=dict)
    decode_best_tokens_per_s: dict[int, float] = field(default_factory=dict)
    peak_rss_bytes: int = 0
    load_s: float = 0.0


AGGREGATES = ("median", "best")


def merge_runs(runs: list[EngineRun], aggregate: str = "median") -> EngineRun:
    """Several rounds of one engine as one, number by number: the median round's value, or
    with ``aggregate="best"`` the best round's (highest speed, lowest TTFT). Peak RSS is the
    largest, the fastest single decode step the fastest, the load time the shortest."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, not {aggregate!r}")
    high = statistics.median if aggregate == "median" else max
    low = statistics.median if aggregate == "median" else min
    out = EngineRun(engine=runs[0].engine, prefill_tokens=runs[0].prefill_tokens)
    out.prefill_tokens_per_s = high(r.prefill_tokens_per_s for r in runs)
    out.ttft_ms = low(r.ttft_ms for r in runs)
    for ctx in runs[0].decode_tokens_per_s:
        out.decode_tokens_per_s[ctx] = high(r.decode_tokens_per_s[ctx] for r in runs)
        out.decode_best_tokens_per_s[ctx] = max(r.decode_best_tokens_per_s.get(ctx, 0.0) for r in runs)
    out.peak_rss_bytes = max(r.peak_rss_bytes for r in runs)
    out.load_s = min(r.load_s for r in runs)
    return out


def merge_bandwidths(measures: list[dict], aggregate: str = "median") -> dict:
    """Several ``step_bandwidth`` results (one a round) as one, figure by figure, aggregated
    as ``merge_runs`` aggregates the engines' speeds: the median, or with
    ``aggregate="best"`` the highest; plus how many there were."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, not {aggregate!r}")
    pick = statistics.median if aggregate == "median" else max
    figures = ("one_thread", "all_threads", "bandwidth", "read_one_thread", "read_all_threads", "read_bandwidth")
    out = {k: pick(m[k] for m in measures) for k in figures}
    return {**out, "threads": measures[0]["threads"], "measurements": len(measures)}


def step_bytes(info: ModelInfo, arch: dict, context: int) -> int:
    """The bytes a decode step of `info`'s model reads at `context` tokens: its weights (the
    embedding as one row) and its KV cache at that length, in its KV dtype."""
    return info.weight_bytes_per_token + int(kv_cache_bytes(
        num_layers=arch["layers"], num_kv_heads=arch["kv_heads"], head_dim=arch["head_dim"], context=context,
        dtype_bytes=info.kv_bytes_per_element))


def build_rows(infos: dict[str, ModelInfo], runs: dict[str, EngineRun], *, bandwidth: float, arch: dict,
               contexts: list[int], read_bandwidth: float | None = None) -> list[dict]:
    """One row per engine that ran: its numbers, % of the roofline per context (copy
    bandwidth, and read bandwidth when given), and our engine's decode speed (the profile
    recipe, OURS) divided by this engine's (so >= 1.0 means we are at least as fast)."""
    ours = runs.get(OURS)
    rows = []
    for engine in ENGINES:
        if engine not in runs:
            continue
        info, run = infos[engine], runs[engine]
        row = {"engine": engine, "precision": info.precision, "model_bytes": info.model_bytes,
               "weight_bytes_per_token": info.weight_bytes_per_token,
               "prefill_tokens": run.prefill_tokens, "prefill_tokens_per_s": run.prefill_tokens_per_s,
               "ttft_ms": run.ttft_ms, "peak_rss_bytes": run.peak_rss_bytes, "load_s": run.load_s,
               "decode_tokens_per_s": {}, "roofline_tokens_per_s": {}, "roofline_percent": {},
               "read_roofline_percent": {}, "ours_over_this": {}}
        for ctx in contexts:
            tps = run.decode_tokens_per_s.get(ctx)
            if tps is None:
                continue
            step = step_bytes(info, arch, ctx)
            row["decode_tokens_per_s"][ctx] = tps
            row["roofline_tokens_per_s"][ctx] = bandwidth / step
            row["roofline_percent"][ctx] = 100.0 * tps * step / bandwidth
            if read_bandwidth:
                row["read_roofline_percent"][ctx] = 100.0 * tps * step / read_bandwidth
            if ours is not None and ctx in ours.decode_tokens_per_s:
                row["ours_over_this"][ctx] = ours.decode_tokens_per_s[ctx] / tps
        rows.append(row)
    return rows


def format_table(rows: list[dict], table_contexts: list[int]) -> str:
    """The markdown table (decode, roofline and ratio columns for `table_contexts`)."""
    header = ["engine", "precision", "model", "prefill tok/s", "TTFT"]
    header += [f"decode tok/s @{c}" for c in table_contexts]
    read = any(r.get("read_roofline_percent") for r in rows)
    header += ["peak RSS"] + [f"% roofline @{c}" for c in table_contexts]
    header += [f"% read roofline @{c}" for c in table_contexts] if read else []
    header += [f"ours ÷ engine @{c}" for c in table_contexts]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def at(d: dict, c: int, fmt: str) -> str:
        return format(d[c], fmt) if c in d else "-"

    for r in rows:
        cells = [r["engine"], r["precision"], f"{r['model_bytes'] / 2**20:.0f} MiB",
                 f"{r['prefill_tokens_per_s']:.1f}", f"{r['ttft_ms']:.0f} ms"]
        cells += [at(r["decode_tokens_per_s"], c, ".2f") for c in table_contexts]
        cells += [f"{r['peak_rss_bytes'] / 2**20:.0f} MiB"]
        for key in ("roofline_percent", "read_roofline_percent") if read else ("roofline_percent",):
            cells += [at(r[key], c, ".0f") + ("%" if c in r[key] else "") for c in table_contexts]
        cells += [at(r["ours_over_this"], c, ".2f") for c in table_contexts]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_rows(turns: dict[str, dict[int, list[float]]], *, bandwidth: dict[int, list[dict]] | None = None,
                bytes_per_step: dict[str, dict[int, int]] | None = None) -> list[dict]:
    """The paired measurement in figures (``step_run_paired``'s turns: {engine: {context:
    [tokens/s a turn]}}): per engine and context the median turn's tokens/s, and ours ÷ the
    engine as the median over the turns of ours' figure over the engine's in the same turn,
    with the middle half of those ratios (their first and third quartiles). Given each turn's
    `bandwidth` ({context: [``BandwidthProbe.measure`` figures]}) and the engines'
    `bytes_per_step`, also the % of the roofline (copy bandwidth) and of the read roofline,
    each the median over the turns of the engine's tokens/s over that turn's roofline, with
    the middle half."""
    ours = turns[OURS]
    rows = []
    for engine in ENGINES:
        if engine not in turns:
            continue
        row = {"engine": engine, "decode_tokens_per_s": {}, "ours_over_this": {}, "ours_over_this_middle_half": {}}
        for ctx, speeds in turns[engine].items():
            ratios = [o / e for o, e in zip(ours[ctx], speeds)]
            row["decode_tokens_per_s"][ctx] = statistics.median(speeds)
            row["ours_over_this"][ctx] = statistics.median(ratios)
            row["ours_over_this_middle_half"][ctx] = middle_half(ratios)
            step = (bytes_per_step or {}).get(engine, {}).get(ctx)
            if bandwidth and ctx in bandwidth and step:
                for key, measure in (("roofline_percent", "bandwidth"), ("read_roofline_percent", "read_bandwidth")):
                    shares = [100.0 * tps * step / b[measure] for tps, b in zip(speeds, bandwidth[ctx])]
                    row.setdefault(key, {})[ctx] = statistics.median(shares)
                    row.setdefault(key + "_middle_half", {})[ctx] = middle_half(shares)
        rows.append(row)
    return rows


def middle_half(values: list[float]) -> list[float]:
    """The first and third quartiles of `values`."""
    return [float(q) for q in np.percentile(values, [25, 75])]


def format_paired_table(rows: list[dict], table_contexts: list[int]) -> str:
    """The paired measurement's markdown table: tokens/s and ours ÷ engine (middle half) per
    context, and the % of the roofline (middle half) where the turns measured the bandwidth."""
    roofline = any(r.get("roofline_percent") for r in rows)
    header = [f"decode tok/s @{c}" for c in table_contexts]
    header = ["engine", *header, *(f"ours ÷ engine @{c} (middle half)" for c in table_contexts)]
    header += [f"% roofline @{c} (middle half)" for c in table_contexts] if roofline else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["engine"]]
        cells += [f"{r['decode_tokens_per_s'][c]:.2f}" if c in r["decode_tokens_per_s"] else "-"
                  for c in table_contexts]
        for c in table_contexts:
            if c not in r["ours_over_this"]:
                cells.append("-")
            elif r["engine"] == OURS:
                cells.append("1.00")
            else:
                low, high = r["ours_over_this_middle_half"][c]
                cells.append(f"{r['ours_over_this'][c]:.2f} ({low:.2f}-{high:.2f})")
        for c in table_contexts if roofline else []:
            if c not in r.get("roofline_percent", {}):
                cells.append("-")
            else:
                low, high = r["roofline_percent_middle_half"][c]
                cells.append(f"{r['roofline_percent'][c]:.0f}% ({low:.0f}-{high:.0f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str, paired_rows: list[dict] | None = None) -> str | None:
    """Decode tokens/s against context, one line per engine: the rounds' medians, and beside
    them the paired turns' when given; returns why not, when it cannot."""
    if not rows:
        return "no engine ran: no plot"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    panels = [("the rounds' medians", rows)] + ([("in turns, one process", paired_rows)] if paired_rows else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), sharey=True, squeeze=False)
    words = {r["engine"]: f"{r['engine']} ({r['precision']})" for r in rows}
    for ax, (what, panel) in zip(axes[0], panels):
        for r in panel:
            ctxs = sorted(r["decode_tokens_per_s"])
            ax.plot(ctxs, [r["decode_tokens_per_s"][c] for c in ctxs], marker="o", label=words.get(r["engine"]))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens held)")
        ax.set_title(f"{title}: {what}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("decode tokens/s (batch 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# -- counting the bytes a decode step reads -----------------------------------------------------------------
def onnx_weight_bytes(graph: Path) -> tuple[int, int]:
    """(all initializer bytes, bytes a decode step reads): ``onnx_proto_scan.decode_read_bytes``,
    what `edge-runtime bench` counts too (the token-embedding table as one row, the two-pass
    lm_head's int8 rows as k)."""
    return decode_read_bytes(graph)


def onnx_kv_element_bytes(graph: Path) -> float:
    """Element size of the graph's past key input (4: float32, 2: float16, 1: int8)."""
    return input_element_bytes(graph, "past_key_values")


def gguf_weight_bytes(path: Path) -> tuple[int, int, dict[str, int]]:
    """(all tensor bytes, bytes a decode step reads, bytes per tensor type): token_embd counts one row."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    total = per_token = 0
    by_type: dict[str, int] = {}
    for t in reader.tensors:
        n = int(t.n_bytes)
        total += n
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + n
        per_token += n // int(t.shape[-1]) if t.name == "token_embd.weight" else n
    return total, per_token, by_type


def folder_bytes(folder: Path, prefix: str = "") -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.startswith(prefix))


# -- steps (each in its own interpreter) ----------------------------------------------------------------------
def step_checkpoint(a) -> dict:
    from edge_export.synthetic import build_checkpoint_streamed

    build_checkpoint_streamed(Path(a.out), hidden_size=a.hidden, intermediate_size=a.intermediate,
                              num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv_heads, seed=a.seed,
                              dtype="float16", max_position_embeddings=16384)
    return {}


def recipe_words(block_size: int, symmetric: bool, accuracy_level: int, kept: tuple[str, ...],
                 keep_bits: int | None, scale_search: bool = False, kv_bits: int = 0, algorithm: str = "rtn",
                 keep_block_size: int = 0, head_refine_top_k: int = 0, embedding_bits: int = 0) -> str:
    """The int4 recipe in words, e.g. "int4 b32 sym gptq+mse acc4, lm_head int8 b128, KV int8"
    ("lm_head int4, top 32 int8": the lm_head in two passes; ", embedding int8": the token
    embedding table in int8 blocks)."""
    kept_blocks = f" b{keep_block_size}" if keep_bits and keep_block_size and keep_block_size != block_size else ""
    if not kept:
        held = "all int4"
    elif keep_bits and head_refine_top_k:
        held = f"{', '.join(kept)} int4, top {head_refine_top_k} int8"
    else:
        held = f"{', '.join(kept)} {'int%d' % keep_bits if keep_bits else 'fp32'}{kept_blocks}"
    methods = (["gptq"] if algorithm == "gptq" else []) + (["mse"] if scale_search else [])
    rounding = " " + "+".join(methods) if methods else ""
    kv = f", KV int{kv_bits}" if kv_bits else ""
    embedding = f", embedding int{embedding_bits}" if embedding_bits else ""
    return (f"int4 b{block_size} {'sym' if symmetric else 'asym'}{rounding} acc{accuracy_level}, "
            f"{held}{embedding}{kv}")


def profile_recipe(kv_bits: int | None = None) -> dict:
    """The profile's int4 recipe (``kv_bits`` overriding its KV cache): it goes into the cache
    stamp of our bundles, so a changed profile re-exports."""
    from edge_export.kv_cache_quant import REWRITE_REVISION
    from edge_runtime.profiles import load_profile

    profile = load_profile(PROFILE)
    q = profile.quantization
    return {"block_size": q.block_size, "symmetric": q.symmetric, "accuracy_level": q.accuracy_level,
            "keep_unquantized": list(q.keep_unquantized), "keep_bits": q.keep_bits,
            "keep_block_size": q.kept_block_size, "scale_search": q.scale_search,
            "algorithm": q.algorithm, "kv_bits": profile.kv_cache.bits if kv_bits is None else kv_bits,
            "head_refine_top_k": q.lm_head_refine_top_k, "embedding_bits": q.embedding_bits,
            "kv_rewrite": REWRITE_REVISION}


def _prepare_bundle(a, engine: str, kv_bits: int | None) -> dict:
    """`edge-runtime export` of the checkpoint with the profile (``kv_bits`` overriding its KV cache)."""
    from edge_export.pipeline import ExportOptions, run_export

    out = Path(a.out)
    run_export(ExportOptions(checkpoint=Path(a.checkpoint), profile=PROFILE, output=out, precision="int4",
                             graph="fused", skip_fidelity=True, force=True, kv_cache_bits=kv_bits))
    r = profile_recipe(kv_bits)
    total, per_token = onnx_weight_bytes(out / "model.onnx")
    words = recipe_words(r["block_size"], r["symmetric"], r["accuracy_level"], tuple(r["keep_unquantized"]),
                         r["keep_bits"], r["scale_search"], r["kv_bits"], r["algorithm"], r["keep_block_size"],
                         r["head_refine_top_k"], r["embedding_bits"])
    return asdict(ModelInfo(engine, words, folder_bytes(out, "model.onnx"), per_token,
                            onnx_kv_element_bytes(out / "model.onnx")))


def step_prepare_ours(a) -> dict:
    return _prepare_bundle(a, OURS, None)


def step_prepare_ours_f32kv(a) -> dict:
    return _prepare_bundle(a, OURS_F32KV, 0)


def step_prepare_ours_genai_recipe(a) -> dict:
    """Our fused graph with onnxruntime-genai's recipe: symmetric int4 everywhere, lm_head
    included, block ``--block-size``, accuracy level 4 (a bare graph, not a bundle)."""
    from edge_export.checkpoint import read_checkpoint
    from edge_export.graph_builder import build_decoder_graph
    from edge_runtime.profiles import load_profile

    out = Path(a.out)
    build_decoder_graph(read_checkpoint(a.checkpoint), out / "model.onnx", precision="int4",
                        block_size=a.block_size, symmetric=True, accuracy_level=4, keep_unquantized=(),
                        max_length=load_profile(PROFILE).max_context)
    total, per_token = onnx_weight_bytes(out / "model.onnx")
    return asdict(ModelInfo(OURS_GENAI_RECIPE, recipe_words(a.block_size, True, 4, (), None),
                            folder_bytes(out, "model.onnx"), per_token, onnx_kv_element_bytes(out / "model.onnx")))


def genai_builder_argv(checkpoint, out: Path, cache: Path, *, precision: str, provider: str,
                       block_size: int | None = None, symmetric: bool = True) -> list[str]:
    """onnxruntime-genai's builder from `checkpoint` for `provider` (cpu, cuda); int4 in the given
    layout through its own options, int4_block_size and int4_is_symmetric (it ignores keys it does
    not know: a `block_size=` once got its default), its other defaults."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
           "-p", precision, "-e", provider, "-c", str(cache)]
    if precision == "int4":
        cmd += ["--extra_options", f"int4_block_size={block_size}", f"int4_is_symmetric={str(symmetric).lower()}"]
    return cmd


def genai_builder_command(a, out: Path, cache: Path) -> list[str]:
    """The CPU benchmark's: int4 at our block size, symmetric."""
    return genai_builder_argv(a.checkpoint, out, cache, precision="int4", provider="cpu", block_size=a.block_size)


def step_prepare_genai(a) -> dict:
    out = Path(a.out)
    cache = out.with_name(out.name + ".cache")
    subprocess.run(genai_builder_command(a, out, cache), check=True, stdout=sys.stderr)
    shutil.rmtree(cache, ignore_errors=True)
    total, per_token = onnx_weight_bytes(out / "model.onnx")
    return asdict(ModelInfo(GENAI, f"int4 b{a.block_size} sym acc4, lm_head int4", folder_bytes(out, "model.onnx"),
                            per_token, onnx_kv_element_bytes(out / "model.onnx")))


def step_prepare_llamacpp(a) -> dict:
    import llama_cpp

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    f16 = out / "model-f16.gguf"
    q4 = out / "model-q4_0.gguf"
    convert = Path(a.convert_script)
    if not convert.is_file():
        raise SystemExit(f"llama.cpp's convert_hf_to_gguf.py is not at {convert} (bash scripts/install-peers.sh)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(convert.parent / "gguf-py"), str(convert.parent)])}
    subprocess.run([sys.executable, str(convert), a.checkpoint, "--outfile", str(f16), "--outtype", "f16"],
                   check=True, stdout=sys.stderr, env=env)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = a.threads
    rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(q4).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")
    f16.unlink()
    total, per_token, by_type = gguf_weight_bytes(q4)
    kinds = "/".join(sorted(by_type, key=lambda k: -by_type[k]))
    return {**asdict(ModelInfo(LLAMACPP, f"Q4_0 (b32; tensors {kinds})", q4.stat().st_size, per_token, 2)),
            "tensor_bytes_by_type": by_type}


def step_bandwidth(a) -> dict:
    """The memory bandwidth before a round (``BandwidthProbe.measure``, best of 5)."""
    return BandwidthProbe(a.bandwidth_mib << 20).measure(a.threads)


# -- the engines' decode loops: the rounds and the paired turns time them alike ------------------------------------
class Stepper:
    """A started decode: each `step()` runs the last picked token through the model and picks
    the next one greedily (`run(token) -> next token`)."""

    def __init__(self, run, token: int):
        self.run, self.token = run, token

    def step(self) -> None:
        self.token = self.run(self.token)


def time_steps(stepper: Stepper, n: int) -> list[float]:
    """The seconds of each of `n` steps."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        stepper.step()
        times.append(time.perf_counter() - t0)
    return times


def timed_at(engine, context: int, steps: int, *, untimed_steps: int = 1) -> list[float]:
    """`engine` (one of the *Decoding below) at `context` tokens: a random prompt of that length
    prefilled, `untimed_steps` steps, then the seconds of `steps` timed steps."""
    stepper = engine.start(context, steps + untimed_steps)
    for _ in range(untimed_steps):
        stepper.step()
    return time_steps(stepper, steps)


@dataclass
class OursDecoding:
    """One of our decoders (the engine's, or one over a bare fused graph)."""
    decoder: object
    vocab: int

    def start(self, context: int, room: int) -> Stepper:
        """Prefill `context` random tokens into a new cache with `room` more steps' space."""
        d = self.decoder
        cache = d.new_cache(context + room + 1)
        first = int(np.argmax(d.prefill(cache, prompt_ids(context, self.vocab, 2))[-1]))
        return Stepper(lambda t: int(np.argmax(d.decode(cache, t))), first)


@dataclass
class GenaiDecoding:
    """onnxruntime-genai's model and a generator per start (greedy search over its own logits)."""
    model: object
    vocab: int

    def generator(self, max_length: int):
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False, batch_size=1)
        return og.Generator(self.model, params)

    def start(self, context: int, room: int) -> Stepper:
        g = self.generator(context + room + 4)
        g.append_tokens(prompt_ids(context, self.vocab, 2).astype(np.int32))
        g.generate_next_token()  # picks the first token from the prompt's logits

        def run(_token: int) -> int:  # the generator holds the last token itself
            g.generate_next_token()  # runs the last token, then picks the next greedily
            return int(g.get_next_tokens()[0])

        return Stepper(run, int(g.get_next_tokens()[0]))


@dataclass
class LlamaDecoding:
    """llama-cpp-python's model and context (`n_ctx` tokens: every start must fit)."""
    llm: object
    vocab: int

    def last_logits(self) -> np.ndarray:  # the last position's logits, as llama.cpp left them (no copy)
        import llama_cpp

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.vocab,))

    def run(self, tokens) -> int:
        self.llm.eval(tokens)  # llama_decode in n_batch pieces; logits for the last position only
        return int(np.argmax(self.last_logits()))

    def start(self, context: int, room: int) -> Stepper:
        self.llm.reset()
        return Stepper(lambda t: self.run([t]), self.run(prompt_ids(context, self.vocab, 2).tolist()))


def open_ours(model: Path, checkpoint, threads: int) -> OursDecoding:
    """Our bundle as the engine loads it with the profile (at `threads`), or a bare fused graph
    (OURS_GENAI_RECIPE) with the session and decoder the engine would make."""
    import dataclasses

    from edge_runtime.engine import Engine
    from edge_runtime.profiles import load_profile

    profile = dataclasses.replace(load_profile(PROFILE), intra_op_threads=threads)
    if (Path(model) / "bundle.json").is_file():
        engine = Engine.from_bundle(model, profile=profile)
        return OursDecoding(engine.decoder, engine.bundle.architecture.vocab_size)
    from edge_export.checkpoint import read_checkpoint
    from edge_runtime.bundle import FLAVOUR_GQA_SHARED_KV

    arch = read_checkpoint(checkpoint).architecture
    d = cpu_decoder(Path(model) / "model.onnx", arch, FLAVOUR_GQA_SHARED_KV, threads=threads,
                    max_length=profile.max_context)[0]
    return OursDecoding(d, arch.vocab_size)


def open_genai(model: Path, threads: int) -> GenaiDecoding:
    """onnxruntime-genai's model folder, its session at `threads` intra-op threads (written
    into its genai_config.json)."""
    import onnxruntime_genai as og

    cfg_path = Path(model) / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    if opts.get("intra_op_num_threads") != threads:
        opts["intra_op_num_threads"] = threads
        cfg_path.write_text(json.dumps(cfg, indent=4))
    return GenaiDecoding(og.Model(str(model)), int(cfg["model"]["vocab_size"]))


def open_llamacpp(model: Path, threads: int, n_ctx: int) -> LlamaDecoding:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(Path(model) / "model-q4_0.gguf"), n_ctx=n_ctx, n_batch=512,
                          n_ubatch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    return LlamaDecoding(llm, llm.n_vocab())


def time_decoder(d, vocab: int, *, prefill_tokens: int, contexts: list[int], decode_tokens: int,
                 untimed_steps: int = 1) -> tuple[int, float, float, dict[int, list[float]]]:
    """One of our decoders timed as every engine is: a warm-up; a `prefill_tokens` prompt, best
    of 3 (prefill seconds, and time to first token = prefill + the first greedy pick); per
    context, prefill it, `untimed_steps` steps, then `decode_tokens` timed steps each with a
    greedy pick. Returns (prompt tokens, prefill s, TTFT s, {context: step seconds})."""
    d.prefill(d.new_cache(20), prompt_ids(16, vocab, 1))  # warm-up
    ids = prompt_ids(prefill_tokens, vocab, 0)
    prefill_s = ttft_s = float("inf")
    for _ in range(3):
        cache = d.new_cache(len(ids) + 1)
        t0 = time.perf_counter()
        logits = d.prefill(cache, ids)
        t1 = time.perf_counter()
        int(np.argmax(logits[-1]))
        t2 = time.perf_counter()
        prefill_s, ttft_s = min(prefill_s, t1 - t0), min(ttft_s, t2 - t0)
    decode = {ctx: decode_at(d, vocab, ctx, decode_tokens, untimed_steps=untimed_steps) for ctx in contexts}
    return len(ids), prefill_s, ttft_s, decode


def decode_at(d, vocab: int, context: int, steps: int, *, untimed_steps: int = 1) -> list[float]:
    """One of our decoders at `context` tokens: a random prompt of that length prefilled,
    `untimed_steps` steps, then the seconds of `steps` timed steps, each with a greedy pick."""
    return timed_at(OursDecoding(d, vocab), context, steps, untimed_steps=untimed_steps)


def _result(engine: str, prefill_n: int, prefill_s: float, ttft_s: float, decode: dict[int, list[float]],
            load_s: float) -> dict:
    return asdict(EngineRun(engine, prefill_n, prefill_n / prefill_s, ttft_s * 1000,
                            {c: 1.0 / statistics.median(t) for c, t in decode.items()},
                            {c: 1.0 / min(t) for c, t in decode.items()}, peak_rss(), load_s))


def step_run_ours(a) -> dict:
    t0 = time.perf_counter()
    ours = open_ours(a.model, a.checkpoint, a.threads)
    load_s = time.perf_counter() - t0
    n, prefill_s, ttft_s, decode = time_decoder(ours.decoder, ours.vocab, prefill_tokens=a.prefill_tokens,
                                                contexts=a.contexts, decode_tokens=a.decode_tokens)
    return _result(a.engine, n, prefill_s, ttft_s, decode, load_s)


def step_run_genai(a) -> dict:
    t0 = time.perf_counter()
    genai = open_genai(a.model, a.threads)
    load_s = time.perf_counter() - t0
    g = genai.generator(32)  # warm-up
    g.append_tokens(prompt_ids(16, genai.vocab, 1).astype(np.int32))
    g.generate_next_token()
    del g
    ids = prompt_ids(a.prefill_tokens, genai.vocab, 0).astype(np.int32)
    prefill_s = ttft_s = float("inf")
    for _ in range(3):
        g = genai.generator(len(ids) + 2)
        t0 = time.perf_counter()
        g.append_tokens(ids)  # runs the prompt through the model
        t1 = time.perf_counter()
        g.generate_next_token()  # picks the first token from the prompt's logits
        int(g.get_next_tokens()[0])
        t2 = time.perf_counter()
        prefill_s, ttft_s = min(prefill_s, t1 - t0), min(ttft_s, t2 - t0)
        del g
    decode = {ctx: timed_at(genai, ctx, a.decode_tokens) for ctx in a.contexts}
    return _result(GENAI, len(ids), prefill_s, ttft_s, decode, load_s)


def step_run_llamacpp(a) -> dict:
    t0 = time.perf_counter()
    llama = open_llamacpp(a.model, a.threads, max([*a.contexts, a.prefill_tokens]) + a.decode_tokens + 8)
    load_s = time.perf_counter() - t0
    llama.llm.reset()
    llama.run(prompt_ids(16, llama.vocab, 1).tolist())  # warm-up
    ids = prompt_ids(a.prefill_tokens, llama.vocab, 0).tolist()
    prefill_s = ttft_s = float("inf")
    for _ in range(3):
        llama.llm.reset()
        t0 = time.perf_counter()
        llama.llm.eval(ids)
        t1 = time.perf_counter()
        int(np.argmax(llama.last_logits()))
        t2 = time.perf_counter()
        prefill_s, ttft_s = min(prefill_s, t1 - t0), min(ttft_s, t2 - t0)
    decode = {ctx: timed_at(llama, ctx, a.decode_tokens) for ctx in a.contexts}
    return _result(LLAMACPP, len(ids), prefill_s, ttft_s, decode, load_s)


PAIRED_PAUSE_S = 0.05  # between two engines' turns: the last one's spinning threads go to sleep
PAIRED_BANDWIDTH_REPEATS = 2  # copies (and reads) a turn's bandwidth is the best of, at 1 and all threads


def step_run_paired(a) -> dict:
    """Every engine of `a.paired_engines` open in this one process (models in `a.workdir`); per
    context, `a.paired_blocks` turns, each of which first measures the memory bandwidth
    (``BandwidthProbe``, best of PAIRED_BANDWIDTH_REPEATS) and then has each engine run one
    untimed step and `a.paired_steps` timed ones, the engines' order rotating by one every turn.
    Returns {"turns": {engine: {context: [tokens/s of each turn (1 / its median step)]}},
    "bandwidth": {context: [that turn's bandwidth figures]}}: the i-th figures were measured
    a fraction of a second apart, under the same load."""
    room = a.paired_blocks * (a.paired_steps + 1)
    probe = BandwidthProbe(a.bandwidth_mib << 20)
    engines = {}
    for name in a.paired_engines:
        model = Path(a.workdir) / name.replace("/", "-")
        if name == GENAI:
            engines[name] = open_genai(model, a.threads)
        elif name == LLAMACPP:
            engines[name] = open_llamacpp(model, a.threads, max(a.contexts) + room + 8)
        else:
            engines[name] = open_ours(model, a.checkpoint, a.threads)
    names = list(engines)
    result: dict[str, dict[int, list[float]]] = {name: {} for name in names}
    bandwidth: dict[int, list[dict]] = {}
    for ctx in a.contexts:
        steppers = {name: engine.start(ctx, room) for name, engine in engines.items()}
        for name in names:
            result[name][ctx] = []
        bandwidth[ctx] = []
        for turn in range(a.paired_blocks):
            bandwidth[ctx].append(probe.measure(a.threads, PAIRED_BANDWIDTH_REPEATS))
            time.sleep(PAIRED_PAUSE_S)
            for name in round_order(names, turn):
                steppers[name].step()  # untimed: the engine's threads wake, its weights stream in again
                result[name][ctx].append(1.0 / statistics.median(time_steps(steppers[name], a.paired_steps)))
                time.sleep(PAIRED_PAUSE_S)
        del steppers
    return {"turns": result, "bandwidth": bandwidth}


STEPS = {"checkpoint": step_checkpoint, "prepare-ours": step_prepare_ours, "prepare-ours-f32kv": step_prepare_ours_f32kv,
         "prepare-ours-genai-recipe": step_prepare_ours_genai_recipe, "prepare-genai": step_prepare_genai,
         "prepare-llamacpp": step_prepare_llamacpp, "bandwidth": step_bandwidth, "run-ours": step_run_ours,
         "run-genai": step_run_genai, "run-llamacpp": step_run_llamacpp, "run-paired": step_run_paired}
PREPARE = {OURS: "prepare-ours", OURS_F32KV: "prepare-ours-f32kv", OURS_GENAI_RECIPE: "prepare-ours-genai-recipe",
           GENAI: "prepare-genai", LLAMACPP: "prepare-llamacpp"}
RUN = {OURS: "run-ours", OURS_F32KV: "run-ours", OURS_GENAI_RECIPE: "run-ours", GENAI: "run-genai",
       LLAMACPP: "run-llamacpp"}


# -- the driver ---------------------------------------------------------------------------------------------------
class StepFailed(RuntimeError):
    """A step's interpreter exited non-zero or was killed: `reason` in words, its stderr's tail."""

    def __init__(self, name: str, returncode: int, stderr: str):
        if returncode < 0:
            try:
                reason = f"killed by {signal.Signals(-returncode).name}"
            except ValueError:
                reason = f"killed by signal {-returncode}"
        else:
            reason = f"exit status {returncode}"
        tail = [line for line in stderr.strip().splitlines() if line.strip()][-1:]
        self.reason = reason + (f" ({tail[0].strip()[:300]})" if tail else "")
        super().__init__(f"step {name} failed ({reason}):\n{stderr[-3000:]}")


def failure_note(engine: str, when: str, failed: StepFailed) -> str:
    """What the table's notes say of a peer that failed: when, why, and for llama.cpp's
    illegal instruction the known cause and its fix."""
    note = f"{engine} failed {when} and is left out of the table: {failed.reason}"
    if engine == LLAMACPP and "SIGILL" in failed.reason:
        note += ("; llama.cpp's AMX kernel faults on some virtual machines whose CPU reports AMX: "
                 "LLAMA_CPP_NO_AMX=1 bash scripts/install-peers.sh rebuilds it without AMX")
    return note


def run_step(python: str, name: str, *, nice: int = 0, **kwargs) -> dict:
    """One step in a fresh interpreter (its peak RSS is its own); its JSON result. Raises
    StepFailed when the interpreter does not exit cleanly."""
    cmd = [python, str(Path(__file__).resolve()), "--step", name]
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        cmd += [flag, *map(str, value)] if isinstance(value, (list, tuple)) else [flag, str(value)]
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise StepFailed(name, proc.returncode, proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peer_missing(python: str, engine: str, convert_script: Path) -> str | None:
    """Why `engine` cannot run under `python` (None when it can)."""
    if engine in OUR_ENGINES:
        return None
    if not Path(python).exists():
        return f"{python} does not exist"
    module = PEER_MODULES[engine]
    probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"{module} is not installed for {python}"
    if engine == LLAMACPP and not convert_script.is_file():
        return f"llama.cpp's convert_hf_to_gguf.py is not at {convert_script}"
    return None


def say(text: str) -> None:
    print(f"[peers] {text} (load average {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=Path("peers-bench"),
                   help="writes <out>.json and <out>.png (default: peers-bench)")
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help="a Llama checkpoint folder (default: build a random one in --workdir)")
    p.add_argument("--workdir", type=Path, default=CACHE / "peers-bench")
    for key, value in SHAPE_DEFAULTS.items():
        p.add_argument("--" + key.replace("_", "-"), type=int, default=value)
    p.add_argument("--block-size", type=int, default=None,
                   help="the peers' int4 block size (default: the profile's, which our bundle always takes)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024, 2048])
    p.add_argument("--table-contexts", type=int, nargs="+", default=None,
                   help="the contexts the tables show (default: 128 and 2048 where --contexts has them, "
                        "else every one of --contexts)")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="measure every engine this many times, interleaved")
    p.add_argument("--aggregate", choices=AGGREGATES, default="median",
                   help="how the rounds make one number, the memory bandwidth measured before each one "
                        "included: the median round (default; robust to a lucky or unlucky round on a shared "
                        "machine) or the best")
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    p.add_argument("--peer-python", default=str(DEFAULT_PEER_PYTHON) if DEFAULT_PEER_PYTHON.exists()
                   else sys.executable)
    p.add_argument("--convert-script", type=Path, default=DEFAULT_CONVERT)
    p.add_argument("--bandwidth-mib", type=int, default=512, help="size of the array copied (default 512 MiB)")
    p.add_argument("--nice", type=int, default=0, help="run the preparation steps under nice -n N")
    p.add_argument("--paired-blocks", type=int, default=40,
                   help="after the rounds, decode with every engine open in one process taking turns, this many "
                        "turns a context (default 40; 0 skips it): ours ÷ each engine turn by turn, under the same load")
    p.add_argument("--paired-steps", type=int, default=16, help="timed decode steps an engine's turn (default 16)")
    p.add_argument("--paired-engines", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # a round, a turn or a context of none would end, after the whole preparation, in a
    # traceback (no median of nothing) or tables without a decode column
    for flag, least in (("rounds", 1), ("decode_tokens", 1), ("prefill_tokens", 1), ("paired_steps", 1),
                        ("paired_blocks", 0), ("threads", 1), ("bandwidth_mib", 1)):
        if getattr(args, flag) < least:
            p.error(f"--{flag.replace('_', '-')} must be at least {least}, got {getattr(args, flag)}")
    if min(args.contexts) < 1:
        p.error(f"--contexts must be positive, got {args.contexts}")
    if args.table_contexts is None:
        args.table_contexts = [c for c in (128, 2048) if c in args.contexts] or list(args.contexts)
    unmeasured = [c for c in args.table_contexts if c not in args.contexts]
    if unmeasured:
        p.error(f"--table-contexts {' '.join(map(str, unmeasured))}: not among --contexts "
                f"{' '.join(map(str, args.contexts))}, so their columns would be empty")
    if args.block_size is None:  # the same block size as ours (the like for like)
        from edge_runtime.profiles import load_profile

        args.block_size = load_profile(PROFILE).quantization.block_size
    return args


def prepare(args, engine: str, python: str, checkpoint: Path, stamp: dict) -> ModelInfo:
    folder = args.workdir / engine.replace("/", "-")
    stamp_file = args.workdir / f"{engine.replace('/', '-')}.json"
    wanted = {**stamp, "engine": engine}
    if engine != LLAMACPP:  # Q4_0 has blocks of 32 whatever --block-size says
        wanted["block_size"] = args.block_size
    if engine in (OURS, OURS_F32KV):
        wanted["recipe"] = profile_recipe(0 if engine == OURS_F32KV else None)
    if stamp_file.is_file():
        saved = json.loads(stamp_file.read_text())
        if saved.get("stamp") == wanted and folder.exists():
            return ModelInfo(**{k: saved["info"][k] for k in ModelInfo.__dataclass_fields__})
    shutil.rmtree(folder, ignore_errors=True)
    say(f"{engine}: preparing the model ...")
    t0 = time.perf_counter()
    info = run_step(python, PREPARE[engine], nice=args.nice, out=folder, checkpoint=checkpoint,
                    block_size=args.block_size, threads=args.threads, convert_script=args.convert_script)
    say(f"{engine}: prepared in {time.perf_counter() - t0:.0f} s")
    stamp_file.write_text(json.dumps({"stamp": wanted, "info": info}))
    return ModelInfo(**{k: info[k] for k in ModelInfo.__dataclass_fields__})


def round_order(engines: list[str], rnd: int) -> list[str]:
    """The engines' order in round (or paired turn) `rnd`: rotated by one each time, so that no
    engine always runs first, right after the bandwidth measure (which leaves the machine busy
    with a GiB just copied and freed), or always after the same neighbour."""
    k = rnd % len(engines) if engines else 0
    return engines[k:] + engines[:k]


def measure_paired(args, runs: dict[str, EngineRun], checkpoint: Path, notes: list[str], *,
                   bytes_per_step: dict[str, dict[int, int]] | None = None) -> dict | None:
    """The paired measurement (``step_run_paired``) of the engines that came through the rounds
    (`runs`): its setup in words, rows, markdown table and raw turns; None when it is off or
    ours is not among them; a note (and None) when the engines' peak RSS in the rounds, added
    up, would not fit the memory available, or when its process fails -- the rounds' figures
    stand. `bytes_per_step` ({engine: {context: bytes a decode step reads}}) gives each turn's
    % of the roofline of the bandwidth measured at the start of that turn."""
    from edge_export.pipeline import host_memory_available

    engines = [e for e in ENGINES if e in runs]
    if args.paired_blocks <= 0 or OURS not in engines:
        return None
    need = sum(runs[e].peak_rss_bytes for e in engines) + 2 * (args.bandwidth_mib << 20)  # + the probe's arrays
    have = host_memory_available()
    if have is not None and need > 0.9 * have:
        notes.append(f"the paired measurement is left out: the engines together took {need / 2**30:.1f} GiB in the "
                     f"rounds and {have / 2**30:.1f} GiB are available (--engines fewer to pair them)")
        say(notes[-1])
        return None
    python = args.peer_python if any(e not in OUR_ENGINES for e in engines) else sys.executable
    say(f"decode in one process, the engines taking turns ({args.paired_blocks} turns a context) ...")
    try:
        raw = run_step(python, "run-paired", workdir=args.workdir, checkpoint=checkpoint, threads=args.threads,
                       contexts=args.contexts, paired_engines=engines, paired_blocks=args.paired_blocks,
                       paired_steps=args.paired_steps, bandwidth_mib=args.bandwidth_mib)
    except StepFailed as failed:
        notes.append(f"the paired measurement failed and is left out: {failed.reason}")
        say(notes[-1])
        return None
    turns = {e: {int(c): v for c, v in by_ctx.items()} for e, by_ctx in raw["turns"].items()}
    bandwidth = {int(c): v for c, v in raw["bandwidth"].items()}
    rows = paired_rows(turns, bandwidth=bandwidth, bytes_per_step=bytes_per_step)
    setup = (f"Decode with every engine open in one process, taking turns: per context {args.paired_blocks} turns, "
             f"in each one untimed and {args.paired_steps} timed steps of every engine, the order rotating; "
             f"tokens/s = the median turn's (1 / its median step); ours ÷ engine = the median over the turns "
             f"of ours' tokens/s over the engine's in the same turn, a fraction of a second apart under the same "
             f"load (the middle half of those ratios in brackets); each turn first measures the memory bandwidth "
             f"(numpy copy of {args.bandwidth_mib} MiB, best of {PAIRED_BANDWIDTH_REPEATS} at 1 and {args.threads} "
             f"threads; median {_median_bandwidth(bandwidth, 'bandwidth') / 1e9:.1f} GB/s copy, "
             f"{_median_bandwidth(bandwidth, 'read_bandwidth') / 1e9:.1f} GB/s read; the copy's range over the "
             f"turns {_bandwidth_ranges(bandwidth)}), and % roofline = the median "
             f"over the turns of the engine's tokens/s over that turn's roofline (copy bandwidth / bytes a step "
             f"reads, as in the rounds' table)")
    table = format_paired_table(rows, [c for c in args.table_contexts if c in args.contexts])
    return {"setup": setup, "rows": rows, "table": table, "turns": turns, "bandwidth": bandwidth}


def _median_bandwidth(bandwidth: dict[int, list[dict]], key: str) -> float:
    return statistics.median(b[key] for turns in bandwidth.values() for b in turns)


def _bandwidth_ranges(bandwidth: dict[int, list[dict]]) -> str:
    """The copy bandwidth's lowest and highest turn per context, e.g. "@128 37.0-43.2 GB/s"."""
    return ", ".join(f"@{ctx} {min(b['bandwidth'] for b in turns) / 1e9:.1f}-"
                     f"{max(b['bandwidth'] for b in turns) / 1e9:.1f} GB/s" for ctx, turns in bandwidth.items())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.step:
        print(json.dumps(STEPS[args.step](args)))
        return 0

    from edge_export.checkpoint import read_checkpoint

    args.workdir.mkdir(parents=True, exist_ok=True)
    shape = {k: getattr(args, k) for k in SHAPE_DEFAULTS}
    if args.checkpoint:
        checkpoint = Path(args.checkpoint).expanduser().resolve()
    else:
        checkpoint = args.workdir / "checkpoint"
        stamp_file = args.workdir / "checkpoint.json"
        if not (stamp_file.is_file() and json.loads(stamp_file.read_text()) == shape):
            shutil.rmtree(checkpoint, ignore_errors=True)
            say(f"building the checkpoint {shape} ...")
            run_step(sys.executable, "checkpoint", out=checkpoint, **shape)
            stamp_file.write_text(json.dumps(shape))
    info = read_checkpoint(checkpoint)
    a = info.architecture
    arch = {"layers": a.num_layers, "kv_heads": a.num_kv_heads, "head_dim": a.head_dim}
    stamp = {"checkpoint": str(checkpoint), "config_sha256": info.config_sha256, "weight_bytes": info.weight_bytes}

    notes, infos = [], {}
    for engine in args.engines:
        python = sys.executable if engine in OUR_ENGINES else args.peer_python
        why = peer_missing(python, engine, args.convert_script)
        if why:
            notes.append(f"{engine} skipped: {why} (bash scripts/install-peers.sh installs the peers)")
            say(notes[-1])
            continue
        try:
            infos[engine] = prepare(args, engine, python, checkpoint, stamp)
        except StepFailed as failed:
            if engine in OUR_ENGINES:
                raise
            notes.append(failure_note(engine, "preparing its model", failed))
            say(notes[-1])

    measured: dict[str, list[EngineRun]] = {e: [] for e in infos}
    loads, bandwidths = [], []
    for rnd in range(args.rounds):
        say(f"memory bandwidth {rnd + 1}/{args.rounds} ...")
        bandwidths.append(run_step(sys.executable, "bandwidth", threads=args.threads,
                                   bandwidth_mib=args.bandwidth_mib))
        for engine in round_order(list(measured), rnd):  # a peer that failed a round is out of `measured`
            say(f"{engine}: round {rnd + 1}/{args.rounds} ...")
            python = sys.executable if engine in OUR_ENGINES else args.peer_python
            try:
                r = run_step(python, RUN[engine], model=args.workdir / engine.replace("/", "-"), engine=engine,
                             checkpoint=checkpoint, threads=args.threads,
                             prefill_tokens=args.prefill_tokens, contexts=args.contexts,
                             decode_tokens=args.decode_tokens)
            except StepFailed as failed:
                if engine in OUR_ENGINES:
                    raise
                del measured[engine]
                notes.append(failure_note(engine, f"in round {rnd + 1}", failed))
                say(notes[-1])
                continue
            r["decode_tokens_per_s"] = {int(k): v for k, v in r["decode_tokens_per_s"].items()}
            r["decode_best_tokens_per_s"] = {int(k): v for k, v in r["decode_best_tokens_per_s"].items()}
            measured[engine].append(EngineRun(**r))
            loads.append(round(os.getloadavg()[0], 2))
    runs = {e: merge_runs(rs, args.aggregate) for e, rs in measured.items() if rs}
    paired = measure_paired(args, runs, checkpoint, notes,
                            bytes_per_step={e: {c: step_bytes(infos[e], arch, c) for c in args.contexts} for e in runs})
    bw = merge_bandwidths(bandwidths, args.aggregate)
    rows = build_rows(infos, runs, bandwidth=bw["bandwidth"], arch=arch, contexts=args.contexts,
                      read_bandwidth=bw["read_bandwidth"])

    params = info.weight_bytes // 2 if info.torch_dtype in ("float16", "bfloat16") else info.weight_bytes // 4
    setup = (f"checkpoint {checkpoint.name}: {a.num_layers} layers, hidden {a.hidden_size}, heads {a.num_heads}/"
             f"{a.num_kv_heads} kv, vocab {a.vocab_size} ({params / 1e6:.0f}M params, {info.torch_dtype}); "
             f"CPU: {os.cpu_count()} cores, {args.threads} threads for every engine; batch 1; "
             f"prefill {args.prefill_tokens} tokens (best of 3); decode: median of {args.decode_tokens} steps "
             f"after a prefill of C tokens; {args.aggregate} of {args.rounds} interleaved rounds; memory bandwidth "
             f"({args.aggregate} of {len(bandwidths)}, one before each round) "
             f"{bw['bandwidth'] / 1e9:.1f} GB/s (numpy copy of {args.bandwidth_mib} MiB, read + write; 1 thread "
             f"{bw['one_thread'] / 1e9:.1f}, {args.threads} threads {bw['all_threads'] / 1e9:.1f}); read bandwidth "
             f"{bw['read_bandwidth'] / 1e9:.1f} GB/s (numpy max over the array; 1 thread "
             f"{bw['read_one_thread'] / 1e9:.1f}, {args.threads} threads {bw['read_all_threads'] / 1e9:.1f}); "
             f"roofline = bandwidth / (weights read per token, embedding table as one row, + KV cache at C in "
             f"the engine's KV dtype), read roofline the same with the read bandwidth; 1-min load average after "
             f"each run: {loads}")
    table = format_table(rows, [c for c in args.table_contexts if c in args.contexts])
    print(setup + "\n")
    print(table)
    if paired:
        print("\n" + paired["setup"] + "\n")
        print(paired["table"])
    for note in notes:
        print(note)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"setup": setup, "command": " ".join(["python", "benchmarks/peers.py", *(argv or sys.argv[1:])]),
              "bandwidth": bw, "bandwidth_rounds": bandwidths, "architecture": arch,
              "models": {e: asdict(i) for e, i in infos.items()},
              "rows": rows, "rounds": {e: [asdict(r) for r in rs] for e, rs in measured.items()},
              "paired": paired, "skipped": notes, "table": table}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    why = plot(rows, out.with_suffix(".png"),
               f"{a.num_layers}x{a.hidden_size} Code Llama-shaped, batch 1, {args.threads} threads",
               paired["rows"] if paired else None)
    print(f"wrote {out.with_suffix('.json')}" + (f"; {why}" if why else f" and {out.with_suffix('.png')}"))
    return 0


if __name__ == "__main__":
    from edge_runtime.cli import run_script

    sys.exit(run_script(main))
