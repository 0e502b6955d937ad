"""The output's file system fails: full (extract, pool, probe, cka, classify), read-only, or the
output dir is a file. Each is one line naming what, where and what to do; only whole units
(and saved tasks) are left; a resume finishes, identical to an uninterrupted run.

The small and read-only file systems are tmpfs mounts the test makes (root only; the
tests skip where mounting is not permitted)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import invoke, write_extract_workflow
from helpers import one_error_line as error_line  # in-process CLI calls

from pipeline import store
from pipeline.workflow.config import load_workflow
from pipeline.workflow.runner import Runner
from stages import STAGES

DIFFPROBE = [sys.executable, "-m", "pipeline.cli.commands"]


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs folder of that size; remount(path, options) changes it."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True)


def cli_run(wf: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DIFFPROBE, "run", str(wf), "--no-progress", *args], check=False, capture_output=True, text=True,
                          timeout=300)


def stderr_error_line(proc: subprocess.CompletedProcess) -> str:
    """A real process's exit 2, no traceback, and its last stderr line an ``error:`` one."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr
    return last


def workflow_in(folder: Path, code_dir: Path, **kw) -> Path:
    """The tiny extract workflow with its output under ``folder`` (the file itself elsewhere)."""
    wf = write_extract_workflow(code_dir, dataset="{reader: digits, split: test, limit: 32}",
                                blocks="[up_blocks.1]", **kw)
    wf.write_text(wf.read_text().replace("output_dir: out", f"output_dir: {folder / 'out'}"))
    return wf


def test_a_full_disk_is_one_line_leaves_whole_units_and_resumes(tmp_path, tmpfs):
    small = tmpfs("420k")
    wf = workflow_in(small, tmp_path / "wf")
    line = stderr_error_line(cli_run(wf))
    out = small / "out/ex.zarr"
    assert "no space left writing" in line and str(out) in line and "free" in line, line
    assert "more are needed for the rest" in line and "run again: finished units are kept" in line, line
    if out.exists():  # the schema fit: every unit marked done has all its data
        root = zarr.open_group(str(out), mode="r")
        done = store.unit_status(out)
        acts = root["blocks/up_blocks.1/activations"]
        for u in np.flatnonzero(done):
            assert np.isfinite(acts[u * 8:(u + 1) * 8]).all()
    assert not list(small.glob("out/.*.tmp-*"))  # a failed schema build leaves no temp folder
    remount(small, "size=8m")
    code, text = invoke("run", wf, "--no-progress")
    assert code == 0, text
    assert store.read_attrs(out)["complete"] is True
    ref = workflow_in(tmp_path / "ref", tmp_path / "ref")
    Runner(load_workflow(ref, STAGES), progress=False).run()
    a = zarr.open_group(str(out), mode="r")["blocks/up_blocks.1/activations"][:]
    b = zarr.open_group(str(tmp_path / "ref/out/ex.zarr"), mode="r")["blocks/up_blocks.1/activations"][:]
    np.testing.assert_array_equal(a, b)


