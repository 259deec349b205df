#!/usr/bin/env bash
# Installs everything the tests need (PoCL, .venv with the test extras), then runs them all:
# the OpenCL kernels run for real on PoCL, the Tango tests start real device servers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,gui,sardana
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
