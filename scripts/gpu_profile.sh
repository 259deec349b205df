#!/usr/bin/env bash
# Sample where the GIL goes while our OpenCL pipeline runs (py-spy carried as a wheel).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .gpu/tools/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p /etc/OpenCL/vendors; echo /usr/local/nvidia/lib64/libnvidia-opencl.so.1 > /etc/OpenCL/vendors/nvidia.icd
OUT=${OUT:-/tmp/prof}; mkdir -p "$OUT"
/tmp/site/bin/py-spy record --gil -r 250 -f raw -o "$OUT/gil.txt" -- python3 -m pipeline.cli bench --frames 1600 --runs 3 \
  --engine opencl --only ours --batch 64 --readers-ours 8 2>&1 | tail -3
/tmp/site/bin/py-spy record --idle -r 250 -f raw -o "$OUT/all.txt" -- python3 -m pipeline.cli bench --frames 1600 --runs 3 \
  --engine opencl --only ours --batch 64 --readers-ours 8 2>&1 | tail -3
python3 scripts/summarise_profile.py "$OUT/gil.txt" | head -40
