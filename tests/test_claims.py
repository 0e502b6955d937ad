"""One writer per unit: leases that survive crashes and expire (pipeline/workflow/claims.py),
and the runs that use them (two processes on one output, the same shard twice, a dead shard)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zarr
from helpers import invoke, one_error_line, race_for_lease

from pipeline import store
from pipeline.workflow.claims import Claims, claims_folder
from pipeline.workflow.config import load_workflow
from pipeline.workflow.runner import Runner
from stages import STAGES

DIFFPROBE = [sys.executable, "-m", "pipeline.cli.commands"]


def forge(claims: Claims, name: str, gen: int = 0, host: str = "elsewhere", age: float = 0.0, pid: int = 4242) -> None:
    """A lease object written by some other process (another host, heartbeat ``age`` s ago)."""
    claims.folder.mkdir(parents=True, exist_ok=True)
    now = time.time() - age
    doc = {"owner": f"{host}:{pid}:x", "pid": pid, "host": host, "label": "stage ex, unit 3", "created": now,
           "heartbeat": now}
    (claims.folder / f"{name}.{gen:06d}.json").write_text(json.dumps(doc))


def test_a_lease_is_exclusive_until_released(tmp_path):
    a, b = Claims(tmp_path / "s.zarr", timeout=60), Claims(tmp_path / "s.zarr", timeout=60)
    assert a.try_claim("unit-000003", "a") is None
    holder = b.try_claim("unit-000003", "b")
    assert holder is not None and holder.pid == os.getpid() and holder.label == "a"
    assert a.confirm("unit-000003") and not b.confirm("unit-000003")
    a.release("unit-000003")
    assert b.try_claim("unit-000003", "b") is None
    b.close()
    a.close()
    assert not claims_folder(tmp_path / "s.zarr").exists()  # nothing left behind


def test_a_live_lease_of_another_host_is_respected_and_an_expired_one_taken_over(tmp_path):
    c = Claims(tmp_path / "s.zarr", timeout=5)
    forge(c, "unit-000003", age=1)
    held = c.try_claim("unit-000003", "me")
    assert held is not None and held.host == "elsewhere"
    assert "pid 4242 on elsewhere" in held.describe(c.timeout) and "expired" not in held.describe(c.timeout)
    forge(c, "unit-000004", age=6)
    assert c.try_claim("unit-000004", "me") is None  # expired: taken over as generation 1
    assert sorted(p.name for p in c.folder.glob("unit-000004.*")) == ["unit-000004.000001.json"]
    c.close()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=False, capture_output=True, text=True)
    dead_pid = int(proc.stdout)
    c = Claims(tmp_path / "s.zarr", timeout=600)
    import socket

    forge(c, "shard-1-of-2", host=socket.gethostname(), pid=dead_pid)
    assert c.try_claim("shard-1-of-2", "me") is None
    c.close()


def test_a_holder_that_stalled_past_the_timeout_learns_it_lost_the_lease(tmp_path):
    slow, other = Claims(tmp_path / "s.zarr", timeout=0.3), Claims(tmp_path / "s.zarr", timeout=0.3)
    assert slow.try_claim("unit-000000", "slow") is None  # no heartbeat thread: it "stalls"
    time.sleep(0.4)
    assert other.try_claim("unit-000000", "other") is None
    assert not slow.confirm("unit-000000")
    slow.heartbeat()  # does not revive it
    assert "unit-000000" in slow.lost and other.confirm("unit-000000")
    slow.release("unit-000000")  # must not delete the new holder's lease
    assert other.confirm("unit-000000")


def test_the_heartbeat_keeps_a_lease_alive(tmp_path):
    with Claims(tmp_path / "s.zarr", timeout=0.4) as holder:
        assert holder.try_claim("unit-000000", "holder") is None
        time.sleep(1.0)  # > 2 timeouts: only the heartbeat keeps it
        assert Claims(tmp_path / "s.zarr", timeout=0.4).try_claim("unit-000000", "x") is not None


def test_racing_takeovers_of_an_expired_lease_have_one_winner(tmp_path):
    for trial in range(5):
        out = tmp_path / f"s{trial}.zarr"
        racers = [Claims(out, timeout=1) for _ in range(8)]
        forge(racers[0], "unit-000001", age=5)
        results = race_for_lease(racers, "unit-000001")
        winners = [i for i, r in enumerate(results) if r is None]
        assert len(winners) == 1, results
        assert sum(r.confirm("unit-000001") for r in racers) == 1


# ----------------------------------------------------------------- runs


def read_block(path: Path, block: str = "mid_block") -> np.ndarray:
    return zarr.open_group(str(path), mode="r")[f"blocks/{block}/activations"][:]


def start(wf: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([*DIFFPROBE, "run", str(wf), "--no-progress", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, **(env or {})))


def computed(output: str) -> int:
    return sum(int(line.split("] ")[1].split()[0]) for line in output.splitlines()
               if "unit(s) computed by this process" in line)


def test_two_processes_without_shard_split_the_units(extract_workflow):
    ref, wf = extract_workflow("ref"), extract_workflow("two")
    Runner(load_workflow(ref, STAGES), progress=False).run()
    procs = [start(wf, env={"DIFFPROBE_FAULT_UNIT_DELAY": "1.0"}) for _ in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    out = wf.parent / "out/ex.zarr"
    n_units = len(store.unit_status(out))
    # Each unit was computed by exactly one of them; at most one was refused (nothing left for it).
    assert sum(computed(o) for o in outs) == n_units, outs
    assert all(p.returncode in (0, 2) for p in procs) and any(p.returncode == 0 for p in procs), outs
    for p, o in zip(procs, outs):
        if p.returncode == 2:
            assert "being computed by another process" in o and "pid" in o
    assert store.read_attrs(out)["complete"] is True
    np.testing.assert_array_equal(read_block(ref.parent / "out/ex.zarr"), read_block(out))
    assert not claims_folder(out).exists()


def test_the_same_shard_twice_is_refused_naming_the_holder(extract_workflow):
    wf = extract_workflow()
    # The first holder must still be running when the second starts (a loaded machine
    # takes many seconds to start a process): a long delay per unit, then it is stopped.
    first = start(wf, "--shard", "0/2", env={"DIFFPROBE_FAULT_UNIT_DELAY": "120"})
    folder = claims_folder(wf.parent / "out/ex.zarr")
    deadline = time.monotonic() + 120
    while not list(folder.glob("shard-0-of-2.*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    line = one_error_line(*invoke("run", wf, "--no-progress", "--shard", "0/2"))  # another process: this one
    assert line.startswith("error: stage ex, shard 0/2 is already running: pid ")
    assert f"pid {first.pid} on " in line
    first.terminate()
    assert first.wait(timeout=120) != 0  # interrupted: never exit 0


def test_a_dead_shard_is_named_by_inspect_and_its_next_run_completes_the_store(extract_workflow):
    ref, wf = extract_workflow("ref"), extract_workflow("sharded")
    Runner(load_workflow(ref, STAGES), progress=False).run()
    dying = start(wf, "--shard", "1/2", env={"DIFFPROBE_FAULT_KILL_AFTER_UNITS": "1"})
    assert dying.wait(timeout=240) == -signal.SIGKILL
    healthy = start(wf, "--shard", "0/2")
    assert healthy.wait(timeout=240) == 0
    out = wf.parent / "out/ex.zarr"
    assert store.read_attrs(out)["complete"] is False
    code, report = invoke("inspect", out)
    assert code == 0, report
    assert "missing   1 unit(s) not done: 3" in report, report
    assert f"shard 1/2 (1 of them: 3) held by pid {dying.pid} on " in report and "expired" in report
    code, output = invoke("run", wf, "--no-progress", "--shard", "1/2")  # takes the dead shard's lease over
    assert code == 0, output
    assert store.read_attrs(out)["complete"] is True
    np.testing.assert_array_equal(read_block(ref.parent / "out/ex.zarr"), read_block(out))
    assert not claims_folder(out).exists()
