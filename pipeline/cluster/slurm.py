"""SLURM worker jobs that come, or a clear line why not: submit, wait, replace, clean up.

``dask_jobqueue.SLURMCluster`` submits in the background and reports nothing a user can
act on: a wrong partition ends in tornado tracebacks, jobs that never start (no free
node) or all die (``scancel``, pre-emption) leave the client waiting for ever, a lost
job is not replaced, and a killed client leaves jobs queued. :class:`SlurmWorkers`
wraps the cluster:

- :meth:`preflight`: ``sbatch --test-only`` on the worker job script, so sbatch's own
  error (invalid partition, a request no node can satisfy) is one line before anything
  is queued;
- :meth:`wait`: until the workers connect, printing "waiting for N workers, M pending
  in SLURM (reason ...)" (squeue's ``%r``) every :data:`PROGRESS_S`; after
  ``cluster.slurm_wait_s`` without a worker, :class:`~pipeline.errors.ClusterError`;
- :meth:`check` (called by ``run_tasks`` while it waits on tasks): a worker job that
  SLURM no longer lists is logged and resubmitted, up to ``cluster.slurm_replacements``
  times; no worker for ``slurm_wait_s`` (or none left and no replacement allowed) is a
  ``ClusterError`` instead of a hang; new workers' code is checked
  (:mod:`pipeline.cluster.identity`);
- :meth:`cancel_all`: after ``cluster.close()``, ``scancel`` every job this run
  submitted that squeue still lists.

A client killed without cleaning up (``kill -9``, the OOM killer) cannot cancel its
jobs, and dask-jobqueue's ``--death-timeout`` does not help the queued ones: they wait
in the queue, start hours later, and only then time out. So every run's jobs carry a
name of their own (:func:`with_run_job_name`), and :meth:`start` leaves a watchdog
beside the client, a ``sh`` loop in a session of its own (a kill of the client's
process group does not reach it): every ``cluster.slurm_orphan_s / 2`` it checks the
client's pid, and once the client is gone it runs ``scancel --name <run's name>``,
which reaches even a job submitted a moment before the kill. The watchdog is stopped
when the client closes the cluster. A running worker whose host also went down
still ends after dask-jobqueue's ``death-timeout`` (60 s by default).

Workers start in a fresh temporary directory (:data:`NEUTRAL_CWD`): ``python -m``
puts the working directory first on ``sys.path``, and sbatch's is the client's, so a
checkout's ``pipeline/`` would shadow the installed one.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable

from pipeline.cluster.identity import check_workers
from pipeline.errors import ClusterError

#: Job-script lines that move the worker to an empty directory, removed when the job ends.
NEUTRAL_CWD = [
    '_diffprobe_cwd="$(mktemp -d)" && cd "$_diffprobe_cwd" && trap \'rm -rf "$_diffprobe_cwd"\' EXIT',
]
#: Seconds between progress lines while workers are missing.
PROGRESS_S = 10.0
#: Seconds between squeue polls in :meth:`SlurmWorkers.check`.
POLL_S = 2.0
#: The orphan watchdog: $1 client pid, $2 job name, $3 seconds between checks, $4 user. A zombie
#: (killed, not yet reaped by its parent) counts as gone.
WATCHDOG = (
    'alive() { kill -0 "$1" 2>/dev/null && ! grep -qs "^[0-9]* (.*) Z" "/proc/$1/stat"; }; '
    'while alive "$1"; do sleep "$3"; done; exec scancel --name="$2" --user="$4"'
)


def with_run_job_name(options: dict) -> dict:
    """``SLURMCluster`` options whose ``job_name`` is this run's own (the user's name, if any, kept
    as its prefix), so the orphan watchdog can cancel exactly this run's jobs by name."""
    prefix = options.get("job_name") or "diffprobe-worker"
    return {**options, "job_name": f"{prefix}-{uuid.uuid4().hex[:10]}"}


def _run(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()] or lines
    return "; ".join(dict.fromkeys(errors)) or "no output"


