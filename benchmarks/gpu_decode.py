"""Decode speed on an NVIDIA GPU against the GPU's roofline (issue #8, the GPU half).

    python benchmarks/gpu_decode.py --synthetic-7b /tmp/7b --out results/gpu-7b   # int4 and fp16, 32 layers
    python benchmarks/gpu_decode.py --bundle bundles/codellama-7b-int4 --out results/gpu-mine

Runs our engine as the daemon does -- ``Engine.from_bundle`` with the nvidia-gpu
profile: the CUDA provider, the KV cache in device memory bound with I/O binding, one
decode step = token in, logits out -- in two variants per bundle: ``cuda-graph`` (the
profile's default, ``enable_cuda_graph = "1"``: each decode step replays one recording
instead of launching every node; gqa_decoder.py) and ``cuda`` (``enable_cuda_graph = "0"``).

What it does:

1. ``--synthetic-7b DIR``: builds (once) a Code Llama 7B-shaped checkpoint with random
   fp16 weights (``build_checkpoint_streamed``; ``--layers`` fewer for a quick run) and
   exports it with ``edge-runtime export --profile nvidia-gpu`` at each ``--precision``,
   the exports running side by side. Random weights: speed and size do not depend on the
   values, so the export rounds to nearest without the profile's scale search and GPTQ
   (the same bytes and kernels; ``--profile-recipe`` keeps them) and skips fidelity.
2. measures the GPU's memory bandwidth: the best of several runs of a one-node onnxruntime
   graph (Neg) over a ``--bandwidth-mib`` float16 tensor in device memory, counting bytes
   read plus bytes written (the issue's "large array copy"); and, where PyTorch sees the
   GPU, a device-to-device ``copy_`` of the same size. The roofline divides the higher.
3. per bundle and variant, in a fresh process: session load; a ``--prefill-tokens`` prompt
   (best of 3: prefill tokens/s, time to first token = prefill + the first greedy pick);
   per context C, prefill C tokens, three untimed steps (onnxruntime records the CUDA graph
   on the second), then ``--decode-tokens`` steps, each a decode and a greedy pick:
   tokens/s = 1 / the median step; the GPU memory the process holds (nvidia-smi).
4. the roofline: bandwidth / bytes a decode step must read -- the weights (every
   initializer but the token-embedding table, of which one row) plus the KV cache held at
   context C (2 x layers x kv heads x head dim x C x 2 bytes).

With ``--peers`` (and ``--synthetic-7b``), onnxruntime-genai's own builder makes its model of
the same checkpoint for the CUDA provider at each precision (``-e cuda``, int4 at the
profile's block size) and its generator loop is timed the same way (benchmarks/peers.py's); a peer
that is not installed (``pip install onnxruntime-genai-cuda``, a CUDA build) is skipped with
the reason. llama.cpp needs a CUDA build of llama-cpp-python and is not run here.

``--session-config KEY=VALUE`` (repeatable) adds onnxruntime session config entries to our
engine's profile, e.g. ``ep.cuda.fpa_intb_gemm=1``: onnxruntime's TensorRT-LLM int4 kernels
(a GEMV for decode steps) instead of its own MatMulNBits kernel, for the weights they take
(float16 activations, symmetric blocks of 32 in onnxruntime's default build); the table names
the entries beside the variant. ``--profile FILE`` exports and runs with another profile
(a copy of nvidia-gpu.toml with another block size, say).

Prints one table; ``--out PREFIX`` writes PREFIX.json and PREFIX.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edge_runtime.profiles import SESSION_CONFIG_KEY, load_profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_runtime.memory_fit import kv_cache_bytes  # noqa: E402
from edge_runtime.roofline import cuda_bandwidth, roofline_tokens_per_s  # noqa: E402
from peers import (  # noqa: E402  (the byte counting, timing and plot the CPU benchmark uses)
    genai_builder_argv,
    onnx_kv_element_bytes,
    onnx_weight_bytes,
    plot,
    time_decoder,
)
from peers import step_run_genai as run_genai  # noqa: E402

PROFILE = "nvidia-gpu"
VARIANTS = ("cuda", "cuda-graph")
CUDA = "CUDAExecutionProvider"
GENAI = "onnxruntime-genai"


def say(text: str) -> None:
    print(f"[gpu-decode] {text}", file=sys.stderr, flush=True)


# -- steps (each in a fresh process) ---------------------------------------------------------------------------
def step_bandwidth(a) -> dict:
    """GB/s (read + written) of a float16 Neg over a --bandwidth-mib tensor on the GPU
    (``edge_runtime.roofline.cuda_bandwidth``, what `edge-runtime bench` measures) and of a torch copy."""
    n = a.bandwidth_mib * 2**20 // 2
    neg = cuda_bandwidth(2 * n, a.bandwidth_runs)  # n float16 elements
    result = {"bytes": neg["bytes"], "onnxruntime_neg_gbps": neg["bandwidth"] / 1e9}
    try:
        import torch

        if torch.cuda.is_available():
            src = torch.empty(n, dtype=torch.float16, device="cuda")
            dst = torch.empty_like(src)
            best = float("inf")
            for _ in range(a.bandwidth_runs):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                dst.copy_(src)
                torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
            result["torch_copy_gbps"] = 4 * n / best / 1e9
    except ImportError:
        pass
    result["gbps"] = max(v for k, v in result.items() if k.endswith("_gbps"))
    return result


def gpu_memory_used_mib(pid: int) -> int | None:
    """What nvidia-smi says process `pid` holds on the GPU (None without nvidia-smi)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
            return int(fields[1])
    return None


