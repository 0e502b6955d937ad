"""Crash consistency as a property: kill -9 a `diffprobe run` at seeded random moments
(and once inside finalize), resume each time, and the store equals an uninterrupted
run bit for bit; no unit done before a kill is rewritten (mtimes); nothing is left
behind (temp folders, lock files, leases)."""

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

#: Every interrupted run also SIGKILLs itself when finalize starts consolidating metadata
#: (pipeline/faults.py's named kill point; a store is consolidated once at creation too,
#: so patching zarr.consolidate_metadata would kill the run before its first unit).
KILL_IN_FINALIZE = {"DIFFPROBE_FAULT_KILL_AT": "finalize:consolidate"}
UNIT_DELAY = 0.4  # seconds before each unit in the runs killed at a random moment
PARAMS = {"dataset": "{reader: digits, split: test, limit: 20}", "blocks": "[mid_block, up_blocks.0]",
          "timesteps": "[10, 300]", "unit_samples": 4, "batch_size": 4}


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


def arrays(out: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(out), mode="r")
    names = ["done", "failure", "image_id", "view", "label", "timestep"]
    names += [f"blocks/{b}/activations" for b in ("mid_block", "up_blocks.0")]
    return {n: root[n][:] for n in names}


@pytest.mark.slow
@pytest.mark.timeout(900)  # eight process starts: under a minute on a quiet machine, far more on a loaded one
def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(extract_workflow):
    ref_wf, wf = extract_workflow("ref", **PARAMS), extract_workflow("crashy", **PARAMS)
    ref = diffprobe(ref_wf)
    assert ref.wait(timeout=240) == 0, ref.stderr.read()
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
    print("kills:", kills)
    before = shard_mtimes(out)
    last = diffprobe(wf)
    assert last.wait(timeout=240) == 0, last.stderr.read()
    assert {p: shard_mtimes(out)[p] for p in before} == before
    assert store.read_attrs(out)["complete"] is True, kills
    got, want = arrays(out), arrays(ref_wf.parent / "out/ex.zarr")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert zarr.open_group(str(out), mode="r", use_consolidated=True) is not None  # consolidated
    leftovers = [p.name for p in out.parent.iterdir() if p.name != "ex.zarr"]
    leftovers += [str(p) for p in out.rglob("*") if p.name.endswith((".tmp", ".lock")) or ".tmp-" in p.name]
    assert leftovers == [], leftovers
    hows = {how for how, _, _ in kills}
    assert "random moment" in hows and "in finalize" in hows, kills
