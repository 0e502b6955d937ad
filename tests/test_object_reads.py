"""Reading from object storage: streamed probe slices, dataset roots and model folders on a real
S3 server (moto's server mode on 127.0.0.1), each against the same bytes read locally.

Nothing mocks the client library: s3fs / obstore talk HTTP to the server; request counts come
from the server's own log.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import TINY_UNET, synthetic_store
from test_datasets import cub_root, write_image, write_text  # noqa: F401 -- cub_root is a fixture

from pipeline.datasets import READERS, open_dataset
from pipeline.datasets.base import DatasetConfig
from pipeline.store import location
from pipeline.store.source import ZarrSource


def upload(server, local, bucket: str, prefix: str) -> str:
    """Copy the folder ``local`` to ``s3://bucket/prefix``; returns the URL."""
    fs = server.filesystem()
    local = Path(local)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    fs.put([str(p) for p in files], [f"{bucket}/{prefix}/{p.relative_to(local).as_posix()}" for p in files])
    return f"s3://{bucket}/{prefix}"


def url_text(server, url: str) -> location.URLText:
    """What a workflow's config holds for a URL in a path field (with the workflow's storage_options)."""
    return location.URLText(url, server.storage_options)


def batches(source: ZarrSource, n: int) -> list:
    return list(source.iter_batches(np.arange(n), 32, keys=["t2"], shuffle=True, seed=3, epoch=1))


def test_streamed_slices_from_s3_equal_local_through_obstore_and_s3fs(tmp_path, s3_server, monkeypatch):
    bucket = s3_server.new_bucket("stream")
    local, array = synthetic_store(tmp_path / "p.zarr", n=512, channels=16, p=4)
    remote = location.parse(upload(s3_server, local, bucket, "p.zarr"), storage_options=s3_server.storage_options)
    with ZarrSource([(local, array)], [2], buffer_bytes=64 << 10) as source:  # slice 512 KiB: streamed
        expected = batches(source, 512)
    assert len(expected) == 16
    for reader, kind in (("obstore", zarr.storage.ObjectStore), ("fsspec", zarr.storage.FsspecStore)):
        monkeypatch.setenv(location.READER_ENV, reader)
        assert isinstance(location.zarr_store(remote, read_only=True), kind)
        with ZarrSource([(remote, array)], [2], buffer_bytes=64 << 10) as source:
            got = batches(source, 512)
        assert len(got) == len(expected), reader
        for (x, y), (ex, ey) in zip(got, expected):
            np.testing.assert_array_equal(x["t2"], ex["t2"], err_msg=reader)
            np.testing.assert_array_equal(y, ey, err_msg=reader)


def test_obstore_reads_with_credentials_from_the_environment_and_falls_back_to_s3fs(tmp_path, s3_server,
                                                                                   monkeypatch):
    bucket = s3_server.new_bucket("creds")
    local, array = synthetic_store(tmp_path / "p.zarr", n=64, channels=4, p=2)
    url = upload(s3_server, local, bucket, "p.zarr")
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    bare = location.parse(url, storage_options={"endpoint_url": s3_server.endpoint_url})  # no key in the options
    reader = location.zarr_store(bare, read_only=True)
    assert isinstance(reader, zarr.storage.ObjectStore)
    np.testing.assert_array_equal(zarr.open_group(reader, mode="r")[array][:],
                                  zarr.open_group(str(local), mode="r")[array][:])
    # an option obstore has no equivalent for: s3fs reads it (no request is made to decide)
    odd = location.parse(url, storage_options={**s3_server.storage_options, "requester_pays": True})
    assert isinstance(location.zarr_store(odd, read_only=True), zarr.storage.FsspecStore)
    assert location.obstore_options({"key": "k", "secret": "s", "client_kwargs": {"region_name": "r"},
                                     "endpoint_url": "http://h:1"}) == {
        "config": {"access_key_id": "k", "secret_access_key": "s", "region": "r", "endpoint": "http://h:1"},
        "client_options": {"allow_http": True}}
    # writes always go through s3fs (its conditional puts carry the write protocol)
    assert isinstance(location.zarr_store(bare), zarr.storage.FsspecStore)
    # AWS itself with no region known: s3fs, which follows a bucket's region redirect
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-such-config"))
    aws = location.parse("s3://some-bucket/x.zarr", storage_options={"key": "k", "secret": "s"})
    assert isinstance(location.zarr_store(aws, read_only=True), zarr.storage.FsspecStore)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert isinstance(location.zarr_store(aws, read_only=True), zarr.storage.ObjectStore)


def imagefolder(root, per_class: int):
    for c, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        for i in range(per_class):
            write_image(root / c / f"{i:02d}.png", color=color, size=(20 + i, 16))
        write_image(root / c / "deeper" / "x.jpg", color=color)  # nested images count (rglob)
    (root / "dog" / "notes.txt").write_text("not an image")


