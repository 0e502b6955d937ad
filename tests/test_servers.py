"""Smoke tests of the real servers other tests build on: SLURM, an S3 server, headless Chromium."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen within {timeout:.0f}s")
        time.sleep(0.2)


# --- SLURM ---------------------------------------------------------------------------------------

def test_sbatch_job_runs_and_leaves_the_queue(slurm, tmp_path):
    out = tmp_path / "out.txt"
    job = slurm.sbatch("--wrap", f'echo "job $SLURM_JOB_ID on $SLURMD_NODENAME" > {out}',
                       "-o", str(tmp_path / "job.log"), cwd=tmp_path)
    assert slurm.wait_until_gone([job]) == []
    assert out.read_text().split() == ["job", job, "on", slurm.node]


def test_jobs_without_mem_share_the_node(slurm, tmp_path):
    """Two 1-CPU jobs without --mem run at once: DefMemPerCPU keeps one from taking all memory."""
    if slurm.cores < 2:
        pytest.skip(f"needs a node with 2 CPUs, {slurm.node} has {slurm.cores}")
    # Each job marks itself started, then waits (bounded) for the other's mark.
    script = ('touch {d}/started-$1; for i in $(seq 300); do '
              '[ -e {d}/started-a ] && [ -e {d}/started-b ] && {{ touch {d}/met-$1; exit 0; }}; sleep 0.1; done; '
              'exit 1').format(d=tmp_path)
    jobs = [slurm.sbatch("-n", "1", "-o", str(tmp_path / f"{name}.log"), "--wrap", f"bash -c '{script}' _ {name}")
            for name in ("a", "b")]
    assert slurm.wait_until_gone(jobs) == []
    assert (tmp_path / "met-a").exists() and (tmp_path / "met-b").exists()


@pytest.mark.slow
def test_dask_jobqueue_worker_runs_a_task_and_its_job_ends(slurm, tmp_path):
    dask_jobqueue = pytest.importorskip("dask_jobqueue")
    from distributed import Client

    before = set(slurm.jobs())
    with dask_jobqueue.SLURMCluster(**slurm.jobqueue_options(tmp_path)) as cluster:
        cluster.scale(1)
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=120)
            assert client.submit(lambda: 1 + 1).result(timeout=60) == 2
            # The worker runs inside the one job this test submitted.
            (worker_job,) = client.run(lambda: os.environ.get("SLURM_JOB_ID")).values()
            ours = [j for j in slurm.jobs() if j not in before]
            assert ours == [worker_job]
            cluster.scale(0)
            _wait_for(lambda: not client.scheduler_info()["workers"], 60, "worker leaving")
    assert slurm.wait_until_gone(ours) == []


# --- S3 ------------------------------------------------------------------------------------------

def test_s3fs_puts_and_gets_an_object(s3_server):
    bucket = s3_server.new_bucket()
    fs = s3_server.filesystem()
    payload = os.urandom(3 * 2**20 + 17)  # over s3fs's multipart threshold
    with fs.open(f"{bucket}/dir/blob.bin", "wb") as f:
        f.write(payload)
    assert fs.cat(f"s3://{bucket}/dir/blob.bin") == payload
    assert fs.cat_file(f"{bucket}/dir/blob.bin", start=10, end=20) == payload[10:20]
    assert fs.ls(f"{bucket}/dir", detail=False) == [f"{bucket}/dir/blob.bin"]
    # A fresh client sees it too: the server holds the data, not a cache of the client.
    assert s3_server.filesystem().size(f"{bucket}/dir/blob.bin") == len(payload)


def test_conditional_put_refuses_an_existing_key(s3_server):
    """Put-if-absent (If-None-Match: *) works on this server, as object-store write protocols need."""
    bucket = s3_server.new_bucket()
    fs = s3_server.filesystem()
    fs.pipe_file(f"{bucket}/claim", b"first", mode="create")
    with pytest.raises(FileExistsError):
        fs.pipe_file(f"{bucket}/claim", b"second", mode="create")
    assert fs.cat(f"{bucket}/claim") == b"first"


def test_zarr_array_through_fsspec_store(s3_server):
    import zarr
    from zarr.storage import FsspecStore

    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/run/a.zarr"
    data = np.random.default_rng(0).standard_normal((10, 6)).astype("float32")
    store = FsspecStore.from_url(url, storage_options=s3_server.storage_options)
    array = zarr.create_array(store, shape=data.shape, chunks=(4, 3), dtype=data.dtype)
    array[:] = data
    back = zarr.open_array(FsspecStore.from_url(url, storage_options=s3_server.storage_options, read_only=True))
    np.testing.assert_array_equal(back[:], data)
    # One object per chunk plus the array's zarr.json: written remotely, not to a local folder.
    keys = s3_server.filesystem().find(f"{bucket}/run/a.zarr")
    assert len(keys) == 3 * 2 + 1 and not os.path.exists(f"s3:/{bucket}")


def test_zarr_reads_through_object_store(s3_server):
    pytest.importorskip("obstore")
    import zarr
    from zarr.storage import FsspecStore, ObjectStore

    bucket = s3_server.new_bucket()
    data = np.arange(24, dtype="int16").reshape(4, 6)
    zarr.create_array(ObjectStore(s3_server.obstore(bucket)), name="b", data=data, chunks=(2, 6))
    url = f"s3://{bucket}/b"
    read = zarr.open_array(FsspecStore.from_url(url, storage_options=s3_server.storage_options, read_only=True))
    np.testing.assert_array_equal(read[:], data)


# --- Chromium ------------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html><head><meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><h1>static heading</h1>
<script>
  const p = document.createElement("p");
  p.id = "made-by-js";
  p.textContent = "computed " + (6 * 7) + " at " + window.innerWidth + "px";
  document.body.appendChild(p);
</script></body></html>
"""


@pytest.mark.parametrize("width", [1280, 390])
def test_chromium_renders_script_output_at_a_viewport(chromium, tmp_path, width):
    from PIL import Image

    page = tmp_path / "page.html"
    page.write_text(PAGE)
    shot = tmp_path / f"page-{width}.png"
    dom = chromium.render(page, width=width, height=700, screenshot=shot)
    assert "static heading" in dom and "computed 42" not in PAGE
    assert f'<p id="made-by-js">computed 42 at {width}px</p>' in dom
    with Image.open(shot) as image:
        assert image.size[0] == width
        # Text was drawn: the screenshot is not one flat colour.
        assert np.unique(np.asarray(image.convert("L"))).size > 2
    with chromium.page(width=width) as live:
        live.goto(page.as_uri())
        assert live.locator("#made-by-js").inner_text() == f"computed 42 at {width}px"
