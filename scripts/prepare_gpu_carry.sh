#!/usr/bin/env bash
# Prepares what a run on the lent GPU machine carries (it cannot install from the network):
# .whl/ with the wheels for its Python 3.12, and .gpu/ with real Pilatus files and py-spy.
# Both folders are git-ignored (add "/.whl/" and "/.gpu/" to .git/info/exclude). Then, with the device
# tool: run(command="bash scripts/gpu_run.sh quick|tune|full", carry=[".whl", ".gpu"]).
set -euo pipefail
cd "$(dirname "$0")/.."
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64
  --platform manylinux1_x86_64"
mkdir -p .whl .gpu/tools
for pkg in pyopencl pyfai fabio silx pytools platformdirs siphash24 mako numexpr pydantic pydantic-core \
           annotated-types typing-inspection; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $platforms -d .whl "$pkg"
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $platforms -d .gpu/tools py-spy
real=../shared/data/real
for f in ndtomo/CeO2.cbf ndtomo/CeO2.poni ndtomo/mask.edf cbf-ctypes/agbeh_long.cbf giscan/example.cbf \
         dials-data-files/l-cyst_01_00001.cbf CROSSCHECK.txt; do
  mkdir -p ".gpu/real/$(dirname "$f")"
  cp "$real/$f" ".gpu/real/$f"
done
du -sh .whl .gpu