def session_config_item(text: str) -> tuple[str, str]:
    """argparse type of --session-config: KEY=VALUE, KEY shaped as a profile's session_config keys."""
    key, sep, value = text.partition("=")
    if not sep or not re.fullmatch(SESSION_CONFIG_KEY, key):
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE with a dotted onnxruntime session config key "
                                         "(e.g. ep.cuda.fpa_intb_gemm=1)")
    return key, value


def load_engine(bundle: Path, profile_name: str, variant: str, session_config: dict[str, str] | None = None):
    """The daemon's engine for `bundle` on the GPU, with CUDA graphs for variant "cuda-graph" and
    without them for "cuda" (whatever the profile says); `session_config` added to the profile's."""
    from edge_runtime.engine import Engine

    profile = load_profile(profile_name).with_provider_options(
        CUDA, enable_cuda_graph="1" if variant == "cuda-graph" else "0")
    if session_config:
        profile = profile.with_session_config(session_config)
    engine = Engine.from_bundle(bundle, profile=profile)
    if engine.info.provider != CUDA or engine.decoder.device != "cuda":
        raise SystemExit(f"the engine runs on {engine.info.provider}, not on the GPU")
    if (variant == "cuda-graph") != bool(getattr(engine.decoder, "cuda_graph", False)):
        raise SystemExit(f"{bundle}: the {variant} variant runs {'without' if variant == 'cuda-graph' else 'with'} "
                         "CUDA graphs (the engine's log says why)")
    return engine


def step_run(a) -> dict:
    """One bundle, one variant: load, prefill/TTFT, decode tokens/s per context."""
    t0 = time.perf_counter()
    engine = load_engine(a.bundle, a.profile, a.variant, dict(a.session_config))
    load_s = time.perf_counter() - t0
    d, vocab = engine.decoder, engine.bundle.architecture.vocab_size
    # three untimed steps: the first ones allocate, and onnxruntime records the CUDA graph
    n, prefill_s, ttft_s, times = time_decoder(d, vocab, prefill_tokens=a.prefill_tokens, contexts=a.contexts,
                                               decode_tokens=a.decode_tokens, untimed_steps=3)
    decode = {c: 1.0 / statistics.median(t) for c, t in times.items()}
    best = {c: 1.0 / min(t) for c, t in times.items()}
    return {"bundle": str(a.bundle), "variant": a.variant, "precision": engine.bundle.precision,
            "session_config": dict(a.session_config), "load_s": load_s, "prefill_tokens": n, "prefill_tokens_per_s": n / prefill_s,
            "ttft_ms": ttft_s * 1000, "decode_tokens_per_s": decode, "decode_best_tokens_per_s": best,
            "gpu_memory_mib": gpu_memory_used_mib(os.getpid()), "providers": engine.session.get_providers()}