def same_reader(local_reader, remote_reader) -> None:
    assert remote_reader.class_names == local_reader.class_names
    assert [(r.image_id, r.label, r.bbox) for r in remote_reader.records] == \
        [(r.image_id, r.label, r.bbox) for r in local_reader.records]
    for a, b in zip(local_reader.records, remote_reader.records):
        try:
            pixels = np.asarray(local_reader.load_image(a))
        except Exception as exc:  # noqa: BLE001 -- a damaged image must fail remotely alike
            with pytest.raises(type(exc)):
                remote_reader.load_image(b)
            continue
        np.testing.assert_array_equal(np.asarray(remote_reader.load_image(b)), pixels, err_msg=a.image_id)


def test_dataset_roots_on_s3_read_as_local_with_one_listing_per_folder(tmp_path, s3_server, cub_root):  # noqa: F811
    bucket = s3_server.new_bucket("data")
    requests = {}
    for per_class in (2, 5):
        local = tmp_path / f"folder{per_class}"
        imagefolder(local, per_class)
        url = upload(s3_server, local, bucket, f"folder{per_class}")
        offset = s3_server.log_offset()
        remote = open_dataset(DatasetConfig(reader="imagefolder", root=url_text(s3_server, url), split="all"))
        requests[per_class] = s3_server.requests_since(offset)
        same_reader(open_dataset(DatasetConfig(reader="imagefolder", root=str(local), split="all")), remote)
        assert len(remote) == 2 * (per_class + 1)
    # listing costs the same whatever the number of images: one listing per folder, none per file
    assert len(requests[2]) == len(requests[5]) <= 6, requests[5]
    assert not any(line.startswith("HEAD") for line in requests[5]), requests[5]
    offset = s3_server.log_offset()
    for record in remote.records:
        remote.load_image(record)
    reads = s3_server.requests_since(offset)
    assert len(reads) == len(remote.records) and all(r.startswith("GET ") for r in reads), reads  # one GET each

    cub = upload(s3_server, cub_root, bucket, "cub")
    for split in ("train", "test"):
        same_reader(open_dataset(DatasetConfig(reader="cub", root=str(cub_root), split=split)),
                    open_dataset(DatasetConfig(reader="cub", root=url_text(s3_server, cub), split=split)))



@pytest.mark.parametrize("reader", sorted(set(READERS) - {"digits", "imagefolder"}))
def test_every_reader_reads_its_native_layout_from_s3_as_from_disk(reader, tmp_path, s3_server):
    from fake_datasets import make_dataset

    root = make_dataset(reader, tmp_path / reader)
    bucket = s3_server.new_bucket(reader)
    url = upload(s3_server, tmp_path / reader, bucket, reader)
    rel = root.relative_to(tmp_path / reader).as_posix()
    remote_root = url if rel == "." else f"{url}/{rel}"
    for split in READERS[reader].splits:
        same_reader(open_dataset(DatasetConfig(reader=reader, root=str(root), split=split)),
                    open_dataset(DatasetConfig(reader=reader, root=url_text(s3_server, remote_root), split=split)))


def test_a_model_folder_and_a_config_json_on_s3_load_as_local(tmp_path, s3_server):
    import torch

    from pipeline.models import ModelConfig, load_model
    from pipeline.models.fingerprint import model_fingerprint

    bucket = s3_server.new_bucket("models")
    config = tmp_path / "cfg" / "unet.json"
    config.parent.mkdir()
    config.write_text(json.dumps(TINY_UNET))
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    folder = tmp_path / "tiny"
    UNet2DModel(**TINY_UNET).save_pretrained(folder / "unet")  # a pipeline folder: unet/ (+ scheduler/)
    config_url = upload(s3_server, config.parent, bucket, "cfg") + "/unet.json"
    folder_url = upload(s3_server, folder, bucket, "tiny")
    for local, remote in ((ModelConfig(config=str(config), seed=4), ModelConfig(config=url_text(s3_server, config_url), seed=4)),
                          (ModelConfig(path=str(folder), null_class=10),
                           ModelConfig(path=url_text(s3_server, folder_url), null_class=10))):
        a, b = load_model(local), load_model(remote)
        for (name, p), (_, q) in zip(a.module.state_dict().items(), b.module.state_dict().items()):
            assert torch.equal(p, q), name
        assert model_fingerprint(remote) == model_fingerprint(local)  # the hash does not see where it lives
        recorded = b.source.get("path") or b.source.get("config")
        assert recorded == str(remote.path or remote.config) and recorded.startswith("s3://")
    with pytest.raises(Exception, match="does not exist"):
        load_model(ModelConfig(path=url_text(s3_server, f"s3://{bucket}/nothing-here")))


