"""Clusters from config: a real `dask scheduler` + 2 `dask worker` processes vs a LocalCluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_UNET

from pipeline import store
from pipeline.cluster.client import ZARR_CONCURRENCY, get_client
from pipeline.workflow.config import ClusterConfig, load_workflow
from stages import STAGES
from pipeline.errors import ConfigError
from pipeline.workflow.runner import Runner

STAGES_YAML = """\
stages:
  - name: ex
    stage: extract
    model: {config: tiny.json, null_class: 10}
    dataset: {reader: digits, split: train, limit: 160}
    blocks: [down_blocks.1, mid_block]
    timesteps: [10, 100]
    conditioning: "null"
    unit_samples: 32
  - {name: pooled, stage: pool, input: ex, sizes: [2]}
  - name: probe
    stage: probe
    input: pooled
    output: %s
    heads:
      - {name: linear, head: {kind: linear}}
      - {name: mlp, head: {kind: mlp, hidden: 32}, train: {lr: 0.003}}
    train: {optimizer: adamw, lr: 0.01, epochs: 4}
    test_fraction: 0.25
"""


@pytest.fixture(scope="module")
def scheduler_address(tmp_path_factory):
    """`dask scheduler` and two single-thread `dask worker` processes on 127.0.0.1; always stopped."""
    folder = tmp_path_factory.mktemp("dask")
    scheduler_file = folder / "scheduler.json"
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = open(folder / "dask.log", "wb")
    procs = [subprocess.Popen(
        [bin_dir / "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
         "--scheduler-file", scheduler_file], cwd=folder, env=env, stdout=log, stderr=log)]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        procs += [subprocess.Popen(
            [bin_dir / "dask", "worker", "--scheduler-file", scheduler_file, "--nthreads", "1",
             "--host", "127.0.0.1", "--no-dashboard", "--no-nanny", "--memory-limit", "2GiB"],
            cwd=folder, env=env, stdout=log, stderr=log) for _ in range(2)]
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=90)
        yield address
    finally:
        # SIGKILL: nothing of theirs is kept, and a worker that has run torch tasks takes
        # 5-15 s to close gracefully on SIGTERM
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()
        log.close()


def _workflow(folder: Path, cluster: str, output: str) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "tiny.json").write_text(json.dumps(TINY_UNET))
    path = folder / f"wf-{output}.yaml"
    header = f"name: clustertest\noutput_dir: out\ncluster: {cluster}\n"
    path.write_text(header + STAGES_YAML % f"out/{output}.probe")
    return path


def test_probe_grid_on_dask_cli_workers_equals_local_cluster(tmp_path, scheduler_address, capsys):
    import xarray as xr

    address = f'{{kind: address, address: "{scheduler_address}"}}'
    remote = load_workflow(_workflow(tmp_path, address, "remote"), STAGES)
    Runner(remote, progress=False).run()
    local = load_workflow(_workflow(tmp_path, "{kind: local, n_workers: 2, threads_per_worker: 1}", "local"), STAGES)
    report = Runner(local, progress=False).run()
    assert report[:2] == [("ex", "skip (up to date)"), ("pooled", "skip (up to date)")]
    log = capsys.readouterr().err
    assert f"dask cluster ({scheduler_address}): 2 worker(s)" in log
    assert "dask cluster (local): 2 worker(s)" in log
    assert "dask dashboard:" in log
    a, b = (xr.open_zarr(wf.stage("probe").output).load() for wf in (remote, local))
    assert dict(a["accuracy"].sizes) == {"block": 2, "timestep": 2, "pool": 1, "head": 2}
    assert np.isfinite(a["accuracy"]).all() and (a["accuracy"] > 0.3).all()
    for name in ("accuracy", "top5", "val_accuracy", "epochs_run", "best_epoch"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    assert store.read_attrs(local.stage("probe").output)["complete"]
    # n_workers: 0: every task in this process, no dask at all; the same stores and numbers
    # (the pool stage again, into a store of its own; extract is the one already written)
    path = _workflow(tmp_path, "{kind: local, n_workers: 0}", "inproc")
    path.write_text(path.read_text().replace("sizes: [2]}", "sizes: [2], output: out/inproc-pooled.zarr}"))
    inproc = load_workflow(path, STAGES)
    assert Runner(inproc, progress=False).run()[0] == ("ex", "skip (up to date)")
    log = capsys.readouterr().err
    assert "dask cluster" not in log and "[pooled] 5 task(s) in this process" in log, log
    c = xr.open_zarr(inproc.stage("probe").output).load()
    for name in ("accuracy", "top5", "val_accuracy", "epochs_run", "best_epoch"):
        np.testing.assert_array_equal(a[name].values, c[name].values, err_msg=name)
    for key in ("blocks/mid_block/p2", "blocks/down_blocks.1/p2"):
        np.testing.assert_array_equal(xr.open_zarr(remote.stage("pooled").output, group=key)["activations"],
                                      xr.open_zarr(inproc.stage("pooled").output, group=key)["activations"])


@pytest.mark.parametrize("n_workers, started, n_tasks, nbytes, where", [
    (0, False, 50, None, "in-process"),          # n_workers: 0 always
    (2, False, 1, None, "in-process"),           # one task: nothing to spread
    (2, False, 9, 10 * 2**20, "in-process"),     # small reads
    (2, False, 9, None, "cluster"),              # unknown cost (a probe grid)
    (2, False, 9, 300 * 2**20, "cluster"),       # more than in_process_mib
    (2, True, 1, 1, "cluster"),                  # a running cluster costs nothing more
])
def test_small_work_runs_in_process_until_a_cluster_is_running(n_workers, started, n_tasks, nbytes, where):
    from pipeline.cluster.session import ClusterSession

    session = ClusterSession(ClusterConfig(kind="local", n_workers=n_workers))
    session._client = object() if started else None
    assert session.where(n_tasks, nbytes) == where
    assert ClusterSession(ClusterConfig(kind="local", in_process_mib=0)).where(1, 1) == "cluster"
    assert ClusterSession(ClusterConfig(kind="address", address="tcp://x:1")).where(1, 1) == "cluster"


def test_workers_get_the_zarr_concurrency_cap(scheduler_address):
    with get_client(ClusterConfig(kind="address", address=scheduler_address), log=lambda _: None) as client:
        def concurrency():
            import zarr

            return zarr.config.get("async.concurrency")

        assert set(client.run(concurrency).values()) == {ZARR_CONCURRENCY}


def test_cluster_config_errors_say_the_fix(monkeypatch):
    with pytest.raises(ConfigError, match="needs cluster.address"):
        with get_client(ClusterConfig(kind="address")):
            pass
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install diffprobe\[slurm\]"):
        with get_client(ClusterConfig(kind="slurm", slurm={"cores": 4})):
            pass


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_slurm_cluster_runs_the_grid_through_real_sbatch(tmp_path, slurm, capsys):
    """The `slurm` kind end to end on the real SLURM: same numbers as a local cluster, no job left."""
    import xarray as xr

    pytest.importorskip("dask_jobqueue")
    before = set(slurm.new_jobs())
    options = slurm.jobqueue_options(tmp_path, memory="2GiB", walltime="00:20:00")
    wf = load_workflow(_workflow(tmp_path, f"{{kind: slurm, n_workers: 2, slurm_wait_s: 120, "
                                           f"slurm: {json.dumps(options)}}}", "slurm"), STAGES)
    Runner(wf, progress=False).run()
    err = capsys.readouterr().err
    # one cluster for the run: pool and probe share its two worker jobs
    assert err.count("dask cluster (slurm): 2 worker job(s) submitted") == 1
    assert "dask cluster (slurm): 2 worker(s)" in err
    logs = sorted((tmp_path / "slurm-logs").glob("*.err"))
    assert len(logs) == 2
    assert slurm.wait_until_gone([j for j in slurm.new_jobs() if j not in before], timeout=60) == []
    local = load_workflow(_workflow(tmp_path, "{kind: local, n_workers: 1, threads_per_worker: 1}", "local"), STAGES)
    Runner(local, progress=False).run()
    a, b = (xr.open_zarr(w.stage("probe").output).load() for w in (wf, local))
    assert np.isfinite(a["accuracy"]).all()
    for name in ("accuracy", "top5", "val_accuracy", "epochs_run"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


def test_local_cluster_workers_may_fork_the_window_reader():
    from pipeline.store.prefetch import process_allowed

    with get_client(ClusterConfig(kind="local", n_workers=1, threads_per_worker=1), log=lambda _: None) as client:
        assert list(client.run(process_allowed).values()) == [True]


def test_streamed_probe_in_two_thread_workers_is_the_same_with_either_window_reader(tmp_path, monkeypatch):
    """A buffer far smaller than the slices: every pass streams through forked helpers (or threads)."""
    import pandas as pd
    import xarray as xr

    from pipeline.store.prefetch import BUILDER_ENV

    cluster = "{kind: local, n_workers: 1, threads_per_worker: 2}"
    results = {}
    for kind in ("process", "thread"):
        monkeypatch.setenv(BUILDER_ENV, kind)  # inherited by the worker processes
        path = _workflow(tmp_path, cluster, f"streamed-{kind}")
        path.write_text(path.read_text().replace("    test_fraction: 0.25\n",
                                                 "    test_fraction: 0.25\n    buffer_mib: 0.01\n"))
        wf = load_workflow(path, STAGES)
        Runner(wf, progress=False).run()
        out = wf.stage("probe").output
        results[kind] = xr.open_zarr(out).load()
        cells = pd.read_csv(out / "results.csv")
        slice_bytes = 160 * 2 * 16 * 2 * 2 * 2  # samples x timesteps x 16 channels x 2x2 x float16
        assert (cells["peak_buffer_bytes"] < slice_bytes / 2).all()  # the slices never sat in memory
        assert (cells["read_bytes"] > 5 * slice_bytes).all()  # streamed: read again on every pass
        results[kind + " reads"] = cells["read_bytes"].to_numpy()
    a, b = results["process"], results["thread"]
    assert np.isfinite(a["accuracy"]).all() and float(a["accuracy"].mean()) > 0.3  # chance: 0.1
    np.testing.assert_array_equal(results["process reads"], results["thread reads"])
    for name in ("accuracy", "top5", "val_accuracy", "epochs_run", "best_epoch"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