def test_a_read_only_output_is_one_line_fresh_partial_or_holding_inputs(tmp_path, tmpfs):
    import os
    import signal

    fs = tmpfs("16m")
    wf = workflow_in(fs, tmp_path / "wf")
    # partial: killed after 2 units, then the file system goes read-only; the runs after
    # the kill are in-process CLI calls (the real process's stderr line: the full-disk test)
    env = dict(os.environ, DIFFPROBE_FAULT_KILL_AFTER_UNITS="2")
    killed = subprocess.run([*DIFFPROBE, "run", str(wf), "--no-progress"], env=env, check=False, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    remount(fs, "ro")
    line = error_line(*invoke("run", wf, "--no-progress"))
    assert "cannot write" in line and "Read-only file system" in line and "make it writable" in line, line
    # holding a finished input for a next stage that writes beside it
    remount(fs, "rw")
    code, out = invoke("run", wf, "--no-progress")
    assert code == 0, out
    wf.write_text(wf.read_text() + "  - {name: again, stage: extract, model: {config: tiny_unet.json, "
                  "null_class: 10}, conditioning: class, dataset: {reader: digits, split: test, limit: 4}, "
                  "blocks: [mid_block], timesteps: [10]}\n")
    remount(fs, "ro")
    code, out = invoke("run", wf, "--no-progress")
    line = error_line(code, out)
    assert "stage 'again'" in line and "Read-only file system" in line, line
    assert "[ex] up to date, skipped" in out
    # fresh: nothing there yet
    fresh = tmpfs("1m")
    remount(fresh, "ro")
    line = error_line(*invoke("run", workflow_in(fresh, tmp_path / "fresh"), "--no-progress"))
    assert "cannot write" in line and "Read-only file system" in line, line


# ------------------------------------------------ full disk in every other stage

DOWNSTREAM = """\
name: t
output_dir: out
cluster: {{kind: address, address: "{address}", dashboard: false}}
stages:
  - {{name: ex, stage: extract, model: {{config: tiny_unet.json, null_class: 10}}, conditioning: class,
     dataset: {{reader: digits, split: test, limit: 48}}, blocks: [up_blocks.1], timesteps: [10, 100],
     batch_size: 8, unit_samples: 8}}
  - {{name: pooled, stage: pool, input: ex, sizes: [1, 2], unit_samples: 8, output: {pooled}/pooled.zarr}}
  - {{name: probe, stage: probe, input: pooled, heads: [{{name: linear}}], train: {{epochs: 2}},
     output: {probe}/probe.probe}}
  - {{name: cka, stage: cka, selections: [{{input: ex}}, {{input: pooled}}], output: {cka}/cka.cka}}
  - {{name: cl, stage: classify, model: {{config: tiny_unet.json, null_class: 10}},
     dataset: {{reader: digits, split: test, limit: 12}}, n_timesteps: 2, batch_size: 16, unit_samples: 4,
     output: {cl}/cl.zarr}}
"""
OUTPUTS = {"pooled": "pooled.zarr", "probe": "probe.probe", "cka": "cka.cka", "cl": "cl.zarr"}


def downstream_workflow(folder: Path, address: str, name: str, **where: Path) -> Path:
    dirs = {stage: where.get(stage, folder / "ref") for stage in OUTPUTS}
    wf = folder / f"{name}.yaml"
    wf.write_text(DOWNSTREAM.format(address=address, **dirs))
    return wf


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cluster_address):
    """Every stage run once on an ordinary disk: the folder, and each stage output's allocated bytes."""
    from helpers import TINY_UNET

    folder = tmp_path_factory.mktemp("full")
    (folder / "tiny_unet.json").write_text(__import__("json").dumps(TINY_UNET))
    code, out = invoke("run", downstream_workflow(folder, cluster_address, "ref"), "--no-progress")
    assert code == 0, out
    return folder


def allocated_bytes(folder: Path) -> int:
    from pipeline.store.space import allocated

    return sum(allocated(f) for f in folder.rglob("*") if f.is_file())


def data_bytes(out: Path) -> int:
    """Allocated bytes of a unit store's data arrays (what its units add to the schema)."""
    from pipeline.store.checks import data_arrays

    root = store.open_root(out)
    return sum(allocated_bytes(out / name) for name in data_arrays(root))


def same_results(stage: str, got: Path, want: Path) -> None:
    from pipeline.store.diff import diff_outputs

    rows = [r for r in diff_outputs(got, want) if "train_time_s" not in r.what]  # a clock, not a result
    assert rows and all(r.n_outside == 0 for r in rows), [r for r in rows if r.n_outside]


@pytest.mark.parametrize("stage", ["pooled", "probe", "cka", "cl"])
def test_a_full_disk_in_pool_probe_cka_or_classify_is_one_line_and_resumes_identically(
        reference, tmpfs, cluster_address, stage):
    from pipeline.store.verify import verify_store

    want = reference / "ref" / OUTPUTS[stage]
    # half of what the units add (unit stores: the schema fits, some units do not), or half of the results
    total = allocated_bytes(want)
    short = total - data_bytes(want) // 2 if stage in ("pooled", "cl") else total // 2
    small = tmpfs(f"{short // 4096 * 4096}")
    wf = downstream_workflow(reference, cluster_address, f"full-{stage}", **{stage: small})
    line = error_line(*invoke("run", wf, "--no-progress", "--only", stage))
    out = small / OUTPUTS[stage]
    assert f"stage {stage!r}: no space left writing {out} (" in line and " free" in line, line
    assert "more are needed for the rest" in line or "the results need about" in line, line
    assert "run again: finished" in line, line
    if stage in ("pooled", "cl"):  # every unit marked done has all its data
        assert out.exists() and "more are needed for the rest" in line, line
        assert 0 < int((~store.unit_status(out)).sum()), "the disk was not full after all"
        assert [f.message for f in verify_store(out).damage] == []
    else:  # every finished task saved whole
        for task in (out / "tasks").glob("*"):
            assert task.suffix == ".json", task
            __import__("json").loads(task.read_text())
    assert not [p for p in small.rglob("*") if p.name.endswith((".tmp", ".partial")) or ".tmp-" in p.name]
    remount(small, "size=16m")
    code, text = invoke("run", wf, "--no-progress", "--only", stage)
    assert code == 0, text
    assert store.read_attrs(out)["complete"] is True
    same_results(stage, out, want)
