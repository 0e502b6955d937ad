"""The store's read and write paths under two (or more) Python environments, side by side in one run.

Each ``--env LABEL=PYTHON [VAR=VALUE ...]`` is an interpreter with diffprobe
installed (say, one venv with the pinned zarr and one with a newer zarr) plus
environment variables for it (zarr's config reads ``ZARR_<SECTION>__<KEY>``, e.g.
``ZARR_CODEC_PIPELINE__PATH=zarr.core.codec_pipeline.FusedCodecPipeline``). Every
round runs, in each environment in turn (the order alternates between rounds, so
drift from other jobs hits every environment alike):

- ``probe_throughput.py``: the streamed probe read path, one cheap linear head on a
  slice 4x its buffer (uncompressed + crc32c, the pool stage's codecs, and zstd +
  bitshuffle, the extract stage's; ``--quick``: the first only): streamed / in-memory
  samples/s;
- ``reader_contention.py``: in-memory training beside a zarr-reading thread and
  process (how much of the read path holds the GIL), and the reads alone in MiB/s;
- ``extract_throughput.py``: the writer's MB/s and extract / bare forward.

The table gives the median over rounds and the range.

    .venv/bin/python benchmarks/zarr_versions.py --rounds 3 \\
        --env "zarr 3.1=.venv/bin/python" --env "zarr 3.4=/path/to/venv-zarr34/bin/python"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE_CASES = {"probe, crc32c only": "linear, C=512 p=4, streamed, uncompressed + crc32c",
               "probe, zstd": "linear, C=512 p=4, streamed"}
#: ``--quick``: the pool stage's codecs only (the case the target is about).
QUICK_CASES = ("probe, crc32c only",)


def run_json(python: str, env: dict, args: list[str]) -> list[dict]:
    """The JSON lines a benchmark script printed (stdout), under ``python`` with ``env`` added."""
    full = os.environ | {"PYTHONPATH": str(ROOT)} | env
    out = subprocess.run([python, *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise SystemExit(f"{args[0]} failed under {python}:\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def measure(python: str, env: dict, n: int, quick: bool = False) -> dict:
    """One round of every measurement in one environment."""
    got = {}
    version = subprocess.run([python, "-c", "import zarr, numcodecs, sys; print(zarr.__version__, "
                              "numcodecs.__version__, sys.version.split()[0])"],
                             capture_output=True, text=True, env=os.environ | env).stdout.split()
    got["versions"] = "zarr {}, numcodecs {}, Python {}".format(*version)
    for name, only in PROBE_CASES.items():
        if quick and name not in QUICK_CASES:
            continue
        (r,) = run_json(python, env, ["benchmarks/probe_throughput.py", "--n", str(n), "--only", only, "--json"])
        got[f"{name}: train ratio"] = r["train_ratio"]
        got[f"{name}: whole-call ratio"] = r["ratio"]
        got[f"{name}: streamed train samples/s"] = r["zarr_train_samples_per_s"]
    (c,) = run_json(python, env, ["benchmarks/reader_contention.py", "--n", str(n), "--repeats", "2", "--json"])
    got["training beside a zarr-reading thread (x alone)"] = c["slowdown"]["beside a zarr-reading thread"]
    got["training beside a zarr-reading process (x alone)"] = c["slowdown"]["beside a zarr-reading process"]
    got["slab reads alone, MiB/s (crc32c only)"] = c["read_mib_per_s"]
    (e,) = run_json(python, env, ["benchmarks/extract_throughput.py", "--images", "256", "--repeats", "2",
                                  "--only-new", "--json"])
    got["extract writer, MB/s raw (zstd + bitshuffle + crc32c)"] = e["writer_mb_per_s"]
    new = next(v for k, v in e["extract"].items() if k.startswith("new defaults ("))
    got["extract / bare forward (new defaults)"] = new["vs_bare_same_threads"]
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", action="append", required=True, help="LABEL=PYTHON [VAR=VALUE ...]")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=8192, help="samples of the probe stores")
    ap.add_argument("--quick", action="store_true", help="the probe case with the pool stage's codecs only")
    args = ap.parse_args()
    envs = []
    for spec in args.env:
        label, _, rest = spec.partition("=")
        python, *assignments = rest.split()
        envs.append((label, python, dict(a.split("=", 1) for a in assignments)))
    results: dict[str, list[dict]] = {label: [] for label, _, _ in envs}
    loads = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for label, python, env in (envs if r % 2 == 0 else envs[::-1]):
            start = time.perf_counter()
            results[label].append(measure(python, env, args.n, args.quick))
            loads.append(os.getloadavg()[0])
            print(f"round {r + 1}, {label}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    labels = [label for label, _, _ in envs]
    print(f"{os.cpu_count()} CPUs; 1-min load average {min(loads):.1f}-{max(loads):.1f} during the run; "
          f"{args.rounds} rounds, median [min-max]")
    print("| measurement | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    print("| versions | " + " | ".join(results[label][0]["versions"] for label in labels) + " |")
    for key in results[labels[0]][0]:
        if key == "versions":
            continue
        cells = []
        for label in labels:
            values = [round_[key] for round_ in results[label]]
            digits = 2 if max(values) < 20 else 0
            cells.append(f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]")
        print(f"| {key} | " + " | ".join(cells) + " |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