def genai_missing() -> str | None:
    """Why onnxruntime-genai cannot run on the GPU here (None when it can)."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return "onnxruntime_genai is not installed (pip install onnxruntime-genai-cuda)"
    if hasattr(og, "is_cuda_available") and not og.is_cuda_available():
        return f"onnxruntime-genai {getattr(og, '__version__', '')} is not a CUDA build (onnxruntime-genai-cuda)"
    return None


def genai_builder_command(a, out: Path, cache: Path) -> list[str]:
    """onnxruntime-genai's builder for the CUDA provider; int4 in our bundles' layout: the block
    size and symmetry of --block-size / --symmetric, else the profile's (the builder's own
    options, int4_block_size and int4_is_symmetric: it ignores keys it does not know)."""
    q = load_profile(a.profile).quantization
    return genai_builder_argv(a.synthetic_7b, out, cache, precision=a.precision[0], provider="cuda",
                              block_size=q.block_size if a.block_size is None else a.block_size,
                              symmetric=q.symmetric if a.symmetric is None else a.symmetric)


def step_prepare_genai(a) -> dict:
    """onnxruntime-genai's builder, for the CUDA provider, from the same checkpoint."""
    out = Path(a.workdir)
    cache = out.with_name(out.name + ".cache")
    subprocess.run(genai_builder_command(a, out, cache), check=True, stdout=sys.stderr)
    shutil.rmtree(cache, ignore_errors=True)
    return {"model": str(out)}


def step_run_genai(a) -> dict:
    """benchmarks/peers.py's onnxruntime-genai loop, on the model's own (CUDA) provider."""
    got = run_genai(argparse.Namespace(model=str(a.bundle), threads=0, prefill_tokens=a.prefill_tokens,
                                        contexts=a.contexts, decode_tokens=a.decode_tokens))
    return {"bundle": str(a.bundle), "variant": GENAI, "precision": Path(a.bundle).name.split("-")[-1],
            "load_s": got["load_s"], "prefill_tokens": got["prefill_tokens"],
            "prefill_tokens_per_s": got["prefill_tokens_per_s"], "ttft_ms": got["ttft_ms"],
            "decode_tokens_per_s": got["decode_tokens_per_s"],
            "decode_best_tokens_per_s": got["decode_best_tokens_per_s"], "gpu_memory_mib": None,
            "providers": ["CUDAExecutionProvider (onnxruntime-genai)"]}


STEPS = {"bandwidth": step_bandwidth, "run": step_run, "prepare-genai": step_prepare_genai,
         "run-genai": step_run_genai}


