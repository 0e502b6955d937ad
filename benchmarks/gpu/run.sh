#!/usr/bin/env bash
# The GPU check in one call (see benchmarks/gpu/check.py for what it measures).
#
#   benchmarks/gpu/run.sh [--cpu-smoke] [--budget SECONDS]
#
# Writes $OUT/gpu-check.json, $OUT/gpu-check.md and the gpu tests' log ($OUT defaults to
# ./gpu-out). Installs nothing the machine already has: it imports each package the
# check needs and installs only the missing ones, offline, from wheels in .whl/ (made
# beforehand by benchmarks/gpu/fetch_wheels.sh on a machine with an index) into
# /tmp/diffprobe-site. Ends within ~8 minutes on one H100/H200 (rows past the budget are
# skipped and say so).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
start=$(date +%s)

missing=$("$PY" - <<'PY'
import importlib.util
need = {"diffusers": "diffusers", "zarr": "zarr", "numcodecs": "numcodecs", "donfig": "donfig",
        "google_crc32c": "google_crc32c", "xarray": "xarray", "dask": "dask", "distributed": "distributed",
        "transformers": "transformers", "yaml": "PyYAML", "click": "click", "tqdm": "tqdm",
        "safetensors": "safetensors", "pytest": "pytest", "pytest_timeout": "pytest_timeout",
        "hypothesis": "hypothesis"}
from importlib.metadata import PackageNotFoundError, version

#: pins the project's code relies on (setup.cfg); an older copy on the machine counts as missing
minimum = {"xarray": (2026, 9), "zarr": (3, 1), "diffusers": (0, 42)}


def too_old(pkg):
    try:
        have = tuple(int(x) for x in version(pkg).split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    return pkg in minimum and have < minimum[pkg]


print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None or too_old(pkg)))
PY
)
if [ -n "$missing" ]; then
  echo "missing: $missing"
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "error: $missing not installed and no wheels in .whl/ (run benchmarks/gpu/fetch_wheels.sh where pip has an index, then carry .whl)" >&2
    exit 2
  fi
  wheels=()
  for pkg in $missing; do
    norm=$(echo "$pkg" | tr '-' '_')
    for w in .whl/"$norm"-*.whl .whl/"${norm,,}"-*.whl; do [ -e "$w" ] && wheels+=("$w"); done
  done
  # dependencies that come only with the missing ones (dask/distributed/zarr's own)
  for dep in partd locket zict tblib tornado toolz cloudpickle sortedcontainers msgpack importlib_metadata; do
    "$PY" -c "import $dep" 2>/dev/null || for w in .whl/"$dep"-*.whl; do [ -e "$w" ] && wheels+=("$w"); done
  done
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/diffprobe-site "${wheels[@]}"
  export PYTHONPATH="$PYTHONPATH:/tmp/diffprobe-site"
fi
echo "setup: $(( $(date +%s) - start )) s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
uptime
"$PY" benchmarks/gpu/check.py --out "$OUT" "$@"
echo "total: $(( $(date +%s) - start )) s"
