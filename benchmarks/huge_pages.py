"""Do the weights in transparent huge pages decode faster? One process, one bundle.

    python benchmarks/huge_pages.py --bundle B               # 4 blocks of 48 steps before, 4 after
    python benchmarks/huge_pages.py --bundle B --control     # the same without the collapse

Where transparent huge pages are `madvise` (Debian's and Ubuntu's default), the weights
onnxruntime prepacks at load sit in 4 KiB pages. This times ``--blocks`` blocks of
``--steps`` decode steps at ``--context`` tokens (the engine's decoder, greedy), then asks the
kernel to move every anonymous writable mapping of 8 MiB or more into huge pages
(``madvise(MADV_HUGEPAGE)`` and ``madvise(MADV_COLLAPSE)``, Linux 6.1+), and times the same
blocks again: each block's median step as tokens/s, and after/before of their medians.
``--control`` skips the collapse, which measures how much the same process drifts between the
two halves. Both in one process, so the comparison does not depend on two processes' luck
with this machine's neighbours. ``--json FILE`` writes the result.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # peers, beside this file

MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
HUGE_PAGE = 2 << 20
MIN_MAPPING = 8 << 20


def anon_huge_mib() -> int:
    """The process's anonymous memory in huge pages (smaps_rollup's AnonHugePages), MiB."""
    found = re.search(r"AnonHugePages:\s+(\d+) kB", Path("/proc/self/smaps_rollup").read_text())
    return int(found.group(1)) >> 10 if found else 0


def collapse_large_mappings() -> int:
    """madvise every anonymous writable mapping of MIN_MAPPING or more into huge pages; the MiB
    the kernel collapsed (0 where it refuses: THP `never`, a kernel before 6.1)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    collapsed = 0
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if len(fields) != 5 or hi - lo < MIN_MAPPING or not fields[1].startswith("rw"):
            continue  # a file or a named region ([heap], [stack]), small, or read-only
        start, end = (lo + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1), hi & ~(HUGE_PAGE - 1)
        if end > start:
            libc.madvise(start, end - start, MADV_HUGEPAGE)
            if libc.madvise(start, end - start, MADV_COLLAPSE) == 0:
                collapsed += end - start
    return collapsed >> 20


def decode_block(decoder, vocab: int, context: int, steps: int) -> float:
    """`steps` decode steps at `context` tokens, timed as benchmarks/peers.py times ours: 1 / their
    median."""
    from peers import decode_at

    return 1.0 / statistics.median(decode_at(decoder, vocab, context, steps))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--profile", default="cpu-x86_64")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=48, help="decode steps a block")
    p.add_argument("--blocks", type=int, default=4, help="blocks before and after")
    p.add_argument("--control", action="store_true", help="do not collapse: the drift between the halves")
    p.add_argument("--json", type=Path, help="write the result to this file")
    args = p.parse_args(argv)

    from edge_runtime.engine import Engine
    from edge_runtime.profiles import load_profile

    profile = dataclasses.replace(load_profile(args.profile), intra_op_threads=args.threads)
    engine = Engine.from_bundle(args.bundle, profile=profile)
    decoder, vocab = engine.decoder, engine.bundle.architecture.vocab_size
    decode_block(decoder, vocab, args.context, args.steps)  # warm-up
    before = [decode_block(decoder, vocab, args.context, args.steps) for _ in range(args.blocks)]
    huge_before = anon_huge_mib()
    collapsed = 0 if args.control else collapse_large_mappings()
    after = [decode_block(decoder, vocab, args.context, args.steps) for _ in range(args.blocks)]
    result = {"mode": "control" if args.control else "collapse", "collapsed_mib": collapsed,
              "anon_huge_mib_before": huge_before, "anon_huge_mib_after": anon_huge_mib(),
              "before_tokens_per_s": before, "after_tokens_per_s": after,
              "after_over_before": statistics.median(after) / statistics.median(before)}
    print(f"{result['mode']}: {collapsed} MiB collapsed, huge pages {huge_before} -> "
          f"{result['anon_huge_mib_after']} MiB; decode @{args.context} before "
          f"{[round(x, 1) for x in before]}, after {[round(x, 1) for x in after]} tokens/s; "
          f"after / before {result['after_over_before']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    from edge_runtime.cli import run_script

    sys.exit(run_script(main))
