"""Dask clusters and task running: ``local`` (LocalCluster), ``address`` (an existing
``dask scheduler``) or ``slurm`` (dask-jobqueue), and one way to run a grid of tasks.

May import: ``pipeline.errors`` and the cluster config; never ``stages``.
"""

from pipeline.cluster.client import get_client, run_tasks

__all__ = ["get_client", "run_tasks"]
