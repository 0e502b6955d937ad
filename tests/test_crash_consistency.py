"""Crash consistency as a property: kill -9 a `diffprobe run` (extract, then probe and cka)
at seeded random moments, once inside finalize, and at seeded named points of the probe
and cka results writes (a task's cache save, the results Dataset, its consolidation, its
stamp); resume each time, and every output equals one uninterrupted run bit for bit; no
unit or saved task done before a kill is rewritten (mtimes); nothing is left behind
(temp folders, lock files, leases)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline import store
from pipeline.workflow.config import load_workflow
from pipeline.workflow.runner import Runner
from stages import STAGES

#: Every interrupted run also SIGKILLs itself when finalize starts consolidating metadata
#: (pipeline/faults.py's named kill point; a store is consolidated once at creation too,
#: so patching zarr.consolidate_metadata would kill the run before its first unit).
KILL_IN_FINALIZE = {"DIFFPROBE_FAULT_KILL_AT": "finalize:consolidate"}
UNIT_DELAY = 0.4  # seconds before each unit in the runs killed at a random moment
PARAMS = {"dataset": "{reader: digits, split: test, limit: 20}", "blocks": "[mid_block, up_blocks.0]",
          "timesteps": "[10, 300]", "unit_samples": 4, "batch_size": 4}
#: The dask stages after extract: their tasks run on the test's own cluster (threads of
#: this process: a killed client leaves its workers, as on SLURM, and no run pays a cluster start).
RESULTS_STAGES = """\
  - {name: pr, stage: probe, input: ex, heads: [{name: linear}], train: {epochs: 2}}
  - {name: ck, stage: cka, selections: [{input: ex}]}
"""
RESULTS_KILLS_PER_STAGE = 2  # seeded points of pipeline.faults.RESULTS_KILL_POINTS, per stage


def diffprobe(wf: Path, env: dict | None = None) -> subprocess.Popen:
    head = [sys.executable, "-m", "pipeline.cli.commands", "run"]
    return subprocess.Popen([*head, str(wf), "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, bufsize=1, env=dict(os.environ, **(env or {})))


def done_units(out: Path) -> int:
    return int(store.unit_status(out).sum()) if (out / "zarr.json").exists() else 0


def kill_at_random_moment(proc: subprocess.Popen, out: Path, done_before: int, rng: random.Random) -> bool:
    """SIGKILL ``proc`` a random time after a random number of further units are done
    (progress, not a clock: start-up and machine load vary). False if it died first."""
    target = done_before + rng.randint(0, max(0, 5 - done_before - 1))
    while proc.poll() is None:
        try:
            if done_units(out) >= target:
                break
        except Exception:  # noqa: BLE001, S110 -- read while the store is being created or written
            pass
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 1.2 * UNIT_DELAY))
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    return True


def wait_for_units(proc: subprocess.Popen) -> None:
    """Return when the stage starts its units (model loaded, the clock for a kill starts)."""
    for line in proc.stderr:
        if "to do" in line:
            return


def shard_mtimes(out: Path) -> dict[Path, int]:
    """Shard files of the units marked done, with their mtimes."""
    if not (out / "zarr.json").exists():
        return {}
    done = np.flatnonzero(store.unit_status(out))
    files = {}
    for u in done:
        for block in ("mid_block", "up_blocks.0"):
            shard = out / "blocks" / block / "activations" / "c" / str(u) / "0" / "0" / "0" / "0"
            files[shard] = shard.stat().st_mtime_ns
    return files


def task_mtimes(folder: Path) -> dict[Path, int]:
    """Saved task results of the probe and cka outputs, with their mtimes."""
    return {p: p.stat().st_mtime_ns for name in ("pr.probe", "ck.cka") for p in (folder / name / "tasks").glob("*.json")}


def results(folder: Path) -> dict[str, np.ndarray]:
    """The probe and cka results' variables (not the probe's train_time_s: a clock)."""
    import xarray as xr

    out = {}
    for name in ("pr.probe", "ck.cka"):
        ds = xr.open_zarr(folder / name)
        out |= {f"{name}/{v}": ds[v].values for v in ds.data_vars if v != "train_time_s"}
    return out


def with_results_stages(wf: Path, address: str) -> Path:
    text = wf.read_text().replace("output_dir: out\n", f"output_dir: out\ncluster: {{kind: address, address: {address}}}\n")
    wf.write_text(text + RESULTS_STAGES)
    return wf


@pytest.fixture(scope="module")
def tcp_cluster():
    """A dask cluster in this process that the `diffprobe run` subprocesses reach over TCP."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address=":0", scheduler_kwargs={"dashboard": False}) as cluster:
        yield cluster.scheduler_address


def arrays(out: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(out), mode="r")
    names = ["done", "failure", "image_id", "view", "label", "timestep"]
    names += [f"blocks/{b}/activations" for b in ("mid_block", "up_blocks.0")]
    return {n: root[n][:] for n in names}


