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
