"""Cluster faults against the real single-node SLURM (``slurm`` fixture): each a clear line, no job left.

Worker jobs are one core each; the test node has two, so two workers fill it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace
from pathlib import Path

import pytest

from pipeline.cluster.client import get_client, run_tasks
from pipeline.errors import ClusterError
from pipeline.workflow.config import ClusterConfig

pytest.importorskip("dask_jobqueue")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
REPO = Path(__file__).resolve().parent.parent



def Square(name: str, x: int, sleep: float = 0.0) -> SimpleNamespace:
    # A stdlib type: task arguments are pickled by reference, and workers cannot import this module.
    return SimpleNamespace(name=name, x=x, sleep=sleep)


def _make_slow_square():
    # A nested function: pickled by value (a module-level one is pickled by its module's name).
    def slow_square(p: SimpleNamespace) -> int:
        time.sleep(p.sleep)
        return p.x * p.x

    return slow_square


slow_square = _make_slow_square()


def _cfg(slurm, tmp_path, n_workers=2, wait_s=60.0, replacements=4, **overrides) -> ClusterConfig:
    return ClusterConfig(kind="slurm", n_workers=n_workers, slurm=slurm.jobqueue_options(tmp_path, **overrides),
                         slurm_wait_s=wait_s, slurm_replacements=replacements, dashboard=False)


def _no_job_left(slurm, before: set[str]) -> None:
    new = [j for j in slurm.new_jobs() if j not in before]
    assert slurm.wait_until_gone(new, timeout=60) == []


def test_wrong_partition_is_sbatchs_own_error_in_one_line(slurm, tmp_path):
    before = set(slurm.new_jobs())
    lines = []
    with pytest.raises(ClusterError) as err:
        with get_client(_cfg(slurm, tmp_path, queue="no-such-partition"), log=lines.append):
            pass
    message = str(err.value)
    assert "\n" not in message
    assert "SLURM refused the worker job" in message and "invalid partition" in message.lower()
    assert "cluster.slurm" in message
    _no_job_left(slurm, before)


def test_no_free_node_ends_in_the_timeout_line_with_progress(slurm, tmp_path):
    before = set(slurm.new_jobs())
    blocker = slurm.sbatch("-c", str(slurm.cores), "--mem=64", "-o", "/dev/null", "--wrap", "sleep 600")
    lines = []
    try:
        with pytest.raises(ClusterError) as err:
            with get_client(_cfg(slurm, tmp_path, wait_s=12), log=lines.append):
                pass
    finally:
        subprocess.run(["scancel", blocker], check=False)
    message = str(err.value)
    assert "no dask worker connected within cluster.slurm_wait_s=12s" in message
    assert "2 pending in SLURM (reason Resources)" in message or "(reason Priority" in message
    assert any(ln.startswith("waiting for 2 dask worker(s), 0 connected, 2 pending in SLURM (reason ")
               for ln in lines), lines
    _no_job_left(slurm, before)


def _worker_jobs(client) -> list[str]:
    """SLURM job ids of the connected workers (their SLURM_JOB_ID)."""
    return sorted(set(client.run(lambda: os.environ["SLURM_JOB_ID"]).values()))


def test_a_cancelled_worker_is_logged_and_replaced_and_nothing_is_lost(slurm, tmp_path):
    before = set(slurm.new_jobs())
    lines = []
    tasks = [Square(f"t{i}", i, sleep=1.0) for i in range(24)]
    with get_client(_cfg(slurm, tmp_path), log=lines.append) as client:
        jobs = _worker_jobs(client)
        assert len(jobs) == 2
        done = []

        def on_result(payload, result, attempts):
            done.append(payload.name)
            if len(done) == 3:
                subprocess.run(["scancel", jobs[0]], check=True)

        outcomes = run_tasks(client, slow_square, tasks, log=lines.append, on_result=on_result)
        after = _worker_jobs(client)
    assert [o.result for o in outcomes] == [t.x * t.x for t in tasks]
    assert all(o.ok for o in outcomes)
    assert any(f"SLURM worker job {jobs[0]} ended" in ln and "submitting a replacement (1 of" in ln
               for ln in lines), lines
    assert jobs[0] not in after
    _no_job_left(slurm, before)


def test_every_worker_cancelled_is_a_clear_line_not_a_hang(slurm, tmp_path):
    before = set(slurm.new_jobs())
    lines = []
    tasks = [Square(f"t{i}", i, sleep=2.0) for i in range(40)]
    with pytest.raises(ClusterError) as err:
        with get_client(_cfg(slurm, tmp_path, wait_s=30, replacements=0), log=lines.append) as client:
            jobs = _worker_jobs(client)

            def on_result(payload, result, attempts):
                if payload.name == "t1":
                    subprocess.run(["scancel", *jobs], check=True)

            run_tasks(client, slow_square, tasks, log=lines.append, on_result=on_result)
    message = str(err.value)
    assert "every SLURM worker job ended" in message and "run again to resume" in message
    assert all(j in message for j in jobs)
    _no_job_left(slurm, before)


def test_an_exception_in_the_run_cancels_the_worker_jobs(slurm, tmp_path):
    before = set(slurm.new_jobs())
    with pytest.raises(RuntimeError, match="boom"):
        with get_client(_cfg(slurm, tmp_path, n_workers=1), log=lambda s: None) as client:
            assert len(_worker_jobs(client)) == 1
            raise RuntimeError("boom")
    _no_job_left(slurm, before)


def test_sigterm_of_the_client_leaves_no_job(slurm, tmp_path):
    before = set(slurm.new_jobs())
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from pipeline.cluster.client import get_client
        from pipeline.workflow.config import ClusterConfig
        cfg = ClusterConfig(kind="slurm", n_workers=2, slurm={slurm.jobqueue_options(tmp_path)!r},
                            slurm_wait_s=120, dashboard=False)
        with get_client(cfg) as client:
            print("READY", flush=True)
            time.sleep(300)
    """))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    try:
        assert proc.stdout.readline().strip() == "READY"
        submitted = [j for j in slurm.new_jobs() if j not in before]
        assert len(submitted) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert slurm.wait_until_gone(submitted, timeout=60) == []


