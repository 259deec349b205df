#!/usr/bin/env bash
# Installs everything the tests need (PoCL, .venv with the test extras), then runs them all:
# the OpenCL kernels run for real on PoCL, the Tango tests start real device servers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,gui,sardana
.venv/bin/ruff check .
# The Taurus panel test runs in a pytest process of its own: Qt and Taurus leave threads behind, and a
# device server forked after them (DeviceTestContext) can deadlock.  Exit code 5 = nothing selected.
.venv/bin/python -m pytest -q -m "not gui" "$@"
.venv/bin/python -m pytest -q -m gui "$@" || [ $? -eq 5 ]
