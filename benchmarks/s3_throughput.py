"""Stores on object storage vs local disk: extraction efficiency and probe streaming throughput.

Starts moto's S3 server on 127.0.0.1 (as the tests do; ``pip install -e ".[test]"``) and
measures, in one run, alternating local and S3 so both see the same machine load:

- *extract*: the extract stage's pipeline (``Extractor`` + ``extract_units``: decode,
  noise, hooked forward, float16 check, background writer) on the digits UNet
  config, writing to a local store and to ``s3://``; sample-timesteps per second and
  their ratio S3 / local. The writer thread overlaps the PUTs with the next unit's
  forward, so the target is a ratio near 1.
- *probe stream*: ``train_heads`` (linear head) over a ``ZarrSource`` streamed from a
  synthetic pooled store (slice 4x the read buffer, so every epoch re-reads and decodes
  it), the same bytes locally and on S3; training samples per second and the ratio.
  S3 is read three ways: through s3fs (``FsspecStore``) with a window's reads one after
  another (what diffprobe did before: ``READ_CONCURRENCY = 1``), through s3fs with them
  concurrent, and through obstore (``ObjectStore``, the default for ``s3://`` reads).
- *ceiling*: raw GET throughput of the moto server for the store's shard objects (whole
  objects, 4 in flight) with s3fs and with obstore, against which the probe's read rate
  (decoded bytes read / wall time) is compared.
- *slice*: the bytes one (block, timestep) slice read fetched from S3 against that
  slice's stored size (range reads of its inner chunks, not whole shards).

A local S3 server measures the protocol's overhead (request count, no rename, HTTP and
the s3fs/zarr async path), not a network: real S3 adds latency and bandwidth limits.

    .venv/bin/python benchmarks/s3_throughput.py                # ~3-6 min on 2 shared cores
    .venv/bin/python benchmarks/s3_throughput.py --samples 128 --n 4096   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from pipeline import store
from pipeline.store import location

#: The digits UNet's shape (1.1 M parameters, 16x16), random weights.
UNET = {"sample_size": 16, "in_channels": 1, "out_channels": 1, "block_out_channels": [64, 128, 128],
        "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8,
        "num_class_embeds": 11}


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def extract_rate(work: Path, output, samples: int, unit: int) -> float:
    """Sample-timesteps per second of the extract pipeline writing ``output``."""
    from pipeline.datasets import DatasetConfig
    from pipeline.models import ModelConfig
    from stages.extract import ExtractConfig, Extractor, extract_units

    cfg = ExtractConfig(model=ModelConfig(config=str(work / "unet.json"), null_class=10),
                        dataset=DatasetConfig(reader="digits", split="all", limit=samples),
                        blocks=("down_blocks.1", "mid_block", "up_blocks.1"), timesteps=(10, 100, 400),
                        conditioning="class", batch_size=64, unit_samples=unit)
    ex = Extractor(cfg)
    location.remove(location.as_location(output))
    store.create_store(output, ex.layout, ex.samples, ex.reader.class_names, {"stage": "extract",
                                                                              "stage_hash": "bench"})
    start = time.perf_counter()
    extract_units(ex, output, list(range(ex.layout.n_units)), progress=False)
    assert store.unit_status(output).all()
    return ex.layout.n_samples * len(cfg.timesteps) / (time.perf_counter() - start)


def write_pooled(path, n: int, channels: int, p: int) -> None:
    from probe_throughput import write_store

    write_store(path, n, channels, p, store.Compression())


def cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds (user + system) of this process and its reaped children, or of process ``pid``."""
    if pid is None:
        import resource

        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def probe_rate(path, n: int, epochs: int, buffer_mib: int, reader: str = "obstore",
               concurrency: int | None = None, server_pid: int | None = None) -> tuple[float, int, float, float, float]:
    """Training samples per second of a linear head streamed from ``path``; bytes read; read MiB/s;
    CPU seconds of this process (with the local window reader, a reaped child) and of the S3 server.

    ``reader``: the client of remote reads (``DIFFPROBE_OBJECT_READER``); ``concurrency``:
    overrides ``source.READ_CONCURRENCY`` (1: a window's reads one after another).
    """
    import torch

    from pipeline.probing.heads import HeadSpec
    from pipeline.probing.training import HeadJob, TrainSpec, train_heads
    from pipeline.store import source as source_module
    from pipeline.store.source import ZarrSource

    torch.set_num_threads(1)
    os.environ[location.READER_ENV] = reader
    saved = source_module.READ_CONCURRENCY
    source_module.READ_CONCURRENCY = saved if concurrency is None else concurrency
    try:
        labels = store.open_root(path)["label"][:]
        perm = np.random.default_rng(1).permutation(len(labels))
        train_idx, test_idx = np.sort(perm[n // 5:]), np.sort(perm[:n // 5])
        jobs = [HeadJob(HeadSpec("linear"), TrainSpec("adamw", lr=1e-3, epochs=epochs), key="t100")]
        cpu0, server0 = cpu_seconds(), cpu_seconds(server_pid) if server_pid else 0.0
        with ZarrSource([(path, "blocks/b/p/activations")], [100], buffer_bytes=buffer_mib << 20) as source:
            start = time.perf_counter()
            result = train_heads(source, train_idx, test_idx, jobs, batch_size=256, val_fraction=0.1, seed=0,
                                 num_classes=10)
            seconds = time.perf_counter() - start
            read = source.bytes_read
        cpu, server = cpu_seconds() - cpu0, (cpu_seconds(server_pid) - server0) if server_pid else 0.0
        return result[0]["n_train"] * epochs / seconds, read, read / 2**20 / seconds, cpu, server
    finally:
        source_module.READ_CONCURRENCY = saved
        os.environ.pop(location.READER_ENV, None)


def raw_get_rate(server, bucket: str, prefix: str, client: str, repeats: int = 2) -> float:
    """MiB/s of whole-object GETs (4 in flight) of every object under ``prefix``: the server's ceiling."""
    import asyncio

    fs = server.filesystem()
    keys = [k for k in fs.find(f"{bucket}/{prefix}") if fs.size(k) > 1 << 16]
    total = sum(fs.size(k) for k in keys) / 2**20
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        if client == "s3fs":
            fs = server.filesystem()
            fs.cat(keys, batch_size=4)
        else:
            import obstore

            st = server.obstore(bucket)

            async def fetch_all(st=st):
                gate = asyncio.Semaphore(4)

                async def one(key):
                    async with gate:
                        got = await obstore.get_async(st, key.split("/", 1)[1])
                        await got.bytes_async()

                await asyncio.gather(*(one(k) for k in keys))

            asyncio.run(fetch_all())
        best = max(best, total / (time.perf_counter() - start))
    return best


def slice_fetch_bytes(server, url: str) -> tuple[int, int]:
    """(bytes fetched over HTTP to read one timestep of a 2-timestep block, bytes stored for the block)."""
    import zarr
    from zarr.storage import FsspecStore

    zstore = FsspecStore.from_url(url, storage_options=dict(server.storage_options, skip_instance_cache=True),
                                  read_only=True)
    fs = zstore.fs
    fetched = {"n": 0}
    original = fs._cat_file

    async def counting(path, start=None, end=None, **kw):
        data = await original(path, start=start, end=end, **kw)
        fetched["n"] += len(data)
        return data

    fs._cat_file = counting
    array = zarr.open_group(zstore, mode="r")["blocks/b/activations"]
    before = fetched["n"]
    array[:, 0]
    stored = server.filesystem().du(f"{url.removeprefix('s3://')}/blocks/b/activations", total=True)
    return fetched["n"] - before, int(stored)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256, help="digits extracted per run")
    parser.add_argument("--n", type=int, default=8192, help="samples of the synthetic pooled store")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per side; best kept")
    parser.add_argument("--parts", default="extract,probe,slice", help="comma-separated subset to run")
    args = parser.parse_args()
    from servers.s3 import start_s3_server

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "unet.json").write_text(json.dumps(UNET))
        server = start_s3_server(work / "moto.log")
        try:
            bucket = server.new_bucket("bench")
            remote = location.parse(f"s3://{bucket}", storage_options=server.storage_options)
            print(f"load average at start: {load_average()} ({os.cpu_count()} cores)")
            parts = args.parts.split(",")
            rates = {"local": [], "s3": []}
            for _ in range(args.repeats if "extract" in parts else 0):
                rates["local"].append(extract_rate(work, work / "ex.zarr", args.samples, 64))
                rates["s3"].append(extract_rate(work, remote / "ex.zarr", args.samples, 64))
            ext = {k: max(v, default=float("nan")) for k, v in rates.items()}
            print(f"extract: local {ext['local']:.0f}, s3 {ext['s3']:.0f} sample-timesteps/s; "
                  f"ratio s3/local **{ext['s3'] / ext['local']:.2f}** (runs: {rates})")

            if "probe" in parts:
                write_pooled(work / "pooled.zarr", args.n, 512, 4)
                write_pooled(remote / "pooled.zarr", args.n, 512, 4)
            slice_mib = args.n * 512 * 16 * 2 / 2**20
            buffer_mib = max(1, int(slice_mib / 4))
            sides = {"local": (work / "pooled.zarr", "obstore", None),
                     "s3 s3fs serial": (remote / "pooled.zarr", "fsspec", 1),
                     "s3 s3fs": (remote / "pooled.zarr", "fsspec", None),
                     "s3 obstore": (remote / "pooled.zarr", "obstore", None)}
            probe = {side: [] for side in sides}
            for _ in range(args.repeats if "probe" in parts else 0):
                for side, (path, reader, concurrency) in sides.items():
                    probe[side].append(probe_rate(path, args.n, args.epochs, buffer_mib, reader, concurrency,
                                                  server._process.pid))
            if "probe" in parts:
                ceiling = {c: raw_get_rate(server, bucket, "pooled.zarr", c) for c in ("s3fs", "obstore")}
                print(f"moto raw GET of the store's shards (whole objects, 4 in flight): s3fs "
                      f"{ceiling['s3fs']:.0f} MiB/s, obstore {ceiling['obstore']:.0f} MiB/s")
                local = max(probe["local"])
                print(f"probe stream (linear, slice {slice_mib:.0f} MiB, buffer {buffer_mib} MiB, "
                      f"{args.epochs} epochs, read {local[1] / 2**20:.0f} MiB per run):")
                for side, runs in probe.items():
                    rate, read, mib_s, cpu, server_cpu = max(runs)
                    mib = read / 2**20
                    print(f"  {side}: {rate:.0f} train samples/s, read {mib_s:.0f} MiB/s; ratio to local "
                          f"**{rate / local[0]:.2f}**, read rate / obstore ceiling {mib_s / ceiling['obstore']:.2f}; "
                          f"CPU per MiB read: this process {cpu / mib * 1e3:.1f} ms, S3 server "
                          f"{server_cpu / mib * 1e3:.1f} ms (runs: {[round(r[0]) for r in runs]})")

            slice_url = f"s3://{bucket}/slice.zarr"
            layout = store.make_layout(1024, {"b": (64, 8, 8)}, [10, 400], unit_samples=512)
            samples = store.SampleTable([f"im{i}" for i in range(1024)], [0] * 1024, [False] * 1024,
                                        [0] * 1024)
            path = location.parse(slice_url, storage_options=server.storage_options)
            store.create_store(path, layout, samples, ["a"], {"stage": "extract", "stage_hash": "bench"})
            root = store.open_root(path, mode="r+")
            rng = np.random.default_rng(0)
            for u in range(layout.n_units):
                store.write_unit(root, layout, u, {"b": rng.standard_normal((512, 2, 64, 8, 8)).astype(np.float16)})
            got, stored = slice_fetch_bytes(server, slice_url)
            print(f"one (block, timestep) slice of a 2-timestep block: fetched {got / 2**20:.2f} MiB of "
                  f"{stored / 2**20:.2f} MiB stored ({got / stored:.2f}; 0.5 + index = range reads)")
            print(f"load average at end: {load_average()}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
