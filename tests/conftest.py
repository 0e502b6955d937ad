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
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

#: diffusers-style tiny config: class-conditional (10 digits + null class 10), 16x16, 1 channel.
TINY_UNET = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
    "num_class_embeds": 11,
    "attention_head_dim": 8,
}


@pytest.fixture
def tiny_unet_json(tmp_path) -> Path:
    path = tmp_path / "tiny_unet.json"
    path.write_text(json.dumps(TINY_UNET))
    return path


def write_extract_workflow(folder: Path, **overrides) -> Path:
    """A one-stage extract workflow on digits with the tiny UNet; keyword args override params."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny_unet.json").write_text(json.dumps(TINY_UNET))
    params = {
        "model": "{config: tiny_unet.json, null_class: 10}",
        "dataset": "{reader: digits, split: test, limit: 30}",
        "blocks": "[down_blocks.1, mid_block, up_blocks.0]",
        "timesteps": "[10, 100, 400]",
        "conditioning": "class",
        "batch_size": "4",
        "unit_samples": "8",
    }
    params.update({k: str(v) for k, v in overrides.items()})
    body = "\n".join(f"    {k}: {v}" for k, v in params.items() if v != "None")
    text = textwrap.dedent(
        """\
        name: t
        output_dir: out
        stages:
          - name: ex
            stage: extract
        """
    ) + body + "\n"
    path = folder / "wf.yaml"
    path.write_text(text)
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


# Real servers (SLURM, S3, Chromium): session fixtures that skip with an install hint.
from servers.fixtures import chromium, s3_server, slurm  # noqa: E402,F401
