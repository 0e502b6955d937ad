"""Leases on object storage and fencing (pipeline/workflow/claims.py), against the real moto S3 server.

The lease protocol is the same on a folder and on an S3 prefix (put-if-absent generation
objects), so the in-process tests run on both; the runs check what a user sees on S3:
two processes without ``--shard`` split the units, the same shard twice is refused naming
its holder, an expired holder is taken over, and a holder that stalled past its lease
writes no ``done`` for the unit it lost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import race_for_lease, write_extract_workflow

from pipeline import store
from pipeline.errors import ConfigError, StoreError
from pipeline.store import location
from pipeline.workflow.claims import Claims, UnitClaims, claims_folder, unit_lease
from pipeline.workflow.config import load_workflow
from pipeline.workflow.runner import Runner
from stages import STAGES

DIFFPROBE = [sys.executable, "-m", "pipeline.cli.commands"]
SMALL = {"dataset": "{reader: digits, split: test, limit: 16}", "timesteps": "[10, 400]",
         "blocks": "[mid_block]", "unit_samples": 4}  # 4 units of 4 samples


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """Where a store would live: a local path, or a URL on the moto server (with its options)."""
    if request.param == "local":
        return tmp_path / "s.zarr"
    server = request.getfixturevalue("s3_server")
    return location.parse(f"s3://{server.new_bucket()}/run/s.zarr", storage_options=server.storage_options)


def forge(output, name: str, gen: int = 0, age: float = 0.0, host: str = "elsewhere", pid: int = 4242) -> None:
    """A lease object written by a process on another host whose last heartbeat was ``age`` s ago."""
    now = time.time() - age
    doc = {"owner": f"{host}:{pid}:x", "pid": pid, "host": host, "label": "stage ex, shard 0/2",
           "created": now, "heartbeat": now}
    folder = claims_folder(output)
    if not location.is_remote(folder):
        folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.{gen:06d}.json").write_text(json.dumps(doc))


def lease_names(output) -> list[str]:
    folder = claims_folder(output)
    return sorted(location.list_files(folder)) if location.is_remote(folder) or folder.exists() else []


def test_a_lease_is_exclusive_expires_and_a_stalled_holder_learns_it_lost_it(output):
    a, b = Claims(output, timeout=0.5), Claims(output, timeout=0.5)
    assert a.try_claim("unit-000001", "a") is None
    held = b.try_claim("unit-000001", "b")
    assert held is not None and held.owner == a.owner
    time.sleep(0.6)  # a never beats (no heartbeat thread): it stalled
    assert b.try_claim("unit-000001", "b") is None  # taken over as generation 1
    assert lease_names(output) == ["unit-000001.000001.json"]
    assert not a.confirm("unit-000001") and b.confirm("unit-000001")
    a.release("unit-000001")  # never deletes the new holder's lease
    assert b.confirm("unit-000001")
    b.close()
    a.close()
    assert lease_names(output) == []


def test_racing_takeovers_on_s3_have_exactly_one_winner(s3_server):
    for trial in range(3):
        out = location.parse(f"s3://{s3_server.new_bucket()}/s.zarr", storage_options=s3_server.storage_options)
        forge(out, "unit-000001", age=5)
        racers = [Claims(out, timeout=1) for _ in range(8)]
        results = race_for_lease(racers, "unit-000001")
        assert [r is None for r in results].count(True) == 1, results
        assert sum(r.confirm("unit-000001") for r in racers) == 1
        assert lease_names(out) == ["unit-000001.000001.json"]


def tiny_store(output):
    layout = store.make_layout(8, {"b": (2, 2, 2)}, [1, 2], unit_samples=4)
    samples = store.SampleTable([f"im{i}" for i in range(8)], [0] * 8, [False] * 8, [0] * 8)
    store.create_store(output, layout, samples, ["a"], {"stage": "extract", "stage_hash": "h"})
    return layout, store.open_root(output, mode="r+")


def test_an_object_put_after_a_listing_is_seen_at_once_on_s3(s3_server):
    # s3fs answers exists/info/cat_file from a cached listing of the parent folder; locations
    # are opened with that cache off, so what another client puts meanwhile is there.
    bucket = s3_server.new_bucket()
    folder = location.parse(f"s3://{bucket}/run/.s.zarr.claims", storage_options=s3_server.storage_options)
    (folder / "unit-000000.000000.json").write_text("{}")
    assert location.list_files(folder) == ["unit-000000.000000.json"]  # one listing, as claims make
    other = s3_server.filesystem()
    other.pipe_file(f"{bucket}/run/.s.zarr.claims/unit-000001.000000.json", b'{"a": 1}')
    fresh = folder / "unit-000001.000000.json"
    assert fresh.exists() and fresh.read_text() == '{"a": 1}'
    assert folder.fs.cat_file(fresh.path) == b'{"a": 1}'
    with pytest.raises(ConfigError, match="use_listings_cache must stay off"):
        location.parse(f"s3://{bucket}/x", storage_options={**s3_server.storage_options, "use_listings_cache": True})


def test_a_lease_taken_while_another_thread_lists_the_folder_is_held(s3_server, monkeypatch):
    # The writer thread releases the last unit's lease (one listing) while the main thread
    # takes the next: a listing fetched before the put and stored after it once made the
    # taker unable to read its own lease, so a unit of a single process was left undone.
    out = location.parse(f"s3://{s3_server.new_bucket()}/run/s.zarr", storage_options=s3_server.storage_options)
    claims = Claims(out)
    assert claims.try_claim("unit-000000", "a") is None
    put = location.put_if_absent

    def put_then_store_an_older_listing(path, data):
        before = path.fs.ls(path.parent.path, detail=True, refresh=True)
        wrote = put(path, data)
        path.fs.dircache[path.parent.path] = before  # what the other thread's listing leaves behind
        return wrote

    monkeypatch.setattr(location, "put_if_absent", put_then_store_an_older_listing)
    assert claims.try_claim("unit-000001", "a") is None
    assert claims.confirm("unit-000001")
    claims.close()


def test_a_holder_stalled_past_its_lease_writes_no_done(output, monkeypatch):
    """The stall hook freezes the holder between a unit's data and its done cell, heartbeats
    included; another process takes the unit over meanwhile; the holder then marks nothing."""
    from pipeline import faults

    layout, root = tiny_store(output)
    lines: list[str] = []
    slow = UnitClaims(Claims(output, timeout=0.5).start(), "stage ex", log=lines.append)
    fast = UnitClaims(Claims(output, timeout=0.5), "stage ex", log=lines.append)
    assert list(slow.take([0], lambda u: False)) == [0]
    monkeypatch.setattr(faults, "_stalls_done", set())
    monkeypatch.setenv(faults.STALL_AT_ENV, "unit:before-done:3")
    data = {"b": np.ones((4, 2, 2, 2, 2), np.float16)}
    marked: list[bool] = []
    writer = threading.Thread(target=lambda: marked.append(
        store.write_unit(root, layout, 0, data, fence=lambda: slow.still_holds(0))))
    writer.start()
    deadline = time.monotonic() + 10
    while not list(fast.take([0], lambda u: False)) and time.monotonic() < deadline:
        time.sleep(0.1)  # until the stalled lease expires and fast takes it over
    writer.join()
    assert marked == [False] and store.unit_status(output).tolist() == [False, False]
    assert len(lines) == 1 and lines[0].startswith("lost the lease on unit 0 to pid ")
    assert lines[0].endswith("after a stall longer than 0 s; not marking it done (its new holder does)")
    assert not slow.still_holds(0) and len(lines) == 1  # one line per unit
    assert store.write_unit(root, layout, 0, data, fence=lambda: fast.still_holds(0)) is True
    assert store.unit_status(output).tolist() == [True, False]
    fast.finish(0)
    slow.finish(0)
    slow.claims.close()
    assert lease_names(output) == []


# ----------------------------------------------------------------- runs on S3


def s3_workflow(folder: Path, server, bucket: str) -> Path:
    wf = write_extract_workflow(folder, **SMALL)
    wf.write_text(wf.read_text().replace(
        "output_dir: out", f"output_dir: s3://{bucket}/run\nstorage_options: {json.dumps(server.storage_options)}"))
    return wf


def runner(wf: Path, **kw) -> Runner:
    return Runner(load_workflow(wf, STAGES), progress=False, **kw)


def test_the_same_shard_on_s3_is_refused_naming_its_holder_then_taken_over_once_expired(tmp_path, s3_server):
    wf = s3_workflow(tmp_path, s3_server, s3_server.new_bucket())
    out = load_workflow(wf, STAGES).stage("ex").output
    forge(out, "shard-0-of-2", age=1)
    with pytest.raises(StoreError, match=r"^stage ex, shard 0/2 is already running: pid 4242 on elsewhere "
                                         r"\(stage ex, shard 0/2, heartbeat \d+ s ago\); wait for it"):
        runner(wf, shard=(0, 2)).run()
    forge(out, "shard-0-of-2", age=10_000)  # its holder was killed long ago: its lease expired
    assert runner(wf, shard=(0, 2)).run() == [("ex", "run")]
    assert store.unit_status(out).tolist() == [True, False, True, False]
    assert lease_names(out) == []  # released; the dead holder's generation was deleted by the taker


def child(wf: Path, server, **env) -> subprocess.Popen:
    return subprocess.Popen([*DIFFPROBE, "run", str(wf), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, **server.env, PYTHONPATH=os.pathsep.join(sys.path), **env))


def wait_for_lease(out, name: str, older_than: float = -1.0, timeout: float = 180) -> None:
    """Until lease ``name`` exists (with a heartbeat older than ``older_than`` s)."""
    claims = Claims(out)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        holder = claims.holder(name)
        if holder is not None and time.time() - holder.heartbeat > older_than:
            return
        time.sleep(0.2)
    raise AssertionError(f"no lease {name} on {out} after {timeout} s")


def computed(text: str) -> int:
    return sum(int(line.split("] ")[1].split()[0]) for line in text.splitlines()
               if "unit(s) computed by this process" in line)


@pytest.mark.timeout(300)
def test_two_processes_on_one_s3_store_without_shard_split_the_units(tmp_path, s3_server, capfd, monkeypatch):
    wf = s3_workflow(tmp_path, s3_server, s3_server.new_bucket())
    out = load_workflow(wf, STAGES).stage("ex").output
    store_url = str(out)
    other = child(wf, s3_server, DIFFPROBE_FAULT_UNIT_DELAY="1.0")
    wait_for_lease(out, unit_lease(0))  # the child holds its first unit: both run at once from here
    monkeypatch.setenv("DIFFPROBE_FAULT_UNIT_DELAY", "1.0")
    capfd.readouterr()
    try:
        runner(wf).run()
        here = computed(capfd.readouterr().err)
    except StoreError as exc:  # every unit was taken by the child: legitimate on a slow machine
        assert "being computed by another process" in str(exc)
        here = 0
    text = other.communicate(timeout=240)[0]
    assert other.returncode == 0, text[-3000:]
    assert here + computed(text) == 4, text  # each unit computed by exactly one of them
    assert computed(text) >= 1
    assert store.read_attrs(out)["complete"] is True, store_url
    assert lease_names(out) == []


@pytest.mark.timeout(300)
def test_a_stalled_holder_on_s3_is_taken_over_and_marks_nothing_done(tmp_path, s3_server, capfd, monkeypatch):
    ref = write_extract_workflow(tmp_path / "ref", **SMALL)
    assert runner(ref).run() == [("ex", "run")]
    wf = s3_workflow(tmp_path / "s3", s3_server, s3_server.new_bucket())
    out = load_workflow(wf, STAGES).stage("ex").output
    lease_s = "2"
    # The child stalls once, between unit 0's data and its done cell, heartbeats and all.
    staller = child(wf, s3_server, DIFFPROBE_LEASE_TIMEOUT=lease_s, DIFFPROBE_FAULT_STALL_AT="unit:before-done:8")
    wait_for_lease(out, unit_lease(0), older_than=float(lease_s) + 0.5)  # stalled past its lease
    monkeypatch.setenv("DIFFPROBE_LEASE_TIMEOUT", lease_s)
    capfd.readouterr()
    assert runner(wf).run() == [("ex", "resume")]  # takes over every unit the staller held
    taker = capfd.readouterr().err
    assert "unit(s) computed by this process" in taker and store.read_attrs(out)["complete"] is True
    text = staller.communicate(timeout=240)[0]
    assert staller.returncode == 0, text[-3000:]
    lost = [line for line in text.splitlines() if "lost the lease on unit 0 to " in line]
    assert len(lost) == 1 and lost[0].endswith("not marking it done (its new holder does)"), text
    import zarr

    ours = zarr.open_group(str(ref.parent / "out/ex.zarr"), mode="r")["blocks/mid_block/activations"][:]
    theirs = store.open_root(out)["blocks/mid_block/activations"][:]
    np.testing.assert_array_equal(ours, theirs)
    assert lease_names(out) == []


def test_a_stage_whose_input_another_process_is_still_filling_says_so(tmp_path):
    wf = write_extract_workflow(tmp_path, **SMALL)
    wf.write_text(wf.read_text() + "  - {name: pooled, stage: pool, input: ex, sizes: [1]}\n")
    assert runner(wf, shard=(0, 2)).run(only="ex") == [("ex", "run")]  # units 0 and 2 done
    out = load_workflow(wf, STAGES).stage("ex").output
    forge(out, unit_lease(1), age=1)  # unit 1 is being computed on another host
    with pytest.raises(StoreError, match=r"^stage 'pooled' needs 'ex', whose output .* is still being computed "
                                         r"by another process \(1 lease\(s\), e.g. unit-000001 held by pid 4242 "
                                         r"on elsewhere .*\); run again once it has finished"):
        runner(wf).run(only="pooled")
    forge(out, unit_lease(1), age=10_000)  # its holder died: nothing will finish it
    with pytest.raises(StoreError, match=r"^stage 'pooled' needs 'ex', whose output .* is incomplete; run it first"):
        runner(wf).run(only="pooled")
