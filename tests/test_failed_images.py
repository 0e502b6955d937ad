"""The failed-image list lives in its own group, not in the root attrs every open reads."""

from __future__ import annotations

import json
import warnings

import xarray as xr
import zarr
from helpers import synthetic_store

from pipeline import store
from pipeline.store.describe import describe_store
from pipeline.store.failures import COUNT_ATTR, GROUP, read_failed_images
from pipeline.store.verify import verify_store

N, FAILED = 1024, range(0, 1024, 2)  # every other sample: 512 failed images


def finished_store(tmp_path, failed=FAILED, n=N):
    path, _ = synthetic_store(tmp_path / "s.zarr", n=n, channels=1, p=1, failed=failed)
    assert store.finalize(path)
    return tmp_path / "s.zarr"


def keys_read(monkeypatch, action) -> list[str]:
    """The store keys zarr reads from local files while ``action()`` runs."""
    seen: list[str] = []
    original = zarr.storage.LocalStore.get

    async def get(self, key, *args, **kwargs):
        seen.append(key)
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", get)
    action()
    monkeypatch.undo()
    return seen


def test_many_failures_are_listed_once_and_opening_the_store_never_reads_them(tmp_path, monkeypatch):
    path = finished_store(tmp_path)
    few = finished_store(tmp_path / "few", failed=[3], n=128)
    attrs = store.read_attrs(path)
    assert "failed_images" not in attrs and attrs[COUNT_ATTR] == len(FAILED)
    # the root zarr.json does not grow with the list: 512 failures cost what one does
    assert abs((path / "zarr.json").stat().st_size - (few / "zarr.json").stat().st_size) < 256
    listed = read_failed_images(path)
    assert listed == [{"image_id": f"im{i}", "reason": "bad"} for i in FAILED]
    assert read_failed_images(path, limit=3) == listed[:3]

    def opens():
        root = store.open_root(path)
        root.attrs[store.ATTR_KEY]
        store.load_layout(path)
        store.unit_status(path)
        xr.open_zarr(path).close()

    read = keys_read(monkeypatch, opens)
    assert read and not [k for k in read if k.startswith(f"{GROUP}/")], read
    # plain zarr and xarray read it
    assert zarr.open_group(str(path), mode="r")[f"{GROUP}/image_id"][:5].tolist() == ["im0", "im2", "im4", "im6", "im8"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(path, group=GROUP)
    assert ds.sizes["failed"] == len(FAILED) and str(ds["reason"].values[0]) == "bad"
    # inspect and verify still show it
    text = describe_store(path)
    assert f"{len(FAILED)} image(s) could not be read" in text and "failed    im0: bad" in text
    assert verify_store(path).damage == []


def test_a_store_without_failures_lists_none_and_opens_as_a_tree(tmp_path):
    path = finished_store(tmp_path, failed=(), n=128)
    assert read_failed_images(path) == [] and store.read_attrs(path)[COUNT_ATTR] == 0
    assert "could not be read" not in describe_store(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = xr.open_datatree(path, engine="zarr")
    assert tree[GROUP].dataset.sizes["failed"] == 0


def test_old_stores_with_the_list_in_the_attrs_still_read(tmp_path):
    path = finished_store(tmp_path, failed=[1, 5], n=128)
    root = zarr.open_group(str(path), mode="r+")
    del root[GROUP]
    doc = json.loads((path / "zarr.json").read_text())
    meta = doc["attributes"][store.ATTR_KEY]
    meta.pop(COUNT_ATTR)
    meta["failed_images"] = [{"image_id": "im1", "reason": "bad"}, {"image_id": "im5", "reason": "bad"}]
    doc["consolidated_metadata"]["metadata"] = {k: v for k, v in doc["consolidated_metadata"]["metadata"].items()
                                                if not k.startswith(GROUP)}
    (path / "zarr.json").write_text(json.dumps(doc))
    assert [f["image_id"] for f in read_failed_images(path)] == ["im1", "im5"]
    assert "2 image(s) could not be read" in describe_store(path)
    assert verify_store(path).damage == []


def test_verify_names_a_lost_failed_list(tmp_path):
    path = finished_store(tmp_path, failed=[7], n=128)
    shard = next(p for p in (path / GROUP / "reason").rglob("*") if p.is_file() and p.name != "zarr.json")
    shard.unlink()
    lines = [f.message for f in verify_store(path).damage]
    assert any(f"{GROUP}/reason" in ln or "reason" in ln for ln in lines), lines