@pytest.mark.slow
@pytest.mark.timeout(1200)  # eleven process starts: about a minute on a quiet machine, far more on a loaded one
def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(extract_workflow, tcp_cluster):
    from pipeline.faults import RESULTS_KILL_POINTS

    ref_wf = with_results_stages(extract_workflow("ref", **PARAMS), tcp_cluster)
    wf = with_results_stages(extract_workflow("crashy", **PARAMS), tcp_cluster)
    # the uninterrupted reference runs in this process: only the runs that are killed need one of their own
    Runner(load_workflow(ref_wf, STAGES), progress=False).run()
    out = wf.parent / "out/ex.zarr"
    rng = random.Random(13)
    kills = []  # (how, units done before, units done after)
    # Every interrupted run also dies when it reaches finalize (KILL_IN_FINALIZE), so the
    # store completes only in the last, clean run. Six seeded kills: half at a random
    # moment of a run slowed to ~UNIT_DELAY per unit (so the moment falls in a unit's
    # compute or in the writer thread's write of the one before), half after a random
    # number of written units; a seventh run dies in finalize if none did yet.
    for attempt in range(7):
        if attempt == 6 and any(how == "in finalize" for how, _, _ in kills):
            break  # a kill already landed in finalize
        done_before = done_units(out)
        before = shard_mtimes(out)
        if attempt % 2:
            env = {"DIFFPROBE_FAULT_KILL_AFTER_UNITS": str(rng.randint(1, 2))}
        else:
            env = {"DIFFPROBE_FAULT_UNIT_DELAY": str(UNIT_DELAY)} if attempt < 6 else {}
        proc = diffprobe(wf, KILL_IN_FINALIZE | env)
        wait_for_units(proc)
        killed_here = "DIFFPROBE_FAULT_UNIT_DELAY" in env and kill_at_random_moment(proc, out, done_before, rng)
        proc.wait(timeout=240)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
        after = shard_mtimes(out)
        assert {p: after[p] for p in before} == before, f"kill {attempt}: a done unit was rewritten"
        done_after = done_units(out)
        if killed_here:
            how = "random moment"
        elif "DIFFPROBE_FAULT_KILL_AFTER_UNITS" in env and \
                done_after - done_before == int(env["DIFFPROBE_FAULT_KILL_AFTER_UNITS"]):
            how = "after units"
        else:
            how = "in finalize"  # the only other way it dies
        kills.append((how, done_before, done_after))
    # Then kills in the probe and cka results writes, at seeded named points (probe's
    # first: a run killed in cka has finished probe); extract is finished by the first.
    points = [f"{stage}:{p}" for stage in ("probe", "cka")
              for p in sorted(rng.sample(RESULTS_KILL_POINTS, RESULTS_KILLS_PER_STAGE), key=RESULTS_KILL_POINTS.index)]
    for point in points:
        before, tasks_before = shard_mtimes(out), task_mtimes(out.parent)
        proc = diffprobe(wf, {"DIFFPROBE_FAULT_KILL_AT": point})
        proc.wait(timeout=240)
        assert proc.returncode == -signal.SIGKILL, f"{point}: {proc.stderr.read()}"
        assert {p: shard_mtimes(out)[p] for p in before} == before
        after = task_mtimes(out.parent)
        assert {p: after[p] for p in tasks_before} == tasks_before, f"kill at {point}: a saved task was rewritten"
        kills.append((point, len(tasks_before), len(after)))
    print("kills:", kills)
    before, tasks_before = shard_mtimes(out), task_mtimes(out.parent)
    Runner(load_workflow(wf, STAGES), progress=False).run()  # the clean resume: in this process too
    assert {p: shard_mtimes(out)[p] for p in before} == before
    assert {p: task_mtimes(out.parent)[p] for p in tasks_before} == tasks_before
    assert store.read_attrs(out)["complete"] is True, kills
    got, want = arrays(out), arrays(ref_wf.parent / "out/ex.zarr")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert zarr.open_group(str(out), mode="r", use_consolidated=True) is not None  # consolidated
    got, want = results(out.parent), results(ref_wf.parent / "out")
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    for name in ("pr.probe", "ck.cka"):
        assert store.read_attrs(out.parent / name)["complete"] is True
    outputs = ("ex.zarr", "pr.probe", "ck.cka")
    leftovers = [p.name for p in out.parent.iterdir() if p.name not in outputs]
    leftovers += [str(p) for name in outputs for p in (out.parent / name).rglob("*")
                  if p.name.endswith((".tmp", ".lock", ".partial")) or ".tmp-" in p.name]
    assert leftovers == [], leftovers
    hows = {how for how, _, _ in kills}
    assert "random moment" in hows and "in finalize" in hows, kills
