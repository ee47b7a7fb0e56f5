#!/usr/bin/env bash
# Install what this project needs on a fresh Debian/Ubuntu machine (idempotent):
# Mosquitto and its clients, systemd-analyze and openssl (tests and the quickstart),
# PyTorch 2.13.0 (CPU) first, then this package with its export, cpu and test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

missing=()
{ command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; } || missing+=(mosquitto)
command -v mosquitto_pub >/dev/null || missing+=(mosquitto-clients)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v openssl >/dev/null || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
# torch first, at the version this project pins: any other version pulls gigabytes of CUDA packages.
$PY -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null \
    || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e '.[export,cpu,test]'
