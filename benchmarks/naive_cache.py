"""diffprobe's store against a naive cache: one whole float16 array per block holding every timestep.

    .venv/bin/python benchmarks/naive_cache.py [--samples 10000] [--chunk-kib 2048,256,64]

The naive caches are what thingsvision-style tools write: one ``.npy`` per block
``(N, T, C, H, W)`` float16 (read memory-mapped), and one HDF5 file with a contiguous
dataset per block (``h5py``, ``pip install 'diffprobe[bench]'``). The same data (the
digits model's three demo blocks' shapes, 5 timesteps, random float16 values) goes into
diffprobe stores whose inner chunks target each ``--chunk-kib`` (``make_layout``'s
``chunk_bytes``; the shards, one per unit, stay the same). Per layout:

- bytes on disk;
- read A: one (block, timestep) slice of all samples (what a probe or CKA reads);
- read B: every block and timestep of 100 random samples (what a look at a few images reads);
  the row ``diffprobe read_samples`` reads the first diffprobe store (the default chunks) with
  ``pipeline.store.samples.read_samples``, one call per block, each opening the store afresh
  (metadata, ``done``, coordinates and shard indexes read in every call); its read A is
  ``read_samples`` of every sample at one timestep;
- read amplification = bytes read from files / bytes returned: counted from the process's
  ``rchar`` (``/proc/self/io``) for diffprobe and HDF5, and for memory-mapped ``.npy`` as
  the 4 KiB pages the request touches;
- a streaming pass: ``ZarrSource`` over one (block, timestep) slice in shuffled blocks,
  as the probe reads when the slice does not fit its buffer (samples/s).

Times are warm (files in the page cache), best of ``--repeats``; ``uptime`` is printed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BLOCKS = {"down_blocks.1": (64, 4, 4), "mid_block": (64, 4, 4), "up_blocks.0": (64, 8, 8)}
TIMESTEPS = (10, 50, 100, 200, 400)
PAGE = 4096


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def best(fn, repeats: int) -> tuple[float, int, object]:
    """(best seconds, bytes read by read() calls in the last run, result)."""
    times = []
    for _ in range(repeats):
        before = rchar()
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        read = rchar() - before
    return min(times), read, out


def npy_pages(shape: tuple[int, ...], index) -> int:
    """Bytes of the 4 KiB pages a memory-mapped read of ``index`` touches (header ignored)."""
    strides = np.cumprod((shape[1:] + (1,))[::-1])[::-1] * 2
    offsets = set()
    sel_samples, sel_t = index
    row = int(np.prod(shape[2:])) * 2
    for s in sel_samples:
        for t in sel_t:
            start = s * strides[0] + t * strides[1]
            offsets.update(range(start // PAGE, (start + row - 1) // PAGE + 1))
    return len(offsets) * PAGE


def build(folder: Path, n: int, chunk_kib: list[int]) -> dict:
    import h5py

    from pipeline import store

    rng = np.random.default_rng(0)
    data = {b: rng.standard_normal((n, len(TIMESTEPS), *s), dtype=np.float32).astype(np.float16)
            for b, s in BLOCKS.items()}
    paths = {}
    for b, arr in data.items():
        np.save(folder / f"{b}.npy", arr)
    paths["npy"] = folder
    with h5py.File(folder / "cache.h5", "w") as f:
        for b, arr in data.items():
            f.create_dataset(b, data=arr)
    paths["hdf5"] = folder / "cache.h5"
    samples = store.SampleTable([f"img{i}" for i in range(n)], [0] * n, [False] * n, list(rng.integers(0, 10, n)))
    for kib in chunk_kib:
        lay = store.make_layout(n, BLOCKS, TIMESTEPS, "float16", chunk_bytes=kib << 10)
        path = folder / f"dp-{kib}k.zarr"
        store.create_store(path, lay, samples, [str(c) for c in range(10)], {"stage_hash": "naive"})
        root = store.open_root(path, "r+")
        for u in range(lay.n_units):
            a, z = lay.unit_range(u)
            store.write_unit(root, lay, u, {b: arr[a:z] for b, arr in data.items()})
        store.finalize(path)
        paths[f"diffprobe {kib} KiB chunks"] = path
        if kib == chunk_kib[0]:
            paths["read_samples"] = path  # the default chunks' store, right after its own row
    return paths


def disk_bytes(path: Path, kind: str) -> int:
    if kind == "npy":
        return sum((path / f"{b}.npy").stat().st_size for b in BLOCKS)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def stream_rate(path: Path, block: str, n: int, repeats: int) -> float:
    """Samples/s of a shuffled pass over one (block, timestep) slice through ZarrSource, the buffer a
    quarter of the slice (the probe's streaming case), best of ``repeats`` epochs."""
    from pipeline.store.source import ZarrSource

    slice_bytes = n * int(np.prod(BLOCKS[block])) * 2
    with ZarrSource([(str(path), f"blocks/{block}/activations")], [TIMESTEPS[2]],
                    buffer_bytes=slice_bytes // 4) as source:
        times = []
        for epoch in range(repeats + 1):
            start = time.perf_counter()
            for _ in source.iter_batches(np.arange(n), 256, keys=["t100"], shuffle=True, seed=0, epoch=epoch):
                pass
            times.append(time.perf_counter() - start)
        return n / min(times[1:])


def main() -> None:
    import h5py
    import zarr

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--chunk-kib", default="2048,256,64")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    n = args.samples
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    folder = Path(tempfile.mkdtemp(prefix="dp-naive-"))
    try:
        paths = build(folder, n, [int(k) for k in args.chunk_kib.split(",")])
        block, t_index = "up_blocks.0", 2
        rng = np.random.default_rng(1)
        picks = np.sort(rng.choice(n, 100, replace=False))
        slice_bytes = n * int(np.prod(BLOCKS[block])) * 2
        sample_bytes = 100 * len(TIMESTEPS) * sum(int(np.prod(s)) for s in BLOCKS.values()) * 2
        print(f"{n} samples x {len(BLOCKS)} blocks x {len(TIMESTEPS)} timesteps; read A returns "
              f"{slice_bytes / 2**20:.2f} MiB, read B {sample_bytes / 2**20:.2f} MiB")
        print("\n| layout | MiB on disk | read A s | A amplification | read B s | B amplification |")
        print("|---|---|---|---|---|---|")
        for name, path in paths.items():
            if name == "npy":
                arrays = {b: np.load(path / f"{b}.npy", mmap_mode="r") for b in BLOCKS}
                ta, _, _ = best(lambda: np.array(arrays[block][:, t_index]), args.repeats)
                tb, _, _ = best(lambda: [np.array(a[picks]) for a in arrays.values()], args.repeats)
                ra = npy_pages(arrays[block].shape, (range(n), [t_index]))
                rb = sum(npy_pages(a.shape, (picks, range(len(TIMESTEPS)))) for a in arrays.values())
                name = ".npy per block (mmap)"
            elif name == "hdf5":
                f = h5py.File(path, "r")
                ta, ra, _ = best(lambda: f[block][:, t_index], args.repeats)
                tb, rb, _ = best(lambda: [f[b][picks] for b in BLOCKS], args.repeats)
                f.close()
                name = "HDF5, contiguous dataset per block"
            elif name == "read_samples":
                import xarray  # noqa: F401,I001 -- imported before timing, as zarr and h5py are
                from pipeline.store.samples import read_samples

                ta, ra, _ = best(lambda: read_samples(path, block, np.arange(n), [TIMESTEPS[t_index]]),
                                 args.repeats)
                tb, rb, _ = best(lambda: [read_samples(path, b, picks) for b in BLOCKS], args.repeats)
                name = f"diffprobe read_samples (byte ranges of the store above, {path.name})"
            else:
                root = zarr.open_group(str(path), mode="r")
                arrs = {b: root[f"blocks/{b}/activations"] for b in BLOCKS}
                ta, ra, _ = best(lambda: arrs[block][:, t_index], args.repeats)
                tb, rb, _ = best(lambda: [arrs[b].get_orthogonal_selection((picks,)) for b in BLOCKS],
                                 args.repeats)
                chunk = {b: arrs[b].chunks[0] for b in BLOCKS}
                name = f"{name} (samples per chunk {chunk})"
            print(f"| {name} | {disk_bytes(path, 'npy' if 'npy' in name else '') / 2**20:.1f} | {ta:.4f} | "
                  f"{ra / slice_bytes:.2f} | {tb:.4f} | {rb / sample_bytes:.2f} |", flush=True)
        print("\n| layout | streamed shuffled pass, samples/s |\n|---|---|")
        for name, path in paths.items():
            if name.startswith("diffprobe"):  # read_samples: no streaming pass of its own
                try:
                    rate = stream_rate(path, block, n, args.repeats)
                    print(f"| {name} | {rate:.0f} |", flush=True)
                except Exception as exc:  # noqa: BLE001
                    print(f"| {name} | error {type(exc).__name__}: {exc} |")
        print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
