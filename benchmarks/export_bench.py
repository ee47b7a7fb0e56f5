"""Export benchmark: wall time, peak resident memory and bundle size per precision.

    python benchmarks/export_bench.py                          # the demo model, int4 / int8 / fp32
    python benchmarks/export_bench.py --checkpoint DIR --precision int4 --skip-fidelity
    python benchmarks/export_bench.py --synthetic-7b /tmp/7b --precision int4 --skip-fidelity --algorithm rtn

``--synthetic-7b DIR`` builds a Code Llama 7B-shaped checkpoint there first (random fp16
weights, 13 GB, written shard by shard; kept and reused by later runs) and exports it.

Each export runs `edge-runtime export` in its own process, so its peak memory is
measured alone (getrusage of the finished child). Prints a table and, with
--json FILE, writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_export(checkpoint: Path, precision: str, profile: str, out: Path, skip_fidelity: bool,
               extra: list[str]) -> dict:
    # a wrapper process per export, so that RUSAGE_CHILDREN is this export's peak alone
    wrapper = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
               "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
    cmd = [sys.executable, "-c", wrapper, sys.executable, "-m", "edge_runtime", "export", "--checkpoint", str(checkpoint), "--profile", profile,
           "--precision", precision, "--output", str(out), "--allow-degraded"]
    if skip_fidelity:
        cmd.append("--skip-fidelity")
    cmd += extra
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = proc.communicate()
    seconds = time.perf_counter() - start
    peak_kib = int(output.rsplit("PEAK_RSS_KIB", 1)[-1].split()[0]) if "PEAK_RSS_KIB" in output else 0
    if proc.returncode != 0:
        raise SystemExit(f"export failed ({precision}):\n{output}")
    manifest = json.loads((out / "bundle.json").read_text())
    fid = manifest["fidelity"]
    return {"precision": precision, "seconds": round(seconds, 1), "peak_rss_mib": round(peak_kib / 1024),
            "bundle_mib": round(sum(f["size"] for f in manifest["files"]) / 2**20, 1),
            "greedy_agreement": None if fid.get("skipped") else round(fid["greedy_agreement"], 3),
            "greedy_agreement_strict": fid.get("greedy_agreement_strict") and round(fid["greedy_agreement_strict"], 3),
            "max_logit_diff": None if fid.get("skipped") else round(fid["max_logit_diff"], 4),
            "kl_divergence_mean": fid.get("kl_divergence_mean") and round(fid["kl_divergence_mean"], 6),
            "corpus_top1_agreement": fid.get("corpus_top1_agreement") and round(fid["corpus_top1_agreement"], 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="default: the demo model (trained and cached on first use)")
    source.add_argument("--synthetic-7b", metavar="DIR",
                        help="build (once) a Code Llama 7B-shaped checkpoint with random fp16 weights in DIR "
                             "(13 GB) and export it")
    parser.add_argument("--precision", action="append", help="repeatable; default int4, int8, fp32")
    parser.add_argument("--profile", default="cpu-x86_64")
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--algorithm", choices=["rtn", "gptq", "hqq"], help="passed to export (default: the profile's)")
    parser.add_argument("--graph", choices=["auto", "fused", "optimum"], help="passed to export (default auto)")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
    elif args.synthetic_7b:
        from edge_export.synthetic import build_checkpoint_streamed

        checkpoint = Path(args.synthetic_7b)
        if not (checkpoint / "config.json").is_file():
            print(f"building a 7B-shaped checkpoint in {checkpoint} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            build_checkpoint_streamed(checkpoint)
            print(f"built in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    else:
        from edge_export.demo_model import ensure_demo_model

        checkpoint = ensure_demo_model()
    work = Path(tempfile.mkdtemp(prefix="export-bench-"))
    extra = [*(["--algorithm", args.algorithm] if args.algorithm else []),
             *(["--graph", args.graph] if args.graph else [])]
    rows = []
    try:
        for precision in args.precision or ["int4", "int8", "fp32"]:
            rows.append(run_export(checkpoint, precision, args.profile, work / precision, args.skip_fidelity, extra))
            print(f"{precision}: done", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"checkpoint {checkpoint} ({sum(p.stat().st_size for p in checkpoint.glob('*.safetensors')) / 2**20:.1f} MiB"
          f" of safetensors), profile {args.profile}")
    print(f"{'precision':<10}{'time s':>8}{'peak RSS MiB':>14}{'bundle MiB':>12}{'greedy agr.':>13}{'(strict)':>10}"
          f"{'max logit d':>13}"
          f"{'KL div.':>10}{'top-1':>8}")
    for r in rows:
        print(f"{r['precision']:<10}{r['seconds']:>8}{r['peak_rss_mib']:>14}{r['bundle_mib']:>12}"
              f"{str(r['greedy_agreement']):>13}{str(r['greedy_agreement_strict']):>10}{str(r['max_logit_diff']):>13}"
              f"{str(r['kl_divergence_mean']):>10}{str(r['corpus_top1_agreement']):>8}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    from edge_runtime.cli import run_script

    sys.exit(run_script(main))