def run_step(name: str, args: list[str]) -> dict:
    """A step in a fresh interpreter; its JSON result (the last line it prints)."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--step", name, *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"step {name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- preparing bundles -----------------------------------------------------------------------------------------
def speed_profile(profile: str, work: Path, *, search: bool = False, block_size: int | None = None,
                  symmetric: bool | None = None) -> Path:
    """`profile` as a file: without the scale search unless `search` (values only; same bytes and
    kernels), with another int4 layout where `block_size` / `symmetric` say."""
    from edge_runtime.profiles import profile_text

    text, name = profile_text(profile), Path(profile).stem
    edits = [] if search else [("scale_search", "true", "false")]
    if block_size is not None:
        edits.append(("block_size", r"\d+", str(block_size)))
        name += f"-b{block_size}"
    if symmetric is not None:
        edits.append(("symmetric", "true|false", str(symmetric).lower()))
        name += "-sym" if symmetric else "-asym"
    for key, old, new in edits:
        text, n = re.subn(rf"(?m)^{key}\s*=\s*(?:{old})\b", f"{key} = {new}", text)
        if n > 1 or (n == 0 and key != "scale_search"):  # a profile without the search needs no edit
            raise SystemExit(f"profile {profile}: {n} `{key} = ...` lines, not one (write the file by hand)")
    path = work / f"{name}{'' if search else '-speed'}.toml"
    path.write_text(text)
    return path


def export_bundles(checkpoint: Path, work: Path, precisions: list[str], *, profile: str, profile_recipe: bool,
                   max_context: int, block_size: int | None = None, symmetric: bool | None = None) -> list[Path]:
    """Export `checkpoint` at each precision, side by side; the bundle folders."""
    if block_size is not None or symmetric is not None or not profile_recipe:
        profile = str(speed_profile(profile, work, search=profile_recipe, block_size=block_size, symmetric=symmetric))
    procs = {}
    for precision in precisions:
        out = work / precision
        cmd = [sys.executable, "-m", "edge_runtime", "export", "--checkpoint", str(checkpoint), "--profile", profile,
               "--precision", precision, "--output", str(out), "--force", "--skip-fidelity", "--allow-degraded",
               "--max-context", str(max_context)]
        if not profile_recipe:
            cmd += ["--algorithm", "rtn"]
        log = open(work / f"export-{precision}.log", "w")
        procs[precision] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, time.perf_counter())
    bundles = []
    for precision, (proc, log, t0) in procs.items():
        rc = proc.wait()
        log.close()
        if rc != 0:
            raise SystemExit(f"export {precision} failed:\n{(work / f'export-{precision}.log').read_text()[-3000:]}")
        say(f"exported {precision} in {time.perf_counter() - t0:.0f} s")
        bundles.append(work / precision)
    return bundles


# -- the table -------------------------------------------------------------------------------------------------
def bundle_facts(bundle: Path) -> dict:
    """Bytes and shapes of a bundle, or of onnxruntime-genai's model folder."""
    if (bundle / "bundle.json").is_file():
        from edge_runtime.bundle import load_bundle

        b = load_bundle(bundle)
        graph, arch = b.graph_path, b.architecture
        shape = {"layers": arch.num_layers, "kv_heads": arch.num_kv_heads, "head_dim": arch.head_dim}
    else:  # onnxruntime-genai's folder: its genai_config.json has the decoder's shape
        decoder = json.loads((bundle / "genai_config.json").read_text())["model"]["decoder"]
        graph = bundle / decoder.get("filename", "model.onnx")
        shape = {"layers": decoder["num_hidden_layers"], "kv_heads": decoder["num_key_value_heads"],
                 "head_dim": decoder["head_size"]}
    total, per_token = onnx_weight_bytes(graph)
    return {"model_bytes": sum(p.stat().st_size for p in bundle.iterdir() if p.name.startswith(graph.name)),
            "weight_bytes_per_token": per_token, "kv_element_bytes": onnx_kv_element_bytes(graph), **shape}


def add_roofline(row: dict, facts: dict, gbps: float) -> dict:
    row = {**row, **facts, "roofline_percent": {}, "roofline_tokens_per_s": {}}
    for ctx, tps in row["decode_tokens_per_s"].items():
        kv = kv_cache_bytes(num_layers=facts["layers"], num_kv_heads=facts["kv_heads"], head_dim=facts["head_dim"],
                            context=int(ctx), dtype_bytes=facts["kv_element_bytes"])
        roof = roofline_tokens_per_s(gbps * 1e9, facts["weight_bytes_per_token"], kv)
        row["roofline_tokens_per_s"][ctx] = roof
        row["roofline_percent"][ctx] = 100.0 * tps / roof
    return row


def add_ratios(rows: list[dict]) -> list[dict]:
    """Per row and context: our fastest variant of the same precision over this row's tokens/s."""
    for r in rows:
        ours = [o for o in rows if o["variant"] in VARIANTS and o["precision"] == r["precision"]]
        r["ours_over_this"] = {c: max(o["decode_tokens_per_s"][c] for o in ours) / v
                               for c, v in r["decode_tokens_per_s"].items()
                               if ours and all(c in o["decode_tokens_per_s"] for o in ours)}
    return rows


