"""Dask clusters and task running: ``local`` (LocalCluster), ``address`` (an existing
``dask scheduler``) or ``slurm`` (dask-jobqueue), one cluster per run
(``session.ClusterSession``, which also runs small work in this process), and one way
to run a grid of tasks.

May import: ``pipeline.errors``, ``pipeline.faults`` and the cluster config; never
``stages``. dask is imported only when a cluster is started (``client``), so importing
this package is cheap.
"""

from pipeline.cluster.session import ClusterSession
from pipeline.cluster.tasks import TaskOutcome, run_in_process

__all__ = ["ClusterSession", "TaskOutcome", "get_client", "run_in_process", "run_tasks"]


def __getattr__(name: str):
    if name in ("get_client", "run_tasks"):  # dask's import costs ~1-2 s: only when asked for
        from pipeline.cluster import client

        return getattr(client, name)
    raise AttributeError(name)