def _kill_wait_s() -> float:
    """SLURM's KillWait: how long a cancelled job's processes get between SIGTERM and SIGKILL."""
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.split("=")[0].strip() == "KillWait")
    return float(line.split("=")[1].split()[0])


def _states(jobs: list[str]) -> dict[str, str]:
    out = subprocess.run(["squeue", "-h", "-j", ",".join(jobs), "-o", "%i %T"], capture_output=True, text=True,
                         timeout=30, check=False).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def test_kill_9_of_the_client_cancels_its_queued_and_running_jobs_within_slurm_orphan_s(slurm, tmp_path):
    """No cleanup can run in a SIGKILLed client: its watchdog cancels the jobs, the queued one included
    (dask-jobqueue's death-timeout would only end it once it started, long after)."""
    before = set(slurm.new_jobs())
    orphan_s = 4.0
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(f"""
        import time
        from pipeline.cluster.client import get_client
        from pipeline.workflow.config import ClusterConfig
        cfg = ClusterConfig(kind="slurm", n_workers={slurm.cores + 1}, slurm={slurm.jobqueue_options(tmp_path)!r},
                            slurm_wait_s=300, slurm_orphan_s={orphan_s}, dashboard=False)
        with get_client(cfg) as client:  # one worker more than the node has cores: one job stays queued
            time.sleep(300)
    """))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        states: dict[str, str] = {}
        while time.monotonic() < deadline and proc.poll() is None:
            submitted = [j for j in slurm.new_jobs() if j not in before]
            states = _states(submitted) if submitted else {}
            if sorted(states.values()).count("RUNNING") == slurm.cores and "PENDING" in states.values():
                break
            time.sleep(0.5)
        assert "PENDING" in states.values() and "RUNNING" in states.values(), states
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # the bound: the watchdog's slurm_orphan_s, plus SLURM's own KillWait for the running jobs to end
    left = slurm.wait_until_gone(list(states), timeout=orphan_s + _kill_wait_s())
    slurm.cancel_new_jobs()
    assert left == [], f"still listed after slurm_orphan_s + KillWait: {_states(left)}"


def _modified_copy(folder: Path) -> Path:
    """A copy of diffprobe's packages with one source file changed."""
    for name in ("pipeline", "stages"):
        shutil.copytree(REPO / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    with open(folder / "pipeline" / "errors.py", "a") as f:
        f.write("\n# an edit the client does not have\n")
    return folder


def test_workers_start_in_a_neutral_directory_not_the_checkout(slurm, tmp_path, monkeypatch):
    """sbatch's working directory (the client's) holds another `pipeline/`: workers must not import it."""
    checkout = _modified_copy(tmp_path / "checkout")
    monkeypatch.chdir(checkout)
    before = set(slurm.new_jobs())
    with get_client(_cfg(slurm, tmp_path, n_workers=1), log=lambda s: None) as client:
        cwd = list(client.run(os.getcwd).values())[0]
        where = list(client.run(lambda: __import__("pipeline").__file__).values())[0]
    assert Path(cwd) != checkout and not (Path(cwd) / "pipeline").exists()
    assert Path(where).resolve() == (REPO / "pipeline" / "__init__.py").resolve()
    _no_job_left(slurm, before)


def test_workers_running_other_code_are_refused_in_one_line(slurm, tmp_path):
    other = _modified_copy(tmp_path / "other")
    before = set(slurm.new_jobs())
    cfg = _cfg(slurm, tmp_path, n_workers=1, job_script_prologue=[f"export PYTHONPATH={other}"])
    with pytest.raises(ClusterError) as err:
        with get_client(cfg, log=lambda s: None):
            pass
    message = str(err.value)
    assert "\n" not in message
    assert f"from {other / 'pipeline'}" in message and "same install, same PYTHONPATH" in message
    _no_job_left(slurm, before)