def format_table(rows: list[dict], contexts: list[int]) -> str:
    header = ["bundle", "variant", "precision", "model", "load", "prefill tok/s", "TTFT"]
    header += [f"decode tok/s @{c}" for c in contexts] + [f"% roofline @{c}" for c in contexts] + ["GPU memory"]
    header += [f"ours ÷ this @{c}" for c in contexts]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        variant = " ".join([r["variant"], *(f"{k}={v}" for k, v in r.get("session_config", {}).items())])
        cells = [Path(r["bundle"]).name, variant, r["precision"], f"{r['model_bytes'] / 2**30:.2f} GiB",
                 f"{r['load_s']:.1f} s", f"{r['prefill_tokens_per_s']:.0f}", f"{r['ttft_ms']:.1f} ms"]
        cells += [f"{r['decode_tokens_per_s'][c]:.1f}" for c in contexts]
        cells += [f"{r['roofline_percent'][c]:.0f}%" for c in contexts]
        cells += [f"{r['gpu_memory_mib']} MiB" if r.get("gpu_memory_mib") else "-"]
        ratios = r.get("ours_over_this", {})
        cells += [f"{ratios[c]:.2f}" if c in ratios else "-" for c in contexts]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--bundle", type=Path, action="append", help="a bundle to run (repeatable)")
    source.add_argument("--synthetic-7b", type=Path, metavar="DIR",
                        help="build (once) a 7B-shaped random checkpoint in DIR and export it at each --precision")
    p.add_argument("--layers", type=int, default=32, help="--synthetic-7b: decoder layers (default 32, as 7B)")
    p.add_argument("--precision", nargs="+", default=["int4", "fp16"], help="--synthetic-7b: precisions to export")
    p.add_argument("--profile-recipe", action="store_true",
                   help="--synthetic-7b: export with the profile's own recipe (scale search, GPTQ): slower, same speed")
    p.add_argument("--block-size", type=int, help="--synthetic-7b: int4 block size instead of the profile's (our "
                   "export and onnxruntime-genai's)")
    p.add_argument("--symmetric", type=lambda v: {"true": True, "false": False}[v.lower()], metavar="true|false",
                   help="--synthetic-7b: int4 without (true) or with (false) zero points, instead of the profile's")
    p.add_argument("--workdir", type=Path, help="--synthetic-7b: where the bundles go (default: a temporary folder)")
    p.add_argument("--prepare-only", action="store_true",
                   help="--synthetic-7b with --workdir: build and export, then stop (run later with --bundle)")
    p.add_argument("--profile", default=PROFILE)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--session-config", type=session_config_item, action="append", default=[], metavar="KEY=VALUE",
                   help="an onnxruntime session config entry for our engine, added to the profile's session_config "
                        "(repeatable; e.g. ep.cuda.fpa_intb_gemm=1: onnxruntime's TensorRT-LLM int4 kernels)")
    p.add_argument("--peers", action="store_true",
                   help="--synthetic-7b: also onnxruntime-genai's CUDA model of the same checkpoint, where installed")
    p.add_argument("--max-context", type=int, default=4096, help="--synthetic-7b: the bundles' context limit")
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024, 2048])
    p.add_argument("--table-contexts", type=int, nargs="+", default=[128, 2048])
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--bandwidth-mib", type=int, default=2048)
    p.add_argument("--bandwidth-runs", type=int, default=10)
    p.add_argument("--out", type=Path, help="write OUT.json and OUT.png")
    return p.parse_args(argv)


def step_args(a, **extra) -> list[str]:
    args = ["--profile", a.profile, "--prefill-tokens", str(a.prefill_tokens), "--decode-tokens", str(a.decode_tokens),
            "--bandwidth-mib", str(a.bandwidth_mib), "--bandwidth-runs", str(a.bandwidth_runs),
            "--contexts", *map(str, a.contexts)]
    for key, value in a.session_config:
        args += ["--session-config", f"{key}={value}"]
    for key, value in extra.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return args


def layout_args(a) -> list[str]:
    """--block-size / --symmetric as given, for a step."""
    return ([] if a.block_size is None else ["--block-size", str(a.block_size)]) + \
        ([] if a.symmetric is None else ["--symmetric", str(a.symmetric).lower()])


