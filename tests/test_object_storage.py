"""Stores on object storage, against a real S3 server (moto's server mode on 127.0.0.1).

Nothing here mocks the client library: s3fs/zarr talk HTTP to the server the fixture starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import write_extract_workflow

from pipeline import store
from pipeline.errors import ConfigError, StoreError
from pipeline.store import location
from pipeline.workflow.config import load_workflow
from pipeline.workflow.runner import Runner
from stages import STAGES

DIFFPROBE = [sys.executable, "-m", "pipeline.cli.commands"]
#: 2 units of 8 samples x 2 timesteps: small enough for a loaded 2-core machine.
SMALL = {"dataset": "{reader: digits, split: test, limit: 16}", "timesteps": "[10, 400]"}


def s3_workflow(folder: Path, server, url: str, with_options: bool = True, **overrides) -> Path:
    """The tiny extract workflow with ``output_dir: url`` (and the server's storage_options in it)."""
    wf = write_extract_workflow(folder, **overrides)
    head = f"output_dir: {url}"
    if with_options:
        head += "\nstorage_options: " + json.dumps(server.storage_options)
    wf.write_text(wf.read_text().replace("output_dir: out", head))
    return wf


def run_wf(path: Path, **kw):
    return Runner(load_workflow(path, STAGES), progress=False, **kw).run()


def open_remote(server, url: str):
    return zarr.open_group(location.zarr_store(location.parse(url, storage_options=server.storage_options)),
                           mode="r")


def assert_same_groups(a, b, path: str = "") -> None:
    """Every array of ``a`` equals ``b``'s (values, dtype, chunks, shards), recursively."""
    assert sorted(k for k, _ in a.arrays()) == sorted(k for k, _ in b.arrays()), path
    for name, arr in a.arrays():
        other = b[name]
        assert (arr.dtype, arr.chunks, arr.shards) == (other.dtype, other.chunks, other.shards), f"{path}/{name}"
        np.testing.assert_array_equal(arr[:], other[:], err_msg=f"{path}/{name}")
    assert sorted(k for k, _ in a.groups()) == sorted(k for k, _ in b.groups()), path
    for name, group in a.groups():
        assert_same_groups(group, b[name], f"{path}/{name}")


def bucket_text(server, bucket: str) -> str:
    fs = server.filesystem()
    return "\n".join(fs.cat_file(p).decode("latin-1") for p in fs.find(bucket))


def test_extract_on_s3_equals_local_run_and_keeps_secrets_out(tmp_path, s3_server, capfd):
    bucket = s3_server.new_bucket()
    local = write_extract_workflow(tmp_path / "local", **SMALL)
    remote = s3_workflow(tmp_path / "remote", s3_server, f"s3://{bucket}/runs/demo", **SMALL)
    assert run_wf(local) == [("ex", "run")]
    capfd.readouterr()
    assert run_wf(remote) == [("ex", "run")]
    log = capfd.readouterr().err
    # The bug: the URL once became a local folder 's3:/bucket/...'. Nothing local now.
    assert sorted(os.listdir(remote.parent)) == ["tiny_unet.json", "wf.yaml"]
    assert not (Path.cwd() / "s3:").exists()
    url = f"s3://{bucket}/runs/demo/ex.zarr"
    assert f"-> {url}" in log
    ours, theirs = zarr.open_group(str(local.parent / "out/ex.zarr"), mode="r"), open_remote(s3_server, url)
    assert_same_groups(ours, theirs)
    a, b = ours.attrs["diffprobe"], theirs.attrs["diffprobe"]
    assert b["complete"] is True and b["stage_hash"] == a["stage_hash"]  # where a store lives is not its content
    assert run_wf(remote) == [("ex", "skip (up to date)")]
    # Credentials (passed as storage_options in the workflow) never reach the store or the log.
    assert s3_server.secret not in bucket_text(s3_server, bucket)
    assert s3_server.secret not in log + capfd.readouterr().err


@pytest.mark.slow
def test_xarray_reads_the_s3_store_without_warnings_and_cli_works_on_urls(tmp_path, s3_server):
    bucket = s3_server.new_bucket()
    wf = s3_workflow(tmp_path, s3_server, f"s3://{bucket}/run", **SMALL)
    run_wf(wf)
    url = f"s3://{bucket}/run/ex.zarr"
    script = textwrap.dedent(f"""
        import json, sys, numpy as np, xarray as xr
        opts = json.loads(sys.argv[1])
        tree = xr.open_datatree({url!r}, engine="zarr", storage_options=opts)
        acts = xr.open_zarr({url!r}, group="blocks/mid_block", storage_options=opts)["activations"]
        one = acts.sel(timestep=400).values
        assert np.isfinite(one).all() and one.shape[0] == 16
        assert tree["blocks/mid_block"]["activations"].dims == ("sample", "timestep", "channel", "y", "x")
        print(str(tree["image_id"].values[0]))
    """)
    env = dict(os.environ, **s3_server.env)
    proc = subprocess.run([sys.executable, "-W", "error", "-c", script, json.dumps(s3_server.storage_options)],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()
    # The CLI takes credentials and endpoint from the environment (AWS_* here).
    inspect = subprocess.run([*DIFFPROBE, "inspect", url], capture_output=True, text=True, timeout=180, env=env)
    assert inspect.returncode == 0, inspect.stderr[-3000:]
    assert url in inspect.stdout and "mid_block" in inspect.stdout
    plan = subprocess.run([*DIFFPROBE, "plan", str(wf)], capture_output=True, text=True, timeout=180, env=env)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "unknown on object storage" in plan.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)  # three CLI processes (torch imports) on a shared 2-core machine
def test_two_shard_processes_fill_one_s3_store_and_a_killed_shard_resumes(tmp_path, s3_server):
    bucket = s3_server.new_bucket()
    overrides = {**SMALL, "unit_samples": 4}  # 4 units: shard 0 owns 0 and 2, shard 1 owns 1 and 3
    local = write_extract_workflow(tmp_path / "local", **overrides)
    # Credentials from the environment only: the workflow holds no storage_options.
    remote = s3_workflow(tmp_path / "remote", s3_server, f"s3://{bucket}/run", with_options=False, **overrides)
    env = dict(os.environ, **s3_server.env, PYTHONPATH=os.pathsep.join(sys.path))
    run = [*DIFFPROBE, "run", str(remote), "--no-progress", "--shard"]
    killed = subprocess.Popen([*run, "0/2"], env=dict(env, DIFFPROBE_FAULT_KILL_AFTER_UNITS="1"),
                              stderr=subprocess.PIPE, text=True)
    other = subprocess.Popen([*run, "1/2"], env=env, stderr=subprocess.PIPE, text=True)
    run_wf(local)  # meanwhile
    assert other.wait(timeout=280) == 0, other.stderr.read()[-3000:]
    assert killed.wait(timeout=280) == -signal.SIGKILL, killed.stderr.read()[-3000:]
    url = f"s3://{bucket}/run/ex.zarr"
    out = location.parse(url, storage_options=s3_server.storage_options)
    status = store.unit_status(out)
    assert status.tolist() == [True, True, False, True]  # units 0, 2 are shard 0's; it died after unit 0
    assert store.read_attrs(out)["complete"] is False
    resumed = subprocess.run([*run, "0/2"], env=env, capture_output=True, text=True, timeout=280)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume" in resumed.stderr
    assert store.read_attrs(out)["complete"] is True
    assert_same_groups(zarr.open_group(str(local.parent / "out/ex.zarr"), mode="r"), open_remote(s3_server, url))
    assert not s3_server.filesystem().exists(f"{bucket}/run/.ex.zarr.finalize-claim")


def test_racing_schema_creation_on_s3_gives_one_store(s3_server):
    """Put-if-absent of the root zarr.json is the commit point: every racer ends with the same store."""
    bucket = s3_server.new_bucket()
    path = location.parse(f"s3://{bucket}/race.zarr", storage_options=s3_server.storage_options)
    layout = store.make_layout(16, {"b": (2, 2, 2)}, [1, 2], unit_samples=8)
    samples = store.SampleTable([f"im{i}" for i in range(16)], [0] * 16, [False] * 16, [i % 2 for i in range(16)])
    errors, barrier = [], threading.Barrier(4)

    def create(i):
        try:
            barrier.wait()
            store.create_store(path, layout, samples, ["a", "b"], {"stage": "extract", "stage_hash": "h", "who": i})
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    winner = store.read_attrs(path)["who"]
    assert winner in range(4)
    root = store.open_root(path, mode="r+")
    store.write_unit(root, layout, 0, {"b": np.ones((8, 2, 2, 2, 2), np.float16)})
    store.write_unit(root, layout, 1, {"b": np.full((8, 2, 2, 2, 2), 2, np.float16)})
    assert store.finalize(path)
    stamped = store.read_attrs(path)
    assert stamped["complete"] is True and stamped["who"] == winner
    values = store.open_root(path)["blocks/b/activations"][:]
    assert (values[:8] == 1).all() and (values[8:] == 2).all()


def test_one_finalize_claim_at_a_time_and_a_stale_one_is_taken_over(s3_server):
    bucket = s3_server.new_bucket()
    path = location.parse(f"s3://{bucket}/x.zarr", storage_options=s3_server.storage_options)
    first = location.claim_finalize(path)
    assert first is not None and location.claim_finalize(path) is None
    held = json.loads(first.read_bytes())
    first.write_bytes(json.dumps(held | {"time": held["time"] - location.STALE_CLAIM_S - 1}).encode())
    assert location.claim_finalize(path) is not None  # its owner is presumed dead


def test_missing_backend_and_unknown_scheme_are_one_line_errors(tmp_path):
    import importlib.util

    # the first of these whose backend is not installed here (gcsfs, adlfs, ossfs)
    missing = [s for s, m in (("gs", "gcsfs"), ("az", "adlfs"), ("oss", "ossfs")) if importlib.util.find_spec(m) is None]
    if not missing:
        pytest.skip("gcsfs, adlfs and ossfs are all installed here")
    scheme = missing[0]
    wf = write_extract_workflow(tmp_path)
    wf.write_text(wf.read_text().replace("output_dir: out", f"output_dir: {scheme}://bucket/run"))
    with pytest.raises(ConfigError, match=rf"{scheme}://bucket/run: the fsspec backend for {scheme}:// is not "
                                          r"installed .*pip install 'diffprobe\[cloud\]'"):
        load_workflow(wf, STAGES)
    wf.write_text(wf.read_text().replace(f"{scheme}://", "nosuch://"))
    with pytest.raises(ConfigError, match="unknown URL scheme nosuch://"):
        load_workflow(wf, STAGES)


def test_memory_urls_and_local_paths_are_the_same_kind_of_location(tmp_path):
    wf = write_extract_workflow(tmp_path)
    wf.write_text(wf.read_text().replace("output_dir: out", "output_dir: memory://diffprobe-test/run"))
    workflow = load_workflow(wf, STAGES)
    assert str(workflow.stage("ex").output) == "memory://diffprobe-test/run/ex.zarr"
    assert location.is_remote(workflow.stage("ex").output)
    assert location.parse("out", tmp_path) == tmp_path / "out"
    assert location.parse("file:///tmp/x") == Path("/tmp/x")


PIPELINE = """\
name: s3demo
output_dir: {url}
storage_options: {options}
cluster: {{kind: local, n_workers: 1, threads_per_worker: 1, memory_limit: 2GiB, dashboard: false}}
stages:
  - name: ex
    stage: extract
    model: {{config: tiny_unet.json, null_class: 10}}
    dataset: {{reader: digits, split: test, limit: 40}}
    blocks: [mid_block, up_blocks.0]
    timesteps: [10, 400]
    conditioning: class
    batch_size: 8
    unit_samples: 8
  - {{name: pooled, stage: pool, input: ex, sizes: [1, 2]}}
  - name: probe
    stage: probe
    input: pooled
    heads: [{{name: linear, head: {{kind: linear}}}}]
    train: {{epochs: 2}}
  - {{name: cka, stage: cka, selections: [{{input: ex}}]}}
  - name: cls
    stage: classify
    model: {{config: tiny_unet.json, null_class: 10}}
    dataset: {{reader: digits, split: test, limit: 6}}
    n_timesteps: 2
    batch_size: 16
  - {{name: report, stage: report, inputs: [probe, cka, cls]}}
"""


@pytest.mark.slow
@pytest.mark.timeout(900)  # six stages, a dask worker process, on a shared 2-core machine
def test_demo_like_workflow_runs_with_output_dir_on_s3(tmp_path, s3_server, capfd):
    from helpers import TINY_UNET

    from pipeline.cka.results import open_cka
    from pipeline.probing.results import open_results
    from pipeline.dc import rescore

    bucket = s3_server.new_bucket()
    (tmp_path / "tiny_unet.json").write_text(json.dumps(TINY_UNET))
    wf = tmp_path / "wf.yaml"
    wf.write_text(PIPELINE.format(url=f"s3://{bucket}/run", options=json.dumps(s3_server.storage_options)))
    report = run_wf(wf)
    assert [action for _, action in report] == ["run"] * 6
    assert sorted(os.listdir(tmp_path)) == ["tiny_unet.json", "wf.yaml"]
    workflow = load_workflow(wf, STAGES)
    out = {e.name: e.output for e in workflow.stages}
    for name in ("ex", "pooled", "probe", "cka", "cls", "report"):
        assert store.read_attrs(out[name])["complete"] is True, name
    probe = open_results(out["probe"])
    assert np.isfinite(probe["accuracy"].values).sum() == 2 * 2 * 2  # blocks x timesteps x pools, one head
    cka = open_cka(out["cka"]).values
    np.testing.assert_allclose(np.diag(cka), 1.0, atol=1e-6)
    scored = rescore.score_store(out["cls"], None, None, None, "uniform")
    assert scored["n_samples"] == 6
    page = (out["report"] / "index.html").read_text()
    assert 'id="findings"' in page and 'src="data:image/svg+xml;base64,' in page  # figures embedded
    assert (out["report"] / "findings.json").exists()
    assert s3_server.secret not in bucket_text(s3_server, bucket) + page + capfd.readouterr().err
    assert run_wf(wf) == [(name, "skip (up to date)") for name in out]


# ----------------------------------------------------------------- verify / repair / diff on S3

REMOTE_SHARD = "blocks/mid_block/activations/c/1/0/0/0/0"  # unit 1 = samples 4..7 with units of 4


def object_stamps(fs, url: str) -> dict[str, tuple]:
    """``{key: (LastModified, ETag)}`` of every data shard under a remote store (no mtimes on S3)."""
    base = url.removeprefix("s3://")
    fs.invalidate_cache()
    return {p[len(base) + 1:]: (info["LastModified"], info["ETag"])
            for p, info in fs.find(base, detail=True).items() if "/activations/c/" in p}


def test_verify_names_damage_on_s3_and_repair_recomputes_only_that_unit(tmp_path, s3_server, monkeypatch):
    import time

    from click.testing import CliRunner

    from pipeline.cli.commands import main

    bucket = s3_server.new_bucket()
    overrides = {**SMALL, "unit_samples": 4, "blocks": "[mid_block]"}
    local = write_extract_workflow(tmp_path / "local", **overrides)
    remote = s3_workflow(tmp_path / "remote", s3_server, f"s3://{bucket}/run", **overrides)
    run_wf(local)
    run_wf(remote)
    url, fs = f"s3://{bucket}/run/ex.zarr", s3_server.filesystem()
    for name, value in s3_server.env.items():  # the CLI finds endpoint and credentials in the environment
        monkeypatch.setenv(name, value)
    cli = CliRunner()
    ok = cli.invoke(main, ["verify", url])
    assert ok.exit_code == 0 and ok.output.startswith(f"ok: {url} (extract), "), ok.output
    assert cli.invoke(main, ["diff", str(local.parent / "out/ex.zarr"), url]).exit_code == 0

    shard = f"{bucket}/run/ex.zarr/{REMOTE_SHARD}"
    data = bytearray(fs.cat_file(shard))
    data[40] ^= 0xFF
    fs.pipe_file(shard, bytes(data))
    fs.rm(f"{bucket}/run/ex.zarr/blocks/mid_block/activations/c/3/0/0/0/0")  # unit 3
    result = cli.invoke(main, ["verify", url])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("damaged") and "block 'mid_block' chunk (1, 0, 0, 0, 0) (samples 4..7, timestep 10)"
               in line and REMOTE_SHARD in line and "fails its crc32c checksum" in line for line in lines), "\n".join(lines)
    assert any(line.startswith("missing") and "block 'mid_block' samples 12..15, all timesteps: "
               "blocks/mid_block/activations/c/3/0/0/0/0 is missing" in line for line in lines), "\n".join(lines)
    assert lines[-1] == f"2 problem(s) in {url}; 'diffprobe verify {url} --repair' marks them for recomputation"
    # A reader refuses the done unit whose shard is gone, as on local disk.
    with pytest.raises(StoreError, match=r"has no data for samples 12\.\.15, all timesteps"):
        from pipeline.store.checks import Integrity

        path = location.parse(url, storage_options=s3_server.storage_options)
        Integrity(store.open_root(path), path).check_present()

    before = object_stamps(fs, url)
    repaired = cli.invoke(main, ["verify", url, "--repair"])
    assert repaired.exit_code == 0, repaired.output
    assert "repair      samples 4..7: marked pending" in repaired.output
    assert "repair      samples 12..15: marked pending" in repaired.output
    out = location.parse(url, storage_options=s3_server.storage_options)
    assert store.unit_status(out).tolist() == [True, False, True, False]
    assert store.read_attrs(out)["complete"] is False
    time.sleep(1.1)  # S3's LastModified has one-second resolution
    assert run_wf(remote) == [("ex", "resume")]
    after = object_stamps(fs, url)
    redone = {k for k in after if "/c/1/" in k or "/c/3/" in k}
    assert all(after[k][0] > before.get(k, (after[k][0].replace(year=2000),))[0] for k in redone)
    assert {k: v for k, v in after.items() if k not in redone} == \
        {k: v for k, v in before.items() if k not in redone}  # units 0 and 2: not rewritten
    assert cli.invoke(main, ["verify", url]).exit_code == 0
    same = cli.invoke(main, ["diff", str(local.parent / "out/ex.zarr"), url])
    assert same.exit_code == 0 and same.output.splitlines()[-1] == "identical within atol=0, rtol=0", same.output


def test_a_schema_committed_between_the_two_reads_is_not_called_foreign(monkeypatch):
    """Two shard processes start together: the other one PUTs its root zarr.json (the commit,
    attrs inside) at any moment of this one's requests. The output is then missing (this
    process builds the schema, and keeps the other's) or the other's partial store (resumed
    into), never a foreign folder."""
    from pipeline.workflow import runner

    class Prefix:  # an S3 prefix whose schema is committed after `after` requests
        def __init__(self, after):
            self.asked, self.after = 0, after

        def committed(self):
            self.asked += 1
            return self.asked > self.after

        def exists(self):
            return self.committed()

        def __truediv__(self, name):
            return types.SimpleNamespace(exists=self.exists)

    monkeypatch.setattr(runner, "is_remote", lambda path: True)
    monkeypatch.setattr(runner, "read_attrs",
                        lambda path: {"stage_hash": "h", "complete": False} if path.committed() else None)
    for after in range(4):
        assert runner.output_state(Prefix(after), "h").status in ("missing", "partial")
    assert runner.output_state(Prefix(0), "h").status == "partial"
