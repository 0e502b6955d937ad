"""Every stage at N = 1k, 10k, 100k (1M as an option): time and peak memory per sample, files per store.

    .venv/bin/python benchmarks/scale.py --sizes 1000,10000,100000 --work /tmp/dp-scale [--classify-max 10000]

For each N the script writes a synthetic image folder (16x16 grayscale PNGs in 10
class folders: smooth random blobs, so decode and the codec see image-like data) and
one workflow on the shipped digits model (``data/models/digits-ddpm``: 2 blocks x 2
timesteps, pooled to 1 and 2, one linear head, CKA within the pooled store, the
Diffusion Classifier with 2 trials), then times, as a user would:

listing   opening the imagefolder reader (the directory scan), in a child process
extract   ``diffprobe run --only extract`` (model load, extract, finalize)
inspect   ``diffprobe inspect`` on the extraction store
plan      ``diffprobe plan`` (the whole workflow; extract's plan times real batches, a
          warm-up then the median of up to five, and each later stage a small sample)
pool / probe / cka / classify / report   ``diffprobe run --only <stage>``
score     ``diffprobe score`` on the classify store

Every command is a child process, and each ``--only`` stage is a run of its own, so it
decides on its own where its tasks run: a dask stage whose work is small (one task, or
tasks reading at most ``cluster.in_process_mib``, 256 MiB, in all) runs them inside the
child, one with more starts the workflow's ``LocalCluster`` (2 workers x 1 thread,
4 GiB each) and its row includes that start-up (in one whole ``diffprobe run`` the dask
stages would share a single cluster). At N = 1,000, pool and cka stay in-process and
probe (4 tasks) starts a cluster; the child's lines in ``<work>/n<N>/log.txt`` say
which. Extract and classify always compute in the child. Peak memory is the child's
``ru_maxrss`` from ``os.wait4``: the largest single process among the child and its
reaped children (the dask workers), not their sum. Per-sample figures divide by N
(classify and score by the classified images, at most ``--classify-max``, default
2,000: at 20 forwards per image a 100k classify is ~1.5 CPU-hours here). Defaults:
``--sizes 1000,10000,100000``, ``--work /tmp/dp-scale``; ``--skip`` leaves stages out.
The table goes to ``<work>/scale.md`` and ``scale.json`` (rewritten after each N);
``uptime`` is recorded at the start and after each N (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DIGITS = ROOT / "data" / "models" / "digits-ddpm"
STAGES = ["listing", "extract", "inspect", "plan", "pool", "probe", "cka", "classify", "score", "report"]


def write_images(root: Path, n: int, seed: int = 0) -> float:
    """``root/<digit>/<i>.png``, 16x16 grayscale; returns seconds (skipped if already there)."""
    import numpy as np
    from PIL import Image

    marker = root / f".complete-{n}"
    if marker.exists():
        return 0.0
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
    # a few hundred distinct small blobs, tiled to N images: PNG encoding is the cost
    bases = [Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)).resize((16, 16), Image.BILINEAR)
             for _ in range(512)]
    for i in range(n):
        bases[i % len(bases)].save(root / str(i % 10) / f"{i:07d}.png")
    marker.touch()
    return time.perf_counter() - start


WORKFLOW = """\
name: scale
output_dir: out
cluster: {{kind: local, n_workers: 2, threads_per_worker: 1, memory_limit: 4GiB}}
stages:
  - name: extract
    stage: extract
    model: {{path: {model}, null_class: 10}}
    dataset: {{reader: imagefolder, root: {images}, split: all}}
    blocks: [down_blocks.1, mid_block]
    timesteps: [10, 100]
    conditioning: null
    batch_size: 256
  - {{name: pool, stage: pool, input: extract, sizes: [1, 2]}}
  - name: probe
    stage: probe
    input: pool
    test_fraction: 0.2
    heads: [{{name: linear, head: {{kind: linear}}}}]
    train: {{optimizer: adamw, lr: 0.001, epochs: 2}}
  - name: cka
    stage: cka
    selections: [{{input: pool, pool: 2}}]
  - name: classify
    stage: classify
    model: {{path: {model}, null_class: 10}}
    dataset: {{reader: imagefolder, root: {images}, split: all, limit: {classify_n}}}
    n_timesteps: 2
    batch_size: 256
  - name: report
    stage: report
    inputs: [extract, probe, cka, classify]
"""


def run_child(cmd: list[str], cwd: Path, log) -> tuple[float, float, int]:
    """(seconds, peak RSS MiB of the child and its reaped children, return code)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                            env=os.environ | {"PYTHONPATH": str(ROOT)})
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss / 1024, proc.returncode