def prepare_peers(a, work: Path) -> list[Path]:
    """onnxruntime-genai's CUDA models of the checkpoint (skipped, with the reason, when it cannot run)."""
    missing = genai_missing()
    if missing:
        say(f"{GENAI}: skipped ({missing})")
        return []
    folders = []
    for precision in a.precision:
        folder = work / f"genai-{precision}"
        t0 = time.perf_counter()
        try:
            run_step("prepare-genai", ["--workdir", str(folder), "--synthetic-7b", str(a.synthetic_7b),
                                       "--profile", a.profile,
                                       "--precision", precision, *layout_args(a)])
        except RuntimeError as exc:
            say(f"{GENAI} {precision}: its builder failed: {str(exc)[-1500:]}")
            continue
        say(f"{GENAI} {precision}: built in {time.perf_counter() - t0:.0f} s")
        folders.append(folder)
    return folders


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.step:
        if a.step in ("run", "run-genai"):
            a.bundle = a.bundle[0]
        print(json.dumps(STEPS[a.step](a)))
        return 0
    if a.prepare_only and not (a.synthetic_7b and a.workdir):
        raise SystemExit("--prepare-only needs --synthetic-7b and --workdir")
    for folder in a.bundle or []:
        if not ((folder / "bundle.json").is_file() or (folder / "genai_config.json").is_file()):
            raise SystemExit(f"--bundle {folder} is neither a bundle (bundle.json) nor onnxruntime-genai's model "
                             "(genai_config.json)")
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers() and not a.prepare_only:
        raise SystemExit(f"onnxruntime {ort.__version__} has no {CUDA}: install onnxruntime-gpu on a machine with "
                         "an NVIDIA GPU (README: Install)")
    temporary = None
    if a.synthetic_7b:
        from edge_export.synthetic import build_checkpoint_streamed

        if not (a.synthetic_7b / "config.json").is_file():
            say(f"building a 7B-shaped checkpoint ({a.layers} layers) in {a.synthetic_7b} ...")
            t0 = time.perf_counter()
            build_checkpoint_streamed(a.synthetic_7b, num_layers=a.layers)
            say(f"built in {time.perf_counter() - t0:.0f} s")
        work = a.workdir or Path(tempfile.mkdtemp(prefix="gpu-decode-"))
        temporary = None if a.workdir else work
        work.mkdir(parents=True, exist_ok=True)
        bundles = export_bundles(a.synthetic_7b, work, a.precision, profile=a.profile,
                                 profile_recipe=a.profile_recipe, max_context=a.max_context,
                                 block_size=a.block_size, symmetric=a.symmetric)
        if a.peers:
            bundles += prepare_peers(a, work)
        if a.prepare_only:
            print("\n".join(map(str, bundles)))
            return 0
    elif a.bundle:
        bundles = a.bundle
    else:
        raise SystemExit("give --bundle or --synthetic-7b")
    try:
        bandwidth = run_step("bandwidth", step_args(a))
        say("bandwidth: " + ", ".join(f"{k} {v:.0f}" for k, v in bandwidth.items() if k.endswith("gbps")) + " GB/s")
        rows, failures = [], {}
        for bundle in bundles:
            ours = (bundle / "bundle.json").is_file()
            for variant in a.variants if ours else [GENAI]:
                try:
                    facts = bundle_facts(bundle)
                    row = (run_step("run", step_args(a, bundle=bundle, variant=variant)) if ours
                           else run_step("run-genai", step_args(a, bundle=bundle)))
                except (RuntimeError, OSError, KeyError, ValueError) as exc:
                    failures[f"{bundle.name}/{variant}"] = str(exc)
                    say(f"{bundle.name} {variant} failed: {str(exc)[-1500:]}")
                    continue
                row["decode_tokens_per_s"] = {int(c): v for c, v in row["decode_tokens_per_s"].items()}
                rows.append(add_roofline(row, facts, bandwidth["gbps"]))
                say(f"{bundle.name} {variant}: " + ", ".join(f"{v:.1f} tok/s @{c}"
                                                           for c, v in row["decode_tokens_per_s"].items()))
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    print(f"GPU memory bandwidth (read + written): {bandwidth['gbps']:.0f} GB/s "
          f"({', '.join(f'{k[:-5]} {v:.0f}' for k, v in bandwidth.items() if k.endswith('_gbps'))})")
    print(format_table(add_ratios(rows), [c for c in a.table_contexts if c in a.contexts]))
    for name, why in failures.items():
        print(f"{name}: failed ({why.strip().splitlines()[-1] if why.strip() else 'no message'})")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".json").write_text(json.dumps({"bandwidth": bandwidth, "rows": rows, "failures": failures},
                                                         indent=2))
        for row in rows:
            row["engine"] = f"{Path(row['bundle']).name} {row['variant']}"
        why = plot(rows, a.out.with_suffix(".png"), "decode tokens/s on the GPU, batch 1")
        if why:
            print(why)
    return 1 if failures and not rows else 0


if __name__ == "__main__":
    from edge_runtime.cli import run_script

    sys.exit(run_script(main))
