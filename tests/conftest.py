"""Shared fixtures: tiny random models, fake datasets, temporary workflows."""

from __future__ import annotations

import os

# Two cores here: keep torch from oversubscribing when pytest and dask share them.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

try:
    import torch  # noqa: E402

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


import json  # noqa: E402
from pathlib import Path  # noqa: E402

from helpers import TINY_UNET, write_extract_workflow  # noqa: E402


@pytest.fixture
def tiny_unet_json(tmp_path) -> Path:
    path = tmp_path / "tiny_unet.json"
    path.write_text(json.dumps(TINY_UNET))
    return path


@pytest.fixture
def extract_workflow(tmp_path):
    """Factory: extract_workflow(subdir, **param_overrides) -> workflow path."""

    def make(sub: str = "wf", **overrides) -> Path:
        return write_extract_workflow(tmp_path / sub, **overrides)

    return make


@pytest.fixture(scope="module")
def cluster_address():
    """An in-process dask cluster; stages reach it through ``cluster: {kind: address}``."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0",
                      scheduler_kwargs={"dashboard": False}) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="session")
def killed_extract(tmp_path_factory):
    """copy(dest) -> ``(ref, killed)`` workflow paths under ``dest``: the default extract
    workflow run whole in this process, and the same workflow in a ``diffprobe run`` SIGKILLed
    after 2 units (a partial store). Made once for the session (a process start each time
    costs seconds of imports); each test gets copies, as it resumes or rewrites them."""
    import shutil
    import signal
    import subprocess
    import sys

    from pipeline.workflow.config import load_workflow
    from pipeline.workflow.runner import Runner
    from stages import STAGES

    made = tmp_path_factory.mktemp("killed-extract")
    ref, killed = write_extract_workflow(made / "ref"), write_extract_workflow(made / "killed")
    Runner(load_workflow(ref, STAGES), progress=False).run()
    env = dict(os.environ, DIFFPROBE_FAULT_KILL_AFTER_UNITS="2")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli.commands", "run", str(killed), "--no-progress"],
                          env=env, check=False, capture_output=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    def copy(dest: Path) -> tuple[Path, Path]:
        for name in ("ref", "killed"):
            shutil.copytree(made / name, dest / name)
        return dest / "ref" / ref.name, dest / "killed" / killed.name

    return copy


# Real servers (SLURM, S3, Chromium): session fixtures that skip with an install hint.
from servers.fixtures import chromium, s3_server, slurm  # noqa: E402,F401
