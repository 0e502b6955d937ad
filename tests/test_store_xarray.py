"""The store opens with plain xarray / zarr (no diffprobe import needed), without warnings."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

from pipeline import store
from pipeline.workflow.config import load_workflow
from stages import STAGES
from pipeline.workflow.runner import Runner


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    from helpers import write_extract_workflow

    wf = write_extract_workflow(tmp_path_factory.mktemp("xr"), dataset="{reader: digits, split: test, limit: 12}")
    Runner(load_workflow(wf, STAGES), progress=False).run()
    return wf.parent / "out" / "ex.zarr"


def test_open_datatree_and_group_give_dims_and_coords(small_store):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = xr.open_datatree(small_store, engine="zarr")
        ds = xr.open_zarr(small_store, group="blocks/mid_block")
    root = tree.to_dataset()
    for coord in ("sample", "image_id", "label", "view", "flipped", "class_name", "timestep"):
        assert coord in root.coords, coord
    assert tree["blocks/mid_block"].dataset["activations"].dims == ("sample", "timestep", "channel", "y", "x")
    assert "image_id" in tree["blocks/mid_block"].coords  # inherited / duplicated for single-group reads
    assert ds["activations"].dims == ("sample", "timestep", "channel", "y", "x")
    assert ds["activations"].dtype == np.float16
    for coord in ("sample", "image_id", "label", "timestep"):
        assert coord in ds.coords, coord
    assert ds["timestep"].values.tolist() == [10, 100, 400]
    assert ds.sizes["sample"] == 12
    # strings read back as plain numpy str (fixed-width), not numpy's StringDType
    for coord in ("image_id", "class_name"):
        assert root[coord].dtype.kind == "U", (coord, root[coord].dtype)
    # the same numbers through plain zarr
    raw = zarr.open_group(str(small_store), mode="r")["blocks/mid_block/activations"][:]
    np.testing.assert_array_equal(ds["activations"].values, raw)
    # one (block, timestep) slice is lazily selectable by label
    one = ds["activations"].sel(timestep=100).isel(sample=slice(0, 4)).values
    np.testing.assert_array_equal(one, raw[:4, 1])


def test_chunks_shards_and_codecs(small_store):
    arr = zarr.open_group(str(small_store), mode="r")["blocks/mid_block/activations"]
    assert arr.shards == (8, 3, 16, 8, 8)
    assert arr.chunks[1:] == (1, 16, 8, 8)
    names = [type(c).__name__ for c in arr.compressors]
    assert names == ["Crc32cCodec"]  # stored as computed, checksummed: compressing activations saves ~4 %
    attrs = store.read_attrs(small_store)
    assert attrs["complete"] is True and len(attrs["stage_hash"]) == 64
    assert attrs["provenance"]["noise"]["scheme"] == "diffprobe-noise-v1"
    assert (zarr.open_group(str(small_store), mode="r")["done"][:] == store.WRITTEN).all()


def test_plan_layout_chunks_divide_units():
    lay = store.make_layout(1_281_167, {"a": (1024, 16, 16), "b": (256, 64, 64)}, [90, 150, 300])
    for name, n in lay.chunk_samples.items():
        assert lay.unit_samples % n == 0
        c, h, w = lay.blocks[name]
        assert 0.5 * (2 << 20) <= n * c * h * w * 2 <= 2 * (2 << 20)  # a few MiB per chunk
    assert lay.n_units * len(lay.blocks) < 100_000  # one shard file per (unit, block)


def test_bitround_is_opt_in_and_recorded(tmp_path):
    from helpers import write_extract_workflow

    wf = write_extract_workflow(tmp_path, dataset="{reader: digits, split: test, limit: 8}",
                                compression="{bitround_keepbits: 4}")
    Runner(load_workflow(wf, STAGES), progress=False).run()
    out = wf.parent / "out" / "ex.zarr"
    assert store.read_attrs(out)["compression"]["bitround_keepbits"] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = zarr.open_group(str(out), mode="r")["blocks/mid_block/activations"][:]
    mantissa = values.view(np.uint16) & 0x3FF
    assert np.all(mantissa & ((1 << (10 - 4)) - 1) == 0)  # only 4 mantissa bits kept


def test_compression_option_keeps_crc32c_and_values(tmp_path):
    from helpers import write_extract_workflow

    plain, packed = tmp_path / "plain", tmp_path / "zstd"
    for folder, comp in ((plain, None), (packed, "{cname: zstd, clevel: 3, shuffle: bitshuffle}")):
        wf = write_extract_workflow(folder, dataset="{reader: digits, split: test, limit: 8}", compression=comp)
        Runner(load_workflow(wf, STAGES), progress=False).run()
    arrays = [zarr.open_group(str(f / "out" / "ex.zarr"), mode="r")["blocks/mid_block/activations"]
              for f in (plain, packed)]
    assert [type(c).__name__ for c in arrays[1].compressors] == ["BloscCodec", "Crc32cCodec"]
    assert np.isfinite(arrays[1][:]).all()
    np.testing.assert_array_equal(arrays[0][:], arrays[1][:])


@pytest.mark.parametrize("n", [360, 1797])
def test_last_chunk_padding_costs_little_uncompressed(tmp_path, n):
    """The NaN padding of the last partial chunk is stored as is without a compressor: bounded."""
    shapes = {"a": (64, 4, 4), "b": (64, 8, 8)}
    lay = store.make_layout(n, shapes, [10, 50, 100, 200, 400])
    samples = store.SampleTable([str(i) for i in range(n)], [0] * n, [False] * n, [0] * n)
    path = tmp_path / "s.zarr"
    store.create_store(path, lay, samples, ["x"], {"stage_hash": "pad"})
    root = store.open_root(path, mode="r+")
    rng = np.random.default_rng(0)
    for u in range(lay.n_units):
        a, b = lay.unit_range(u)
        store.write_unit(root, lay, u, {k: rng.standard_normal((b - a, 5, *s)).astype(np.float16)
                                        for k, s in shapes.items()})
    for name, (c, h, w) in shapes.items():
        raw = n * 5 * c * h * w * 2
        on_disk = sum(f.stat().st_size for f in (path / "blocks" / name / "activations" / "c").rglob("*")
                      if f.is_file())
        assert raw < on_disk <= raw * (1 + 1 / 16) + 4096  # data, <= 1/16 padding, shard indexes
        assert lay.chunk_samples[name] >= 8


def readme_xarray_walkthrough() -> str:
    """The README's xarray walk-through: the python block after 'Reading with xarray'."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    after = text.split("Reading with xarray", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_xarray_walkthrough_runs_under_W_error(small_store, tmp_path):
    """The README's recipe, run as a user would (`python -W error`) against a tiny store."""
    import subprocess
    import sys

    code = readme_xarray_walkthrough()
    assert "runs/demo/trained.zarr" in code and "groupby" in code
    script = tmp_path / "walkthrough.py"
    script.write_text(code.replace("runs/demo/trained.zarr", str(small_store))
                      + "\nprint(means.sizes['label'], first.sizes['sample'], int(written.sum()))\n")
    done = subprocess.run([sys.executable, "-W", "error", str(script)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    n_labels = len(np.unique(zarr.open_group(str(small_store), mode="r")["label"][:]))
    assert done.stdout.split() == [str(n_labels), "1", "12"]


def test_incomplete_store_opens_without_warnings(tmp_path):
    """A store with units still pending opens quietly (consolidated at creation)."""
    from helpers import write_extract_workflow
    from stages.extract import Extractor, extract_units

    wf = write_extract_workflow(tmp_path, dataset="{reader: digits, split: test, limit: 12}")
    runner = Runner(load_workflow(wf, STAGES), progress=False)
    entry = runner.wf.stages[0]
    ctx = runner.context(entry)
    ex = Extractor(entry.config)
    store.create_store(ctx.output, ex.layout, ex.samples, ex.reader.class_names, ctx.base_attrs(),
                       entry.config.compression)
    extract_units(ex, ctx.output, [0], progress=False)
    assert not store.finalize(ctx.output)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(ctx.output, group="blocks/mid_block")
        tree = xr.open_datatree(ctx.output, engine="zarr")
        assert tree.to_dataset()["done"].values.tolist() == [1] * 8 + [0] * 4
    assert bool(ds["activations"].isel(sample=0).notnull().all())
    assert not bool(ds["activations"].isel(sample=11).notnull().any())
    # the rest of the units then complete it as before
    extract_units(ex, ctx.output, [1], progress=False)
    assert store.finalize(ctx.output)
    assert store.read_attrs(ctx.output)["complete"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert xr.open_zarr(ctx.output, group="blocks/mid_block").sizes["sample"] == 12


def test_probe_results_string_coords_are_plain(tmp_path):
    from pipeline.probing.results import open_results, results_dataset

    rows = [dict(block="mid_block", timestep=10, pool=1, head="linear", top1=0.5, top5=0.9, val_top1=0.5,
                 epochs_run=3, train_time_s=1.0, best_epoch=1, n_test=10, n_val=5)]
    ds = results_dataset(rows, ["mid_block", "up_blocks.0"], [10, 100], [1, 2], {"linear": "linear", "mlp": "mlp"},
                         attrs={store.ATTR_KEY: {"stage": "probe"}})
    out = tmp_path / "p.probe"
    zarr.open_group(str(out), mode="w", zarr_format=3)
    store.write_results_dataset(ds, out, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = open_results(out)
        for name in ("block", "head", "head_kind"):
            assert res[name].dtype.kind in "OU" and all(isinstance(v, str) for v in res[name].values), name
        kept = res["accuracy"].where(res["accuracy"] > 0, drop=True)
        assert kept["block"].values.tolist() == ["mid_block"] and kept["head"].values.tolist() == ["linear"]
        assert float(kept.squeeze()) == 0.5
        assert res["accuracy"].groupby("head_kind").mean().sizes["head_kind"] == 2
        # plain xarray, no diffprobe helper: the same plain strings (fixed-width <U)
        plain = xr.open_zarr(str(out), chunks=None)
        for name in ("block", "head", "head_kind"):
            assert plain[name].dtype.kind == "U" and type(plain[name].values[0]) is np.str_, name
        assert plain["accuracy"].where(plain["accuracy"] > 0, drop=True)["head"].values.tolist() == ["linear"]
