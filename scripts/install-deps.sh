#!/usr/bin/env bash
# Install what this project needs on a fresh Debian/Ubuntu machine (idempotent):
# Mosquitto and its clients, systemd-analyze and openssl (tests and the quickstart),
# PyTorch 2.13.0 (CPU) first, then this package with its export, cpu and test extras.
#
# The Python packages go where pip may put them: the active virtual environment; else
# the interpreter's own site-packages; else, where the system Python refuses pip
# (Debian 12, Ubuntu 23.04 and later: PEP 668's EXTERNALLY-MANAGED), a virtual
# environment in .venv (activate it: `. .venv/bin/activate`). The last line this
# script prints names the Python it installed into.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
PY=${PYTHON:-python3}
VENV=.venv

# what kind of Python this is: "venv", "managed" (the system's, PEP 668), or "plain"
kind=$($PY - <<'PY'
import os, sys, sysconfig
if sys.prefix != sys.base_prefix:
    print("venv")
elif os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")):
    print("managed")
else:
    print("plain")
PY
)
if [ "$kind" = managed ] && [ -x "$VENV/bin/python" ]; then
    PY=$VENV/bin/python; kind=venv  # made by an earlier run
fi

missing=()
{ command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; } || missing+=(mosquitto)
command -v mosquitto_pub >/dev/null || missing+=(mosquitto-clients)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v openssl >/dev/null || missing+=(openssl)
if [ "$kind" = managed ]; then
    $PY -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
elif ! $PY -m pip --version >/dev/null 2>&1; then
    missing+=(python3-pip)
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ "$kind" = managed ]; then
    echo "$PY is the system's Python, which refuses pip (PEP 668): installing into a virtual environment, $VENV"
    $PY -m venv "$VENV"
    PY=$VENV/bin/python
fi

# torch first, at the version this project pins: any other version pulls gigabytes of CUDA packages.
$PY -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null \
    || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e '.[export,cpu,test]'
echo "installed into $($PY -c 'import sys; print(sys.executable)')"
