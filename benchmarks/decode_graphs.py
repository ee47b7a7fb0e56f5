"""Compare the two decoder graph flavours on one checkpoint, on this machine's CPU.

* ``optimum-kv-concat``: optimum's torch export (fp32) + ``quantize_weights``
  (MatMulNBits int4), driven by ``KVConcatDecoder`` (ping-pong KV buffers);
* ``gqa-shared-kv``: ``graph_builder.build_decoder_graph`` int4 straight from the
  safetensors, driven by ``SharedKVDecoder`` (one shared KV buffer per layer).

Both use the cpu-x86_64 profile's recipe (block 32, symmetric, accuracy level 4,
lm_head kept in fp32). The checkpoint has random weights (``build_checkpoint_streamed``,
fixed seed, float16), so speed -- not text -- is measured.

Steps, each in a fresh subprocess:

1. ``export`` per flavour: wall time and the exporting process's peak RSS.
2. ``speed``: BOTH sessions in one process, measured alternately -- prefill
   (P-token prompt, best of 3, alternating) and, per context C, prefill C tokens
   in both, then alternate single decode steps (argmax after each, as the
   engine's loop does). Alternating step by step makes load from other
   processes on a small shared machine hit both flavours alike; the table gives
   tokens/s from the median step time (the JSON also has the best step).
3. ``memory`` per flavour: session load time, then the same work for one
   flavour alone (prefill P, prefill the longest context and decode); the
   process's peak RSS.

    python benchmarks/decode_graphs.py                       # ~536M params, 8 layers of 2048
    python benchmarks/decode_graphs.py --layers 4 --contexts 128 1024   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FLAVOURS = ("optimum-kv-concat", "gqa-shared-kv")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prompt_ids(n: int, vocab: int, seed: int) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(100, min(vocab, 32000), size=n, dtype=np.int64)
    ids[0] = 1
    return ids


def graph_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))


# -- steps (each run in a subprocess) -------------------------------------------------------------------------
def step_checkpoint(args) -> dict:
    from edge_export.synthetic import build_checkpoint_streamed

    t0 = time.perf_counter()
    build_checkpoint_streamed(Path(args.out), hidden_size=args.hidden, intermediate_size=args.intermediate,
                              num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                              seed=args.seed, dtype="float16", max_position_embeddings=16384)
    return {"seconds": time.perf_counter() - t0}


def step_export(args) -> dict:
    from edge_export.checkpoint import read_checkpoint

    info = read_checkpoint(args.checkpoint)
    out = Path(args.out)
    t0 = time.perf_counter()
    if args.flavour == "optimum-kv-concat":
        from edge_export.onnx_export import export_onnx
        from edge_export.quantize import QuantRecipe, quantize_weights

        work = out / "_export"
        exported = export_onnx(info, work)
        recipe = QuantRecipe(bits=4, block_size=args.block_size, symmetric=True,
                             accuracy_level=args.accuracy_level, keep_unquantized=("lm_head",))
        quantize_weights(exported, out / "model.onnx", recipe)
        shutil.rmtree(work)
    else:
        from edge_export.graph_builder import build_decoder_graph

        build_decoder_graph(info, out / "model.onnx", precision="int4", block_size=args.block_size, symmetric=True,
                            accuracy_level=args.accuracy_level, keep_unquantized=("lm_head",),
                            max_length=args.max_length)
    return {"seconds": time.perf_counter() - t0, "graph_bytes": graph_bytes(out), "peak_rss": peak_rss()}


def cpu_decoder(graph: Path, arch, flavour: str, *, threads: int, max_length: int, spinning: bool = True,
                profile_prefix: str | None = None):
    """(decoder, session, load seconds): a CPU session of ``graph`` with the engine's graph
    optimisations and ``threads`` intra-op threads (0: onnxruntime's default), and the
    engine's decoder for ``flavour`` over it -- what every benchmark here times.
    ``spinning`` False turns the thread pool's spin-wait off; ``profile_prefix`` turns
    onnxruntime's profiler on (files start with it)."""
    import onnxruntime as ort

    from edge_runtime.engine import DECODERS

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(graph), sess_options=options, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    return DECODERS[flavour](ort, session, arch, device="cpu", max_length=max_length), session, load_s


def _decoder(args, flavour: str):
    """(decoder, session load seconds) for one flavour's graph in the work folder."""
    from edge_export.checkpoint import read_checkpoint

    decoder, _, load_s = cpu_decoder(Path(args.workdir) / flavour / "model.onnx",
                                     read_checkpoint(args.checkpoint).architecture, flavour, threads=args.threads,
                                     max_length=args.max_length)
    return decoder, load_s


def step_speed(args) -> dict:
    decoders = {f: _decoder(args, f)[0] for f in args.flavours}
    vocab = next(iter(decoders.values())).vocab_size
    for d in decoders.values():  # warm-up
        d.prefill(d.new_cache(16), prompt_ids(16, vocab, 1))
    ids = prompt_ids(args.prefill_tokens, vocab, 0)
    prefill = {f: float("inf") for f in decoders}
    for _ in range(3):
        for f, d in decoders.items():
            cache = d.new_cache(len(ids))
            t0 = time.perf_counter()
            int(np.argmax(d.prefill(cache, ids)[-1]))
            prefill[f] = min(prefill[f], time.perf_counter() - t0)
    result = {f: {"prefill_tok_s": len(ids) / prefill[f], "decode_tok_s": {}, "decode_best_tok_s": {}}
              for f in decoders}
    for context in args.contexts:
        ids = prompt_ids(context, vocab, 2)
        caches, tokens, steps = {}, {}, {f: [] for f in decoders}
        for f, d in decoders.items():
            caches[f] = d.new_cache(context + args.decode_tokens)
            tokens[f] = int(np.argmax(d.prefill(caches[f], ids)[-1]))
            tokens[f] = int(np.argmax(d.decode(caches[f], tokens[f])))  # first step after prefill: not timed
        for _ in range(args.decode_tokens - 1):
            for f, d in decoders.items():
                t0 = time.perf_counter()
                tokens[f] = int(np.argmax(d.decode(caches[f], tokens[f])))
                steps[f].append(time.perf_counter() - t0)
        for f in decoders:
            result[f]["decode_tok_s"][str(context)] = 1.0 / float(np.median(steps[f]))
            result[f]["decode_best_tok_s"][str(context)] = 1.0 / float(np.min(steps[f]))
    return result


def step_memory(args) -> dict:
    decoder, load_s = _decoder(args, args.flavour)
    vocab = decoder.vocab_size
    decoder.prefill(decoder.new_cache(args.prefill_tokens), prompt_ids(args.prefill_tokens, vocab, 0))
    context = max(args.contexts)
    cache = decoder.new_cache(context + args.decode_tokens)
    token = int(np.argmax(decoder.prefill(cache, prompt_ids(context, vocab, 2))[-1]))
    for _ in range(min(8, args.decode_tokens)):  # within the cache's capacity
        token = int(np.argmax(decoder.decode(cache, token)))
    return {"load_s": load_s, "peak_rss": peak_rss()}


STEPS = {"checkpoint": step_checkpoint, "export": step_export, "speed": step_speed, "memory": step_memory}


# -- the driver -----------------------------------------------------------------------------------------------------
def run_step(name: str, **kwargs) -> dict:
    """Run one step in a fresh interpreter (its peak RSS is its own); returns its JSON result."""
    cmd = [sys.executable, __file__, "--step", name]
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, (list, tuple)):
            cmd += [flag, *map(str, value)]
        else:
            cmd += [flag, str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"step {name} failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


def say(text: str) -> None:
    print(f"{text} (load average {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    p.add_argument("--flavour", choices=FLAVOURS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/edge-bench-decode-graphs"))
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5504)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--accuracy-level", type=int, default=4)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 2048])
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--max-length", type=int, default=0, help="decoder/graph max length (default: contexts + decode)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--flavours", nargs="+", choices=FLAVOURS, default=list(FLAVOURS))
    p.add_argument("--keep", action="store_true", help="keep the work folder (checkpoint and graphs)")
    p.add_argument("--reuse-exports", action="store_true",
                   help="with --keep from an earlier run of the same shape: measure the graphs already there")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if not args.max_length:
        args.max_length = max(max(args.contexts), args.prefill_tokens) + args.decode_tokens
    if args.step:
        print(json.dumps(STEPS[args.step](args)))
        return 0

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "checkpoint"
    shape = dict(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, heads=args.heads,
                 kv_heads=args.kv_heads, seed=args.seed)
    stamp = work / "checkpoint.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == shape):
        shutil.rmtree(checkpoint, ignore_errors=True)
        say(f"building the checkpoint {shape} ...")
        run_step("checkpoint", out=checkpoint, **shape)
        stamp.write_text(json.dumps(shape))
    from edge_export.checkpoint import read_checkpoint

    info = read_checkpoint(checkpoint)
    a = info.architecture
    params = a.vocab_size * a.hidden_size * 2 + a.num_layers * (
        a.hidden_size * (a.num_heads + 2 * a.num_kv_heads) * a.head_dim + a.num_heads * a.head_dim * a.hidden_size
        + 3 * a.hidden_size * args.intermediate)
    common = dict(checkpoint=checkpoint, workdir=work, block_size=args.block_size,
                  accuracy_level=args.accuracy_level, max_length=args.max_length)
    run_args = dict(prefill_tokens=args.prefill_tokens, contexts=args.contexts, decode_tokens=args.decode_tokens,
                    threads=args.threads, **common)

    rows: dict[str, dict] = {}
    for flavour in args.flavours:
        out = work / flavour
        stamp_export = out / "export.json"
        config = {**shape, **{k: str(v) for k, v in common.items()}}
        previous = json.loads(stamp_export.read_text()) if stamp_export.is_file() else {}
        if args.reuse_exports and previous.get("config") == config and (out / "model.onnx").is_file():
            exported = previous
        else:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            say(f"{flavour}: export ...")
            exported = {**run_step("export", flavour=flavour, out=out, **common), "config": config}
            stamp_export.write_text(json.dumps(exported))
        rows[flavour] = {"export": exported}
    say("speed, both flavours alternating ...")
    speed = run_step("speed", flavours=args.flavours, **run_args)
    loads = [os.getloadavg()[0]]
    for flavour in args.flavours:
        say(f"{flavour}: memory ...")
        rows[flavour]["speed"] = speed[flavour]
        rows[flavour]["memory"] = run_step("memory", flavour=flavour, **run_args)
        loads.append(os.getloadavg()[0])
        if not args.keep:
            shutil.rmtree(work / flavour)

    print(f"\ncheckpoint: {args.layers} layers, hidden {a.hidden_size}, intermediate {args.intermediate}, "
          f"heads {a.num_heads}/{a.num_kv_heads} kv, vocab {a.vocab_size} ({params / 1e6:.0f}M params, float16 "
          f"{gib(info.weight_bytes)}); int4 block {args.block_size} symmetric, accuracy level "
          f"{args.accuracy_level}, lm_head fp32; onnxruntime CPU, {os.cpu_count()} cores, intra-op threads "
          f"{args.threads or 'default'}; decode: median of {args.decode_tokens - 1} alternating steps; "
          f"1-min load average after the runs: {', '.join(f'{x:.1f}' for x in loads)}\n")
    header = ["", *args.flavours]
    lines = [
        ("export time (s)", lambda r: f"{r['export']['seconds']:.1f}"),
        ("export peak RSS", lambda r: gib(r["export"]["peak_rss"])),
        ("graph + data size", lambda r: gib(r["export"]["graph_bytes"])),
        ("session load (s)", lambda r: f"{r['memory']['load_s']:.1f}"),
        (f"prefill {args.prefill_tokens} tok/s", lambda r: f"{r['speed']['prefill_tok_s']:.1f}"),
        *[(f"decode tok/s @ ctx {c}", (lambda c: lambda r: f"{r['speed']['decode_tok_s'][str(c)]:.2f}")(c))
          for c in args.contexts],
        ("run peak RSS", lambda r: gib(r["memory"]["peak_rss"])),
    ]
    table = [header, ["---"] * len(header)] + [[label, *(fmt(rows[f]) for f in args.flavours)]
                                                for label, fmt in lines]
    for row in table:
        print("| " + " | ".join(row) + " |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                        indent=2))
    if not args.keep:
        shutil.rmtree(checkpoint, ignore_errors=True)
        stamp.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    from edge_runtime.cli import run_script

    sys.exit(run_script(main))
