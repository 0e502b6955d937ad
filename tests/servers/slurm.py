"""A real SLURM for the tests: found running, or started on this host by ``start-slurm.sh``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

START_SCRIPT = Path(__file__).resolve().parent / "start-slurm.sh"
INSTALL_HINT = (
    "install slurm-wlm and munge (apt-get install slurm-wlm munge) and run tests/servers/start-slurm.sh"
)
#: Node states in which a job can start (sinfo's %T, lower case; a trailing '*' or '~' is stripped).
USABLE_STATES = {"idle", "mixed", "allocated", "completing"}


def _run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@dataclass
class Slurm:
    """A SLURM cluster the tests may submit to.

    Attributes
    ----------
    partition
        Partition to submit to (the cluster's default; ``cpu`` on the test cluster).
    node
        Name of a usable node in it.
    cores
        CPUs of that node.
    memory_mib
        Memory SLURM may hand out on that node (RealMemory), in MiB.
    started_here
        Whether this test session started the daemons.
    """

    partition: str
    node: str
    cores: int
    memory_mib: int
    started_here: bool = False
    _known_jobs: set[str] = field(default_factory=set, repr=False)

    def jobs(self) -> list[str]:
        """Ids of this user's jobs that SLURM still lists (pending, running or completing)."""
        out = _run("squeue", "-h", "-u", str(os.getuid()), "-o", "%i").stdout
        return out.split()

    def new_jobs(self) -> list[str]:
        """This user's listed jobs that were not there when the session found the cluster."""
        return [job for job in self.jobs() if job not in self._known_jobs]

    def cancel_new_jobs(self) -> list[str]:
        """``scancel`` every job :meth:`new_jobs` lists; returns their ids."""
        jobs = self.new_jobs()
        if jobs:
            _run("scancel", *jobs)
        return jobs

    def wait_until_gone(self, jobs: list[str], timeout: float = 60) -> list[str]:
        """Poll squeue until none of ``jobs`` is listed; returns those still listed at ``timeout``."""
        deadline = time.monotonic() + timeout
        left = [j for j in jobs if j in self.jobs()]
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            listed = set(self.jobs())
            left = [j for j in left if j in listed]
        return left

    def sbatch(self, *args: str, cwd: str | Path | None = None) -> str:
        """Submit with ``sbatch --parsable -p PARTITION ARGS``; returns the job id."""
        res = subprocess.run(["sbatch", "--parsable", "-p", self.partition, *args], capture_output=True,
                             text=True, timeout=30, cwd=cwd, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {res.stderr.strip()}")
        return res.stdout.strip().split(";")[0]

    def jobqueue_options(self, folder: str | Path, **overrides) -> dict:
        """Keyword arguments for ``dask_jobqueue.SLURMCluster`` that work on this cluster.

        One single-threaded worker per job with 1 GiB, scheduler and workers on 127.0.0.1,
        logs and worker scratch under ``folder``; ``overrides`` replace any of them.
        """
        folder = Path(folder)
        options = {
            "queue": self.partition,
            "cores": 1,
            "processes": 1,
            "memory": "1GiB",
            "walltime": "00:10:00",
            "python": sys.executable,
            "scheduler_options": {"host": "127.0.0.1", "dashboard_address": ":0"},
            "worker_extra_args": ["--host", "127.0.0.1"],
            "log_directory": str(folder / "slurm-logs"),
            "local_directory": str(folder / "worker-scratch"),
        }
        options.update(overrides)
        return options


def _node_states(timeout: float) -> list[tuple[str, int, int, str, str]]:
    """(node, cpus, memory MiB, state, partition) per node sinfo lists; [] when sinfo does not answer."""
    try:
        res = _run("sinfo", "-h", "-N", "-o", "%N|%c|%m|%T|%P", timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if res.returncode != 0:
        return []
    rows = []
    for line in res.stdout.splitlines():
        node, cpus, mem, state, part = line.strip().split("|")
        rows.append((node, int(cpus), int(mem.rstrip("+")), state.rstrip("*~#").lower(), part))
    return rows


def find_slurm(timeout: float = 5) -> Slurm | None:
    """The running cluster's default partition and a usable node in it, or None.

    ``timeout`` bounds the wait for the controller: with a slurm.conf but no slurmctld,
    sinfo retries for its MessageTimeout (10 s by default) before it gives up.
    """
    rows = _node_states(timeout)
    default = [r for r in rows if r[4].endswith("*")] or rows
    for node, cpus, mem, state, part in default:
        if state in USABLE_STATES:
            return Slurm(partition=part.rstrip("*"), node=node, cores=cpus, memory_mib=mem)
    return None


def can_start() -> str | None:
    """None when this process can start the test cluster, else why not."""
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch")
               if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        return f"{', '.join(missing)} not found"
    if os.geteuid() != 0:
        return "starting it needs root"
    return None


def start_slurm(timeout: float = 90) -> tuple[Slurm | None, str]:
    """Run ``start-slurm.sh``; returns (cluster or None, the script's output)."""
    try:
        res = subprocess.run(["bash", str(START_SCRIPT)], capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
        output = (res.stdout + res.stderr).strip()
    except subprocess.TimeoutExpired:
        return None, f"{START_SCRIPT.name} did not finish in {timeout:.0f}s"
    cluster = find_slurm()
    if cluster is not None:
        cluster.started_here = True
    return cluster, output
