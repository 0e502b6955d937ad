"""Crash consistency as a property: kill -9 a `diffprobe run` at seeded random moments
(and once inside finalize), resume each time, and the store equals an uninterrupted
run bit for bit; no unit done before a kill is rewritten (mtimes); nothing is left
behind (temp folders, lock files, leases)."""

from __future__ import annotations

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

from helpers import write_extract_workflow

#: A `diffprobe run` that SIGKILLs itself when metadata consolidation starts (finalize).
KILL_IN_FINALIZE = (
    "import os, signal, sys, zarr\n"
    "zarr.consolidate_metadata = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
    "from pipeline.cli.commands import main\n"
    "sys.exit(main())\n"
)
PARAMS = dict(dataset="{reader: digits, split: test, limit: 20}", blocks="[mid_block, up_blocks.0]",
              timesteps="[10, 300]", unit_samples=4, batch_size=4)


def diffprobe(wf: Path, script: str | None = None) -> subprocess.Popen:
    head = [sys.executable, "-c", script, "run"] if script else [sys.executable, "-m", "pipeline.cli.commands", "run"]
    return subprocess.Popen([*head, str(wf), "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, bufsize=1)


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
@pytest.mark.timeout(900)  # eight process starts: ~40 s on a quiet machine, far more on a loaded one
def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(extract_workflow):
    ref_wf, wf = extract_workflow("ref", **PARAMS), extract_workflow("crashy", **PARAMS)
    begin = time.monotonic()
    Runner(load_workflow(ref_wf, STAGES), progress=False, echo=lambda m: None).run()
    full = time.monotonic() - begin  # the work of one uninterrupted run, after start-up
    out = wf.parent / "out/ex.zarr"
    rng = random.Random(13)
    outcomes = []
    # Every interrupted run also dies when it reaches finalize, so the store never
    # completes before the last, clean run: six seeded kills, each at a random moment.
    for attempt in range(6):
        before = shard_mtimes(out)
        proc = diffprobe(wf, KILL_IN_FINALIZE)
        for line in proc.stderr:  # the clock starts when the stage starts its units
            if "to do" in line:
                break
        try:
            proc.wait(timeout=rng.uniform(0.0, 1.0) * full)
            outcomes.append("finalize" if proc.returncode == -signal.SIGKILL else proc.returncode)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            outcomes.append("random")
        after = shard_mtimes(out)
        assert {p: after[p] for p in before} == before, f"kill {attempt}: a done unit was rewritten"
    before = shard_mtimes(out)
    last = diffprobe(wf)
    assert last.wait(timeout=240) == 0, last.stderr.read()
    assert {p: shard_mtimes(out)[p] for p in before} == before
    assert store.read_attrs(out)["complete"] is True, outcomes
    got, want = arrays(out), arrays(ref_wf.parent / "out/ex.zarr")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert zarr.open_group(str(out), mode="r", use_consolidated=True) is not None  # consolidated
    leftovers = [p.name for p in out.parent.iterdir() if p.name != "ex.zarr"]
    leftovers += [str(p) for p in out.rglob("*") if p.name.endswith((".tmp", ".lock")) or ".tmp-" in p.name]
    assert leftovers == [], leftovers
    assert "random" in outcomes and "finalize" in outcomes, outcomes
