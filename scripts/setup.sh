#!/usr/bin/env bash
# Set-up on a fresh Debian machine (Python 3.11+): the OpenCL CPU runtime (PoCL), a virtual
# environment in .venv and the project with the extras named as argument (e.g. "test").
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
if command -v apt-get >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  # PoCL runs the OpenCL kernels on the CPU; the Qt libraries let the Taurus panel run (offscreen in tests)
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq pocl-opencl-icd ocl-icd-libopencl1 python3-venv \
    libgl1 libegl1 libxkbcommon0 libfontconfig1 libdbus-1-3 \
    >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
echo "set-up done: $(.venv/bin/xrdct --version)"