def squeue(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """``{job id: (state, reason)}`` for those of ``job_ids`` squeue still lists."""
    if not job_ids:
        return {}
    try:
        res = _run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T|%r"])
    except (OSError, subprocess.TimeoutExpired):
        return {j: ("UNKNOWN", "squeue did not answer") for j in job_ids}
    listed = {}
    for line in res.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[0] in job_ids:
            listed[parts[0]] = (parts[1], parts[2])
    return listed


class SlurmWorkers:
    """Watch over a ``SLURMCluster``'s worker jobs (see the module docstring).

    Parameters
    ----------
    cluster : dask_jobqueue.SLURMCluster
    n_workers : int
        Jobs to keep.
    wait_s : float
        How long the run may be without any worker before it stops.
    replacements : int
        How many lost jobs are resubmitted in all.
    log : callable
    orphan_s : float
        If this process dies without cleaning up, its jobs are cancelled within this many seconds.
    """

    def __init__(self, cluster, n_workers: int, wait_s: float, replacements: int,
                 log: Callable[[str], None], orphan_s: float = 10.0):
        from pipeline.errors import ConfigError

        if not orphan_s > 0:
            raise ConfigError(f"cluster.slurm_orphan_s must be > 0 seconds, got {orphan_s}")
        self.cluster = cluster
        self.orphan_s = orphan_s
        self.watchdog: subprocess.Popen | None = None
        self.n_workers = n_workers
        self.wait_s = wait_s
        self.replacements = replacements
        self.replaced = 0
        self.log = log
        self.submitted: set[str] = set()
        self.lost: set[str] = set()
        self.checked: set[str] = set()
        self._last_poll = 0.0
        self._last_progress = 0.0
        self._alone_since: float | None = None

    # ------------------------------------------------------------ submission
    def preflight(self) -> None:
        """``sbatch --test-only`` the worker script; :class:`ClusterError` with sbatch's words if refused."""
        with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="diffprobe-worker-") as f:
            f.write(self.cluster.job_script())
            f.flush()
            try:
                res = _run(["sbatch", "--test-only", f.name])
            except FileNotFoundError:
                raise ClusterError("cluster kind 'slurm': sbatch not found; run on a SLURM login node "
                                   "or use cluster.kind local/address") from None
            except subprocess.TimeoutExpired:
                raise ClusterError("cluster kind 'slurm': sbatch --test-only did not answer in 30s; "
                                   "is slurmctld up (sinfo)?") from None
        if res.returncode != 0:
            raise ClusterError(f"SLURM refused the worker job: {_error_line(res.stderr + res.stdout)}; "
                               f"fix cluster.slurm (queue/partition, cores, memory, walltime)")

    def start(self) -> None:
        """Start the orphan watchdog, then submit the worker jobs."""
        self.watchdog = subprocess.Popen(
            ["sh", "-c", WATCHDOG, "diffprobe-slurm-watchdog", str(os.getpid()), self.cluster.job_name,
             f"{self.orphan_s / 2:g}", pwd.getpwuid(os.getuid()).pw_name],
            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.cluster.scale(n=self.n_workers)

    def stop_watchdog(self) -> None:
        if self.watchdog is not None and self.watchdog.poll() is None:
            try:
                os.killpg(self.watchdog.pid, signal.SIGTERM)  # its session: the loop and its sleep
            except ProcessLookupError:
                pass
            self.watchdog.wait(timeout=10)
        self.watchdog = None

    # ------------------------------------------------------------ state
    def _jobs(self) -> dict[str, str]:
        """``{worker spec name: job id}`` of the submitted jobs the cluster holds."""
        jobs = {}
        for name, job in list(self.cluster.workers.items()):
            job_id = getattr(job, "job_id", None)
            if job_id:
                jobs[name] = str(job_id)
        self.submitted.update(jobs.values())
        return jobs

    def _connected(self, client) -> dict[str, str]:
        """``{address: worker name}`` of the workers connected to the scheduler."""
        workers = client.scheduler_info(n_workers=-1).get("workers", {})
        return {addr: str(w.get("name")) for addr, w in workers.items()}

    def _progress(self, connected: int, listed: dict[str, tuple[str, str]]) -> str:
        pending = [r for s, r in listed.values() if s == "PENDING"]
        reasons = ", ".join(sorted(set(pending))) or "-"
        return (f"waiting for {self.n_workers} dask worker(s), {connected} connected, "
                f"{len(pending)} pending in SLURM (reason {reasons})")

    def _verify_new(self, client, connected: dict[str, str]) -> None:
        new = [a for a in connected if a not in self.checked]
        if new:
            check_workers(client, new)
            self.checked.update(new)

    def _replace_lost(self, jobs: dict[str, str], listed: dict[str, tuple[str, str]]) -> None:
        gone = {name: jid for name, jid in jobs.items() if jid not in listed and jid not in self.lost}
        for name, job_id in gone.items():
            self.lost.add(job_id)
            if self.replaced < self.replacements:
                self.replaced += 1
                self.log(f"SLURM worker job {job_id} ended (squeue no longer lists it); submitting a "
                         f"replacement ({self.replaced} of cluster.slurm_replacements={self.replacements})")
                self.cluster.loop.add_callback(self._resubmit, name)
            else:
                self.log(f"SLURM worker job {job_id} ended (squeue no longer lists it); no replacement "
                         f"left (cluster.slurm_replacements={self.replacements})")

    async def _resubmit(self, name: str) -> None:
        # The cluster keeps a dead job until its worker is reported gone (never, if it
        # never connected); dropping it lets _correct_state start that spec again.
        self.cluster.workers.pop(name, None)
        await self.cluster._correct_state()

    # ------------------------------------------------------------ waiting
    def wait(self, client) -> None:
        """Block until ``n_workers`` connect, or ``wait_s`` passes (then go on with some, or raise)."""
        start = time.monotonic()
        while True:
            connected = self._connected(client)
            jobs = self._jobs()
            listed = squeue(list(jobs.values()))
            self._replace_lost(jobs, listed)
            self._verify_new(client, connected)
            now = time.monotonic()
            if len(connected) >= self.n_workers:
                return
            if now - start >= self.wait_s:
                if connected:
                    self.log(f"dask cluster (slurm): {len(connected)} of {self.n_workers} worker(s) after "
                             f"{self.wait_s:.0f}s; going on with them ({self._progress(len(connected), listed)})")
                    return
                raise ClusterError(self._timeout_line(listed))
            if jobs and not listed and self.replaced >= self.replacements and not connected:
                raise ClusterError(self._gone_line())
            if now - self._last_progress >= PROGRESS_S:
                self._last_progress = now
                self.log(self._progress(len(connected), listed))
            time.sleep(0.5)

    def check(self, client) -> None:
        """While tasks run: replace lost jobs, verify new workers, raise when none is left for ``wait_s``."""
        now = time.monotonic()
        if now - self._last_poll < POLL_S:
            return
        self._last_poll = now
        connected = self._connected(client)
        jobs = self._jobs()
        listed = squeue(list(jobs.values()))
        self._replace_lost(jobs, listed)
        self._verify_new(client, connected)
        if connected:
            self._alone_since = None
            return
        if self._alone_since is None:
            self._alone_since = now
            self._last_progress = 0.0
        if not listed and self.replaced >= self.replacements and self._jobs_settled(jobs):
            raise ClusterError(self._gone_line())
        if now - self._alone_since >= self.wait_s:
            raise ClusterError(self._timeout_line(listed))
        if now - self._last_progress >= PROGRESS_S:
            self._last_progress = now
            self.log(f"no dask worker connected; {self._progress(0, listed)}")

    def _jobs_settled(self, jobs: dict[str, str]) -> bool:
        return all(j in self.lost for j in jobs.values())

    def _timeout_line(self, listed: dict[str, tuple[str, str]]) -> str:
        return (f"no dask worker connected within cluster.slurm_wait_s={self.wait_s:.0f}s: "
                f"{self._progress(0, listed)}; free the partition, pick another "
                f"(cluster.slurm.queue) or raise cluster.slurm_wait_s; finished units are kept, "
                f"run again to resume")

    def _gone_line(self) -> str:
        return (f"every SLURM worker job ended ({', '.join(sorted(self.lost)) or 'none started'}) and "
                f"cluster.slurm_replacements={self.replacements} are used up; see the job logs "
                f"(cluster.slurm.log_directory) and sacct; finished units are kept, run again to resume")

    # ------------------------------------------------------------ cleanup
    def cancel_all(self) -> list[str]:
        """``scancel`` every job this run submitted that squeue still lists; returns their ids.
        Stops the orphan watchdog (this process is cleaning up itself)."""
        self.stop_watchdog()
        self._jobs_safe()
        left = sorted(squeue(sorted(self.submitted)))
        if left:
            try:
                _run(["scancel", *left])
            except (OSError, subprocess.TimeoutExpired):
                self.log(f"could not scancel SLURM job(s) {' '.join(left)}; cancel them by hand")
        return left

    def _jobs_safe(self) -> None:
        try:
            self._jobs()
        except Exception:  # noqa: BLE001 -- the cluster may be half closed; the ids seen so far suffice
            pass


__all__ = ["NEUTRAL_CWD", "SlurmWorkers", "squeue", "with_run_job_name"]