def test_extract_with_dataset_root_and_model_config_on_s3_equals_the_local_run(tmp_path, s3_server):
    from helpers import write_extract_workflow
    from test_object_storage import assert_same_groups, run_wf

    from pipeline import store

    bucket = s3_server.new_bucket("inputs")
    images = tmp_path / "images"
    imagefolder(images, 3)
    write_extract_workflow(tmp_path / "cfg")  # writes tiny_unet.json
    data_url = upload(s3_server, images, bucket, "images")
    model_url = upload(s3_server, tmp_path / "cfg", bucket, "cfg") + "/tiny_unet.json"
    runs = {}
    for side, data, model in (("local", images, tmp_path / "cfg" / "tiny_unet.json"), ("s3", data_url, model_url)):
        wf = write_extract_workflow(tmp_path / side, dataset=f"{{reader: imagefolder, root: {data}, split: all}}",
                                    model=f"{{config: {model}, null_class: 10}}", timesteps="[10]",
                                    blocks="[mid_block]")
        wf.write_text(wf.read_text().replace("output_dir: out", "output_dir: out\nstorage_options: "
                                             + json.dumps(s3_server.storage_options)))
        run_wf(wf)
        runs[side] = tmp_path / side / "out" / "ex.zarr"
    assert_same_groups(zarr.open_group(str(runs["local"]), mode="r"), zarr.open_group(str(runs["s3"]), mode="r"))
    attrs = store.read_attrs(runs["s3"])
    assert attrs["config"]["dataset"]["root"] == data_url and attrs["config"]["model"]["config"] == model_url
    assert attrs["provenance"]["model"]["source"]["config"] == model_url
    text = (runs["s3"] / "zarr.json").read_text()
    assert s3_server.secret not in text and s3_server.key not in text


#: A credential that must never show in a location's text, a workflow's hash or a log line.
FAKE_SECRET = "diffprobe-fake-secret-NEVER-LOG"


@pytest.mark.parametrize("url, options, backend", [
    ("gs://bucket/runs/x.zarr", {"token": {"type": "authorized_user", "client_id": "id", "client_secret": FAKE_SECRET,
                                          "refresh_token": "r"}, "project": "p"}, "gcsfs"),
    ("az://container/runs/x.zarr", {"account_name": "acct", "account_key": FAKE_SECRET}, "adlfs"),
])
def test_gcs_and_azure_urls_reach_their_backend_with_the_options_and_never_show_them(url, options, backend,
                                                                                     tmp_path, capfd):
    """No network: the backends are only constructed (gcsfs / adlfs from PyPI, when installed)."""
    pytest.importorskip(backend)
    from helpers import write_extract_workflow

    from pipeline.workflow.config import load_workflow
    from pipeline.workflow.runner import Runner
    from stages import STAGES

    where = location.parse(location.URLText(url, options))
    assert type(where.fs).__module__.split(".")[0] == backend
    assert {k: where.fs.storage_options.get(k) for k in options} == options
    zstore = location.zarr_store(where, read_only=True)  # obstore only for s3://
    assert isinstance(zstore, zarr.storage.FsspecStore) and type(zstore.fs).__module__.split(".")[0] == backend
    wf = write_extract_workflow(tmp_path)
    wf.write_text(wf.read_text().replace("output_dir: out", f"output_dir: {url.rsplit('/', 1)[0]}\n"
                                         f"storage_options: {json.dumps(options)}"))
    workflow = load_workflow(wf, STAGES)
    entry = workflow.stages[0]
    assert str(entry.output).startswith(url.partition("://")[0] + "://")
    runner = Runner(workflow, progress=False)
    text = " ".join([str(entry.output), repr(entry.output), repr(workflow), runner._hash(entry),
                     json.dumps(runner.identities.get(entry.name, {}), default=str)])
    assert FAKE_SECRET not in text + capfd.readouterr().err




def test_dogs_boxes_are_the_union_of_its_voc_objects_and_read_in_one_batch_from_s3(tmp_path, s3_server):
    """Stanford Dogs' one XML per image: the record's box encloses every annotated dog
    (VOC corners are 1-based inclusive), an image without a file has none, and on S3 the
    files arrive through one batched ``cat`` (concurrent GETs), not a HEAD + GET each."""
    from fake_datasets import make_dataset

    from pipeline.datasets.annotations import matlab_box

    root = make_dataset("dogs", tmp_path / "dogs")
    local = open_dataset(DatasetConfig(reader="dogs", root=str(root), split="train"))
    by_id = {r.image_id: r.bbox for r in local.records}
    k1 = "Images/n02085620-Chihuahua/n02085620_train1.jpg"
    assert by_id[k1] == matlab_box(2, 1, 12, 10)  # union of (2, 2, 9, 10) and (3, 1, 12, 8)
    assert by_id["Images/n02085620-Chihuahua/n02085620_train0.jpg"] is None
    bucket = s3_server.new_bucket("dogs")
    url = upload(s3_server, root, bucket, "dogs")
    mark = s3_server.log_offset()
    remote = open_dataset(DatasetConfig(reader="dogs", root=url_text(s3_server, url), split="train"))
    assert [(r.image_id, r.bbox) for r in remote.records] == [(r.image_id, r.bbox) for r in local.records]
    requests = s3_server.requests_since(mark)
    # one listing of Annotation/, then one GET per file
    assert sum("Annotation" in line for line in requests) == 1 + sum(b is not None for b in by_id.values())
    assert not [line for line in requests if line.startswith("HEAD") and "Annotation" in line]
