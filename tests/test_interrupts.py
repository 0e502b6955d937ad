"""Interruptions never look like success: SIGINT / SIGTERM stop `diffprobe run` with 130 / 143
and one line saying it can be resumed; the store resumes; dask workers print nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline import store
from pipeline.workflow.config import load_workflow
from pipeline.workflow.runner import Runner
from stages import STAGES

DIFFPROBE = [sys.executable, "-m", "pipeline.cli.commands"]


def wait_for_units(out: Path, n: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "zarr.json").exists() and store.unit_status(out).sum() >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"run ended or stalled before {n} units were done")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_run_non_zero_and_the_store_resumes(extract_workflow, sig, code):
    wf = extract_workflow(f"wf{code}")
    out = wf.parent / "out/ex.zarr"
    # Started the way a shell starts a background job: SIGINT ignored (why `kill -INT` used to do nothing).
    proc = subprocess.Popen([*DIFFPROBE, "run", str(wf), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, DIFFPROBE_FAULT_UNIT_DELAY="1.5"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # noqa: PLW1509
    wait_for_units(out, 1, proc)
    started = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert time.monotonic() - started < 30  # stopped, not finished (4 units x 1.5 s delay + compute)
    lines = err.strip().splitlines()
    assert lines[-1] == (f"interrupted ({signal.Signals(sig).name}): finished units are kept; "
                         "run the same command again to resume")
    assert "Traceback" not in err
    status = store.unit_status(out)
    assert 1 <= status.sum() < len(status) and store.read_attrs(out)["complete"] is False
    assert Runner(load_workflow(wf, STAGES), progress=False).run() == [("ex", "resume")]
    assert store.read_attrs(out)["complete"] is True


def test_importing_dask_jobqueue_keeps_our_sigint_handler():
    code = textwrap.dedent("""
        import signal
        from pipeline.interrupts import install_handlers, _raise
        from pipeline.cluster.client import _start_cluster
        from pipeline.workflow.config import ClusterConfig
        install_handlers()
        try:  # the import happens in here; the bad option then stops the cluster's construction
            _start_cluster(ClusterConfig(kind="slurm", slurm={"no_such_option": 1}))
        except Exception:
            pass
        import dask_jobqueue  # imported now either way
        print(signal.getsignal(signal.SIGINT) is _raise)
    """)
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "True", proc.stderr


@pytest.mark.parametrize("cluster, started", [
    ("{kind: local, n_workers: 1, dashboard: false, in_process_mib: 0}", "dask cluster (local)"),
    ("{kind: local, n_workers: 0}", "in this process"),   # small work: no cluster, the same contract
])
def test_ctrl_c_during_a_dask_stage_is_one_line(tmp_path, tiny_unet_json, cluster, started):
    wf = tmp_path / "wf.yaml"
    wf.write_text(textwrap.dedent(f"""\
        name: t
        output_dir: out
        cluster: {cluster}
        stages:
          - {{name: ex, stage: extract, model: {{config: tiny_unet.json, null_class: 10}}, conditioning: class,
             dataset: {{reader: digits, split: test, limit: 16}}, blocks: [mid_block], timesteps: [10],
             unit_samples: 4}}
          - {{name: pooled, stage: pool, input: ex, sizes: [1, 2]}}
        """))
    Runner(load_workflow(wf, STAGES), progress=False).run(only="ex")
    # A terminal's Ctrl-C: SIGINT to the whole process group (client, nanny, workers).
    # each pool unit waits 2 s first, so the signal lands while units are being computed
    proc = subprocess.Popen([*DIFFPROBE, "run", str(wf), "--no-progress", "--only", "pooled"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, DIFFPROBE_FAULT_UNIT_DELAY="2"))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if started in line:
            break
    os.killpg(proc.pid, signal.SIGINT)
    rest = proc.communicate(timeout=120)[0]
    output = "".join(lines) + rest
    after = rest.strip().splitlines()
    if proc.returncode == 0:
        pytest.skip("the pool stage finished before the signal arrived")  # a race on a loaded machine
    assert proc.returncode == 130, output
    assert after and after[-1].startswith("interrupted (SIGINT): "), output
    assert "Traceback" not in output, output
    assert len([a for a in after if a.strip()]) <= 2, output
