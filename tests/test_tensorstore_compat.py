"""The stores are plain Zarr v3: an independent implementation (TensorStore) reads what zarr-python wrote.

Sharded arrays with Blosc zstd + bitshuffle + crc32c (the extract default), crc32c
alone (the pool default) and lz4; NaN fill values for unwritten samples.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from pipeline import store

ts = pytest.importorskip("tensorstore")


def open_ts(path, array_path: str):
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{path}/{array_path}/"}}
    return ts.open(spec, open=True, read=True).result()


@pytest.mark.parametrize("compression", [
    store.Compression(),
    store.Compression(cname="none"),
    store.Compression(cname="lz4", clevel=5, shuffle="shuffle", checksum=False),
], ids=["zstd-bitshuffle-crc32c", "crc32c-only", "lz4-no-crc"])
def test_tensorstore_reads_what_the_store_wrote(tmp_path, compression):
    n, shape = 40, (8, 4, 4)
    layout = store.make_layout(n, {"b": shape}, [10, 100], unit_samples=16)
    samples = store.SampleTable([f"im{i}" for i in range(n)], [0] * n, [False] * n, [i % 3 for i in range(n)])
    path = tmp_path / "s.zarr"
    store.create_store(path, layout, samples, ["a", "b", "c"], {"stage": "extract", "stage_hash": "x"}, compression)
    root = store.open_root(path, mode="r+")
    rng = np.random.default_rng(0)
    values = rng.standard_normal((n, 2, *shape)).astype(np.float16)
    for u in range(layout.n_units - 1):  # the last unit stays unwritten: its rows read as the fill value
        a, b = layout.unit_range(u)
        store.write_unit(root, layout, u, {"b": values[a:b]})
    written = layout.unit_range(layout.n_units - 2)[1]

    got = open_ts(path, "blocks/b/activations").read().result()
    ours = zarr.open_group(str(path), mode="r")["blocks/b/activations"][:]
    assert got.dtype == np.float16 and got.shape == (n, 2, *shape)
    np.testing.assert_array_equal(got[:written], values[:written])
    assert np.isnan(got[written:]).all()
    np.testing.assert_array_equal(got, ours)
    np.testing.assert_array_equal(open_ts(path, "done").read().result(), root["done"][:])
    np.testing.assert_array_equal(open_ts(path, "label").read().result(), np.arange(n) % 3)
