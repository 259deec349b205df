#!/usr/bin/env bash
# Runs on the lent GPU machine (see docs/PERFORMANCE.md): install carried wheels, register
# NVIDIA's OpenCL driver, check the kernels against fabio/pyFAI on the GPU, then benchmark.
# Usage: bash scripts/gpu_run.sh [quick|full]
set -uo pipefail
mode=${1:-quick}
if [ "$mode" = soak-wait ]; then  # the soak started by "soak" runs on; wait for its report
  while [ ! -s /tmp/soak/report.json ] && pgrep -f "pipeline.cli soak" >/dev/null; do sleep 5; done
  tail -5 /tmp/soak/soak.log; mkdir -p "${OUT:-/tmp/xrdct-gpu-out}"; cp /tmp/soak/report.json /tmp/soak/soak.log "${OUT:-/tmp/xrdct-gpu-out}/" 2>/dev/null
  exit 0
fi
OUT=${OUT:-/tmp/xrdct-gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XRDCT_REAL_DATA=$PWD/.gpu/real
mkdir -p /etc/OpenCL/vendors
echo /usr/local/nvidia/lib64/libnvidia-opencl.so.1 > /etc/OpenCL/vendors/nvidia.icd
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc; free -g | head -2; df -h /dev/shm | tail -1
python3 -c "import pyopencl as cl; print([(p.name, [d.name for d in p.get_devices()]) for p in cl.get_platforms()])"
if [ "$mode" = soak ]; then  # 10 minutes of full frames at 250 fps, in the background (see soak-wait)
  mkdir -p /tmp/soak; rm -f /tmp/soak/report.json
  setsid nohup python3 -m pipeline.cli soak --minutes 10 --rate 250 --detector pilatus2m --engine opencl \
    --live-tomogram 3 --workdir /dev/shm/soak --json /tmp/soak/report.json > /tmp/soak/soak.log 2>&1 < /dev/null &
  sleep "${SOAK_WATCH:-540}"; tail -3 /tmp/soak/soak.log; exit 0
fi
[ "$mode" = micro ] || python3 -m pytest -q -p no:cacheprovider -x tests/test_opencl.py tests/test_cbf_decode.py 2>&1 | tail -4 | tee "$OUT/tests.log"
if [ "$mode" = micro ]; then :
elif [ "$mode" = tune ]; then
  for si in 0; do
    python3 -m pipeline.cli bench --frames ${FRAMES:-6000} --runs 3 --engine opencl --only ours --switch-interval $si \
      --batch ${BATCHES:-64 128} --readers-ours ${READERS:-8 12 16} --json "$OUT/tune_$si.json" 2>&1 | tail -9 | tee -a "$OUT/tune.log"
  done
  python3 scripts/host_ceiling.py --frames 1600 --readers 4 8 --batch 64 2>&1 | tail -3 | tee -a "$OUT/tune.log"
  python3 - "$OUT" <<'PY'
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/tune_*.json")):
    for k, v in json.load(open(f))["results"].items():
        print(f.split("/")[-1], k, round(v.get("fps", 0)), {a: round(b, 3) for a, b in v.get("busy_ms_per_frame", {}).items()},
              {a: round(b, 3) for a, b in v.get("engine_ms_per_frame", {}).items()})
PY
elif [ "$mode" = quick ]; then
  python3 -m pipeline.cli bench --frames 800 --ref-frames 120 --runs 3 --engine all --readers 4 \
    --batch 32 --readers-ours 8 --profile --json "$OUT/bench_quick.json" 2>&1 | tee "$OUT/bench_quick.log"
else
  python3 -m pipeline.cli bench --frames ${FRAMES:-6000} --ref-frames 200 --runs 5 --engine all --readers 2 4 8 \
    --batch 32 64 16 --readers-ours 8 4 12 --profile --live-tomogram --json "$OUT/bench_full.json" 2>&1 | tee "$OUT/bench_full.log"
fi
if [ "$mode" = micro ]; then python3 scripts/micro_host.py 2>&1 | tee "$OUT/micro.log"; fi
