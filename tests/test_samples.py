"""A few samples read by byte range (pipeline.store.samples) against xarray's / zarr's own reads."""

from __future__ import annotations

import shutil
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import xarray as xr
import zarr

from pipeline import store
from pipeline.errors import StoreError
from pipeline.store.samples import SampleReader, raw_shards, read_samples

BLOCKS = {"a": (4, 2, 2), "b": (3, 4, 4)}
TIMESTEPS = [10, 50, 200]
N = 150  # not a multiple of the inner chunk: the last chunk is padded


def make_store(path: Path, dtype: str = "float16", compression=None, failed=(),
               pending_units=()) -> tuple[str, dict]:
    """``N`` samples of random values in 2 blocks; shards of 64 samples, inner chunks of 8 or 16."""
    layout = store.make_layout(N, BLOCKS, TIMESTEPS, dtype, unit_samples=64, chunk_bytes=512)
    samples = store.SampleTable([f"img/{i % 140}" for i in range(N)], [i // 140 for i in range(N)],
                                [False] * N, [i % 3 for i in range(N)])
    store.create_store(path, layout, samples, list("xyz"), {"stage": "extract", "stage_hash": "s"},
                       compression or store.Compression())
    root = store.open_root(path, mode="r+")
    rng = np.random.default_rng(0)
    values = {b: rng.standard_normal((N, len(TIMESTEPS), *s)).astype(np.float32) for b, s in BLOCKS.items()}
    for v in values.values():
        v[list(failed)] = np.nan  # as extract leaves an unreadable image
    for u in range(layout.n_units):
        if u in pending_units:
            continue
        lo, hi = layout.unit_range(u)
        store.write_unit(root, layout, u, {b: v[lo:hi] for b, v in values.items()},
                         {i - lo: "unreadable" for i in failed if lo <= i < hi})
    return str(path), layout.chunk_samples


def expected(path: str, block: str, positions, t_index=None) -> xr.DataArray:
    """xarray's read of the same samples (and timestep positions)."""
    acts = xr.open_zarr(path, group=f"blocks/{block}", chunks=None)["activations"]
    return acts.isel(sample=list(positions), timestep=slice(None) if t_index is None else t_index).load()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_random_samples_equal_xarray_and_read_only_their_bytes(tmp_path, dtype):
    path, chunks = make_store(tmp_path / "s.zarr", dtype)
    assert max(chunks.values()) < 64  # several inner chunks per shard
    reader = SampleReader(path)
    rng = np.random.default_rng(1)
    picks = [list(rng.choice(N, 20, replace=False)), [N - 1, 3, 3, 140, 0, N - 1, 64, 63]]
    for positions in picks:
        for block, shape in BLOCKS.items():
            before = reader.bytes_read
            got = reader.read(block, positions)
            xr.testing.assert_identical(got, expected(path, block, positions))
            assert got.dtype == np.dtype(store.STORAGE_DTYPES[dtype])
            # reads = the distinct samples' slabs + each new shard's index: nothing else
            slab = int(np.prod(shape)) * got.dtype.itemsize
            assert reader.bytes_read - before <= len(set(positions)) * len(TIMESTEPS) * slab + 3 * (
                16 * 64 // chunks[block] * len(TIMESTEPS) + 4)
            xr.testing.assert_identical(reader.read(block, positions, check=True), got)
    got = read_samples(path, "b", picks[1], timesteps=[200, 10])
    xr.testing.assert_identical(got, expected(path, "b", picks[1], [2, 0]))


def test_image_ids_select_every_view_in_the_order_asked(tmp_path):
    path, _ = make_store(tmp_path / "s.zarr")
    got = read_samples(path, "a", ["img/5", "img/130", "img/5"], timesteps=[50])
    # img/5 has views at rows 5 and 145; img/130 only at row 130
    assert got.sample.values.tolist() == [5, 145, 130, 5, 145]
    assert got.view.values.tolist() == [0, 1, 0, 0, 1]
    xr.testing.assert_identical(got, expected(path, "a", [5, 145, 130, 5, 145], [1]))
    assert read_samples(path, "a", []).shape == (0, 3, 4, 2, 2)


def test_a_compressed_store_is_read_through_zarr(tmp_path):
    zstd_bitround = store.Compression(cname="zstd", bitround_keepbits=7)
    path, _ = make_store(tmp_path / "z.zarr", compression=zstd_bitround)
    with store.quiet_zarr():
        assert raw_shards(zarr.open_group(path, mode="r")["blocks/a/activations"]) is None
        positions = [149, 7, 7, 80]
        got = read_samples(path, "a", positions)
        xr.testing.assert_identical(got, expected(path, "a", positions))


def test_the_byte_range_math_matches_zarrs_own_read(tmp_path):
    """Independently of samples.py: each index entry of a shard file is a whole inner chunk
    (its crc32c checks) holding zarr's values for that chunk's region in C order."""
    path, chunks = make_store(tmp_path / "s.zarr")
    array = zarr.open_group(path, mode="r")["blocks/b/activations"]
    lay = raw_shards(array)
    assert lay is not None and lay.index_at_end and lay.checksum
    reader = SampleReader(path)
    inner = chunks["b"]
    raw = (Path(path) / "blocks/b/activations/c/1/0/0/0/0").read_bytes()  # samples 64..127
    index = np.frombuffer(raw[-(16 * (64 // inner) * 3 + 4):-4], dtype="<u8").reshape(64 // inner, 3, 2)
    for i in range(64 // inner):
        for t in range(3):
            offset, nbytes = (int(v) for v in index[i, t])
            body, crc = raw[offset:offset + nbytes - 4], raw[offset + nbytes - 4:offset + nbytes]
            assert google_crc32c.value(body) == int.from_bytes(crc, "little")
            lo = 64 + i * inner
            values = np.frombuffer(body, dtype="<f2").reshape(inner, 3, 4, 4)
            np.testing.assert_array_equal(values, array[lo:lo + inner, t])
            sample = 64 + i * inner + 3  # one sample's slab: 3 * 4 * 4 float16 at j = 3
            got = reader.read("b", [sample], timesteps=[TIMESTEPS[t]]).values[0, 0]
            slab = np.frombuffer(body[3 * 96:4 * 96], dtype="<f2").reshape(3, 4, 4)
            np.testing.assert_array_equal(got, slab)


def test_missing_data_is_named_and_failed_images_read_as_nan(tmp_path):
    path, _ = make_store(tmp_path / "s.zarr", failed=(2, 70), pending_units=(2,))
    got = read_samples(path, "a", [2, 70, 71])
    assert np.isnan(got.values[:2]).all() and not np.isnan(got.values[2]).any()
    xr.testing.assert_identical(got, expected(path, "a", [2, 70, 71]))
    with pytest.raises(StoreError, match=r"block 'a' has no data yet for 2 requested sample\(s\) \(130, 149; "
                                         r"timesteps \[10, 50, 200\]\).*not written"):
        read_samples(path, "a", [5, 130, 149])
    shutil.rmtree(Path(path) / "blocks/b/activations/c/1")
    for check in (False, True):
        with pytest.raises(StoreError, match=r"block 'b' has no data for samples 64\.\.127, all timesteps, "
                                             r"which done marks written: blocks/b/activations/c/1/0/0/0/0 is "
                                             r"missing"):
            read_samples(path, "b", [3, 100], check=check)
    for bad, message in ((["img/999"], "has no image id 'img/999'"), ([150], "outside 0..149"),
                         ([True], "positions \\(ints\\) or image ids")):
        with pytest.raises(StoreError, match=message):
            read_samples(path, "a", bad)
    with pytest.raises(StoreError, match=r"lacks timestep\(s\) \[7\]"):
        read_samples(path, "a", [0], timesteps=[7])
    with pytest.raises(StoreError, match=r"no block 'c'; it has \['a', 'b'\]"):
        read_samples(path, "c", [0])


def test_a_damaged_shard_index_is_named(tmp_path):
    path, _ = make_store(tmp_path / "s.zarr")
    shard = Path(path) / "blocks/a/activations/c/0/0/0/0/0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"shard index of blocks/a/activations/c/0/0/0/0/0 fails its crc32c"):
        read_samples(path, "a", [1])


def test_samples_read_from_s3_equal_local(tmp_path, s3_server, monkeypatch):
    from test_object_reads import upload

    from pipeline.store import location

    bucket = s3_server.new_bucket("samples")
    local, _ = make_store(tmp_path / "s.zarr", failed=(3,))
    url = location.parse(upload(s3_server, local, bucket, "s.zarr"),
                         storage_options=s3_server.storage_options)
    positions = [149, 3, 70, 71, 72, 5, 70]
    want = read_samples(local, "b", positions)
    for client in ("obstore", "fsspec"):
        monkeypatch.setenv(location.READER_ENV, client)
        offset = s3_server.log_offset()
        got = read_samples(url, "b", positions)
        xr.testing.assert_identical(got, want)
        shard_gets = [r for r in s3_server.requests_since(offset) if "/activations/c/" in r]
        # 3 shard indexes, then the slabs (6 distinct samples x 3 timesteps, some adjacent): no whole shards
        print(client, shard_gets)
        assert 3 < len(shard_gets) <= 3 + 18, (client, shard_gets)
    s3_server.filesystem().rm(f"{bucket}/s.zarr/blocks/b/activations/c/1/0/0/0/0")
    with pytest.raises(StoreError, match=r"samples 64\.\.127, all timesteps, which done marks written"):
        read_samples(url, "b", [70])


def test_other_raw_shard_layouts_index_at_the_start_no_checksum_several_timesteps_per_chunk(tmp_path):
    """Shards as other Zarr writers may make them: index first, big-endian inner chunks without crc32c,
    two timesteps per inner chunk (slabs then interleave samples and timesteps)."""
    from zarr.codecs import BytesCodec

    root = zarr.open_group(str(tmp_path / "o.zarr"), mode="w", zarr_format=3)
    root.attrs["diffprobe"] = {"stage": "extract"}
    root.create_array("done", shape=(40,), dtype="int8", fill_value=1)[:] = np.ones(40, dtype="int8")
    group = root.create_group("blocks").create_group("x")
    acts = group.create_array("activations", shape=(40, 4, 3, 2, 2), dtype="float32", chunks=(4, 2, 3, 2, 2),
                              shards={"shape": (16, 4, 3, 2, 2), "index_location": "start"},
                              serializer=BytesCodec(endian="big"), compressors=None, fill_value=float("nan"),
                              dimension_names=("sample", "timestep", "channel", "y", "x"))
    values = np.random.default_rng(2).standard_normal(acts.shape).astype(np.float32)
    acts[:] = values
    group.create_array("timestep", shape=(4,), dtype="int64", chunks=(4,), dimension_names=("timestep",))[:] = [
        1, 2, 3, 4]
    lay = raw_shards(acts)
    assert lay is not None and not lay.index_at_end and not lay.checksum and lay.dtype.byteorder == ">"
    reader = SampleReader(tmp_path / "o.zarr")
    positions, timesteps = [39, 0, 17, 18, 5], [4, 1, 2]
    got = reader.read("x", positions, timesteps)
    np.testing.assert_array_equal(got.values, values[positions][:, [3, 0, 1]])
    assert got.timestep.values.tolist() == timesteps
    assert reader.bytes_read == 5 * 3 * 48 + 3 * (16 * 8 + 4)  # slabs + 3 indexes of 8 entries + crc32c


def test_the_samples_command_writes_what_read_samples_returns(tmp_path):
    from helpers import invoke, one_error_line

    path, _ = make_store(tmp_path / "s.zarr")
    out = tmp_path / "few.npz"
    code, text = invoke("samples", path, out, "--ids", "img/5,img/130", "--timesteps", "200,10")
    assert code == 0, text
    assert "a: 3 sample(s) x 2 timestep(s) x (4, 2, 2) float16; read" in text and "by byte range" in text
    with np.load(out) as saved:
        assert sorted(saved.files) == ["a", "b", "flipped", "image_id", "label", "sample", "timestep", "view"]
        for block in BLOCKS:
            np.testing.assert_array_equal(saved[block], expected(path, block, [5, 145, 130], [2, 0]).values)
        assert saved["image_id"].tolist() == ["img/5", "img/5", "img/130"]
        assert saved["timestep"].tolist() == [200, 10] and saved["sample"].tolist() == [5, 145, 130]
    ids = tmp_path / "ids.txt"
    ids.write_text("img/7\n\nimg/8\n")
    assert invoke("samples", path, out, "--ids-file", ids, "--block", "b", "--check")[0] == 0
    with np.load(out) as saved:
        assert "a" not in saved.files
        np.testing.assert_array_equal(saved["b"], expected(path, "b", [7, 147, 8, 148]).values)
    assert invoke("samples", path, out, "--rows", "148:,3")[0] == 0
    with np.load(out) as saved:
        assert saved["sample"].tolist() == [3, 148, 149]
    for args, message in [(["--rows", "1", "--ids", "img/1"], "exactly one of --rows, --ids"),
                          (["--rows", "150"], "--rows: sample 150 is outside 0..149"),
                          (["--ids", "img/1", "--block", "c"], "has no block 'c'"),
                          (["--ids", "nope"], "has no image id 'nope'"),
                          (["--ids", "img/1", "--timesteps", "7"], "7")]:
        assert message in one_error_line(*invoke("samples", path, out, *args)), args
    assert "must end in .npz" in one_error_line(*invoke("samples", path, tmp_path / "x.npy", "--rows", "1"))
