#!/usr/bin/env bash
# Download, into .whl/ (ignored by git), the wheels benchmarks/gpu/run.sh installs on a GPU
# machine that lacks them and has no package index: the versions this project pins, for
# CPython 3.12 on x86-64 Linux. Carry .whl with the run (about 20 MB).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-common-dir)/info/exclude"
PY="${PYTHON:-python3}"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d .whl diffusers==0.42.1 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 \
  dask==2026.8.0 distributed==2026.8.0 partd==1.4.2 locket==1.0.0 zict==3.0.0 tblib==3.2.2 \
  xarray==2026.9.0 pytest-timeout==2.4.0 tornado==6.6.1 importlib_metadata==10.2.0
ls -la .whl