def file_count(path: Path) -> int:
    return sum(1 for f in path.rglob("*") if f.is_file()) if path.exists() else 0


LISTING = """\
import sys, time
from pipeline.datasets import DatasetConfig, open_dataset
start = time.perf_counter()
reader = open_dataset(DatasetConfig(reader="imagefolder", root=sys.argv[1], split="all"))
print(time.perf_counter() - start, len(reader))
"""


def listing(images: Path, folder: Path) -> tuple[float, float]:
    """(seconds of the directory scan, peak RSS MiB of its process).

    In a child of its own: a listing in this process would leave its records' pages in
    this process, and every later child's ``ru_maxrss`` (which Linux carries over the
    fork before ``exec``) would then report this process's size instead of its own.
    """
    out = folder / "listing.txt"
    with open(out, "w") as log:
        _, peak, rc = run_child([sys.executable, "-c", LISTING, str(images)], folder, log)
    if rc:
        raise SystemExit(f"listing failed (exit {rc}); see {out}")
    return float(out.read_text().split()[0]), peak


def measure(n: int, work: Path, classify_max: int, skip: set[str]) -> dict:
    folder = work / f"n{n}"
    images = work / f"images-{n}"
    folder.mkdir(parents=True, exist_ok=True)
    gen_s = write_images(images, n)
    classify_n = min(n, classify_max)
    wf = folder / "wf.yaml"
    wf.write_text(WORKFLOW.format(model=DIGITS, images=images, classify_n=classify_n))
    diffprobe = [sys.executable, "-m", "pipeline.cli"]
    out = folder / "out"
    rows = {}
    with open(folder / "log.txt", "a") as log:
        for stage in STAGES:
            if stage in skip:
                rows[stage] = {"note": "skipped (--skip)"}
                continue
            log.write(f"\n==== {stage} ====\n")
            log.flush()
            if stage == "listing":
                seconds, peak = listing(images, folder)
                rows[stage] = {"seconds": seconds, "peak_mib": peak, "per": n, "note": "child process peak RSS"}
                continue
            cmd = {"inspect": diffprobe + ["inspect", str(out / "extract.zarr")],
                   "plan": diffprobe + ["plan", str(wf)],
                   "score": diffprobe + ["score", str(out / "classify.zarr")]}.get(
                stage, diffprobe + ["run", str(wf), "--only", stage, "--no-progress"])
            seconds, peak, rc = run_child(cmd, folder, log)
            per = classify_n if stage in ("classify", "score") else n
            rows[stage] = {"seconds": seconds, "peak_mib": peak, "per": per,
                           "note": "" if rc == 0 else f"failed (exit {rc}, see {folder / 'log.txt'})"}
    files = {name: file_count(out / f"{name}{suffix}") for name, suffix in
             (("extract", ".zarr"), ("pool", ".zarr"), ("probe", ".probe"), ("cka", ".cka"),
              ("classify", ".zarr"))}
    return {"n": n, "image_seconds": gen_s, "classify_n": classify_n, "stages": rows, "files": files}


def markdown(results: list[dict], loads: list[str]) -> str:
    sizes = [r["n"] for r in results]
    head = "| stage | " + " | ".join(f"N={n:,}: ms/sample | peak MiB" for n in sizes) + " |"
    lines = [f"load: {loads[0]} (start) / {loads[-1]} (end)", "", head,
             "|---|" + "---|---|" * len(sizes)]
    for stage in STAGES:
        cells = []
        for r in results:
            row = r["stages"].get(stage, {})
            if "seconds" not in row:
                cells += ["—", row.get("note", "")]
                continue
            mark = " (failed)" if row.get("note", "").startswith("failed") else ""
            cells += [f"{1e3 * row['seconds'] / row['per']:.3g}{mark}", f"{row['peak_mib']:.0f}"]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += ["", "| store | " + " | ".join(f"files at N={n:,}" for n in sizes) + " |",
              "|---|" + "---|" * len(sizes)]
    for name in results[0]["files"]:
        lines.append(f"| {name} | " + " | ".join(str(r["files"][name]) for r in results) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000", help="comma-separated N (1000000: ~1.5 h on 2 cores "
                    "and ~14 GB of images and stores)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dp-scale"))
    ap.add_argument("--classify-max", type=int, default=2000)
    ap.add_argument("--skip", default="", help="comma-separated stages to leave out")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    loads = [subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        results.append(measure(n, args.work, args.classify_max, set(filter(None, args.skip.split(",")))))
        (args.work / "scale.json").write_text(json.dumps(results, indent=1))
        loads.append(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
        (args.work / "scale.md").write_text(markdown(results, loads))
        print(markdown(results, loads), flush=True)
    print(f"self peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
