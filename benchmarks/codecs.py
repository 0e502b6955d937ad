"""Which codecs earn their CPU: ratio and single-core MB/s on the shipped model's activations.

    .venv/bin/python benchmarks/codecs.py [--images 360] [--repeats 3]

Extracts ``--images`` held-out digits with the trained digits DDPM
(``data/models/digits-ddpm``; blocks down_blocks.1, mid_block, up_blocks.0; timesteps
10, 50, 100, 200, 400; float16, as the demo stores them), cuts every block into the
store's inner chunks (one timestep, whole maps, ``make_layout``'s chunk size) and runs
each codec chain over all chunks on one core (Blosc ``nthreads=1``): ratio = raw bytes
/ encoded bytes, encode and decode MB/s of raw data, best of ``--repeats``. The
encoded bytes include crc32c's 4 per chunk, which every chain carries. Then the
store-level effect: the same unit written through zarr with each chain, bytes on
disk including the last partial chunk's NaN padding.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DIGITS = ROOT / "data" / "models" / "digits-ddpm"
BLOCKS = ("down_blocks.1", "mid_block", "up_blocks.0")
TIMESTEPS = (10, 50, 100, 200, 400)

#: name -> (Compression kwargs); every chain keeps crc32c
CHAINS = {
    "none (crc32c only)": {"cname": "none"},
    "lz4 + byte shuffle": {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"},
    "lz4 + bitshuffle": {"cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"},
    "zstd 1 + bitshuffle": {"cname": "zstd", "clevel": 1, "shuffle": "bitshuffle"},
    "zstd 3 + bitshuffle (old default)": {"cname": "zstd", "clevel": 3, "shuffle": "bitshuffle"},
    "BitRound 7 + zstd 3 + bitshuffle": {"cname": "zstd", "clevel": 3, "shuffle": "bitshuffle",
                                         "bitround_keepbits": 7},
    "BitRound 7 + lz4 + byte shuffle": {"cname": "lz4", "clevel": 5, "shuffle": "shuffle", "bitround_keepbits": 7},
}


def activations(n_images: int) -> dict[str, np.ndarray]:
    """{block: (n, T, C, H, W) float16} from the trained digits model on held-out digits."""
    import torch

    from pipeline.datasets import DatasetConfig
    from pipeline.models import ModelConfig
    from stages.extract import ExtractConfig, Extractor

    torch.set_num_threads(1)
    cfg = ExtractConfig(model=ModelConfig(path=str(DIGITS), null_class=10),
                        dataset=DatasetConfig(reader="digits", split="test", limit=n_images),
                        blocks=BLOCKS, timesteps=TIMESTEPS, conditioning="null", batch_size=256,
                        unit_samples=1 << int(np.ceil(np.log2(n_images))))
    ex = Extractor(cfg)
    data, _ = ex.compute_unit(0)
    return data


def numcodecs_chain(kwargs: dict):
    import numcodecs
    from numcodecs import BitRound, Blosc

    numcodecs.blosc.set_nthreads(1)
    filters = [BitRound(kwargs["bitround_keepbits"])] if kwargs.get("bitround_keepbits") else []
    if kwargs["cname"] == "none":
        return filters, None
    shuffle = {"shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}[kwargs.get("shuffle", "bitshuffle")]
    return filters, Blosc(cname=kwargs["cname"], clevel=kwargs.get("clevel", 3), shuffle=shuffle)


def chunks_of(data: dict[str, np.ndarray]) -> list[np.ndarray]:
    from pipeline import store

    shapes = {b: a.shape[2:] for b, a in data.items()}
    n = next(iter(data.values())).shape[0]
    lay = store.make_layout(n, shapes, TIMESTEPS, "float16", unit_samples=n)
    out = []
    for block, arr in data.items():
        cn = lay.chunk_samples[block]
        for s in range(0, n, cn):
            for t in range(arr.shape[1]):
                out.append(np.ascontiguousarray(arr[s:s + cn, t]))
    return out


def measure_chain(chunks: list[np.ndarray], kwargs: dict, repeats: int) -> dict:
    import google_crc32c

    filters, codec = numcodecs_chain(kwargs)
    raw = sum(c.nbytes for c in chunks)

    def encode():
        out = []
        for c in chunks:
            x = c
            for f in filters:
                x = f.encode(x)
            b = codec.encode(x) if codec is not None else np.ascontiguousarray(x).tobytes()
            google_crc32c.value(b)
            out.append(b)
        return out

    def decode(encoded):
        for b in encoded:
            google_crc32c.value(b)
            codec.decode(b) if codec is not None else np.frombuffer(b, dtype=np.float16)

    enc_s, dec_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        encoded = encode()
        enc_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        decode(encoded)
        dec_s.append(time.perf_counter() - start)
    stored = sum(len(b) + 4 for b in encoded)
    return {"ratio": raw / stored, "encode_MBps": raw / 1e6 / min(enc_s), "decode_MBps": raw / 1e6 / min(dec_s),
            "raw_MB": raw / 1e6}


def store_bytes(data: dict[str, np.ndarray], kwargs: dict, unit_samples: int | None) -> tuple[int, int]:
    """(raw bytes, bytes on disk of the activations) written through the store with this chain."""
    from pipeline import store

    n = next(iter(data.values())).shape[0]
    lay = store.make_layout(n, {b: a.shape[2:] for b, a in data.items()}, TIMESTEPS, "float16", unit_samples)
    samples = store.SampleTable([str(i) for i in range(n)], [0] * n, [False] * n, [0] * n)
    folder = Path(tempfile.mkdtemp(prefix="dp-codec-"))
    try:
        path = folder / "s.zarr"
        store.create_store(path, lay, samples, ["x"], {"stage_hash": "codecs"}, store.Compression(**kwargs))
        root = store.open_root(path, "r+")
        for u in range(lay.n_units):
            a, b = lay.unit_range(u)
            store.write_unit(root, lay, u, {k: v[a:b] for k, v in data.items()})
        on_disk = sum(f.stat().st_size for f in (path / "blocks").rglob("*") if f.is_file() and
                      "activations/c" in f.as_posix())
        return sum(a.nbytes for a in data.values()), on_disk
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=360)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    data = activations(args.images)
    chunks = chunks_of(data)
    print(f"{args.images} digits x {len(TIMESTEPS)} timesteps x {list(data)}: "
          f"{sum(a.nbytes for a in data.values()) / 1e6:.1f} MB float16 in {len(chunks)} chunks")
    print("\n| chain | ratio | encode MB/s (1 core) | decode MB/s (1 core) | store bytes / raw, all samples |")
    print("|---|---|---|---|---|")
    results = {}
    for name, kwargs in CHAINS.items():
        r = measure_chain(chunks, kwargs, args.repeats)
        raw, disk = store_bytes(data, kwargs, None)
        r["store_ratio"] = raw / disk
        results[name] = r
        print(f"| {name} | {r['ratio']:.3f} | {r['encode_MBps']:.0f} | {r['decode_MBps']:.0f} | "
              f"{disk / raw:.3f} |", flush=True)
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(json.dumps(results))


if __name__ == "__main__":
    main()
