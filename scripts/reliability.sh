#!/usr/bin/env bash
# The long reliability run (issue #7): 20 SIGKILLs of the real daemon, 10 000
# hostile payloads, then a 30-minute soak. Figures go to docs/reliability/
# (JSON per test, soak.json + soak.svg); docs/reliability.md quotes them.
#
#   bash scripts/reliability.sh            # everything (about 50 minutes on 2 cores)
#   SOAK_MINUTES=5 bash scripts/reliability.sh
#
# The quick part of the suite runs in CI with `python3 -m pytest` (tests marked
# `long` are skipped there).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-docs/reliability}"
mkdir -p "$OUT"
export EDGE_RELIABILITY_FIGURES="$OUT"
python3 -m pytest tests/reliability -p no:cacheprovider -q            # the quick tests, figures recorded
python3 -m pytest tests/reliability -m long -p no:cacheprovider -q    # 20 kills, 10 000 payloads
python3 scripts/reliability_soak.py --minutes "${SOAK_MINUTES:-30}" --out "$OUT"
echo "figures in $OUT/"
