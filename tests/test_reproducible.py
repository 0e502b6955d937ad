"""Numbers from one run are reproducible: the same config and seed give the same store,
byte for byte across runs, and to float16 rounding across batch sizes (where the CPU
kernels block a GEMM differently); the same holds for classify's error tensor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import zarr
from helpers import TINY_UNET

from pipeline.workflow.config import load_workflow
from pipeline.workflow.runner import Runner
from stages import STAGES


def run(wf: Path) -> Path:
    Runner(load_workflow(wf, STAGES), progress=False, echo=lambda m: None).run()
    return wf.parent / "out"


def data_files(store: Path) -> dict[str, bytes]:
    """Every array chunk / shard file of a store (metadata, which holds paths and times, left out)."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and "/c/" in f"/{p.relative_to(store)}"}


def test_two_runs_of_one_config_write_byte_identical_stores(extract_workflow):
    a = run(extract_workflow("a", views=2, flip="true")) / "ex.zarr"
    b = run(extract_workflow("b", views=2, flip="true")) / "ex.zarr"
    files_a, files_b = data_files(a), data_files(b)
    assert len(files_a) > 10 and files_a.keys() == files_b.keys()
    different = [name for name in files_a if files_a[name] != files_b[name]]
    assert different == []


def classify_wf(folder: Path, batch_size: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "tiny_unet.json").write_text(json.dumps(TINY_UNET))
    (folder / "wf.yaml").write_text(
        "name: t\noutput_dir: out\nstages:\n  - {name: c, stage: classify, model: {config: tiny_unet.json, "
        "null_class: 10}, dataset: {reader: digits, split: test, limit: 6}, n_timesteps: 4, "
        f"batch_size: {batch_size}}}\n")
    return folder / "wf.yaml"


def test_classify_errors_agree_across_batch_sizes_and_runs(tmp_path):
    stores = [run(classify_wf(tmp_path / name, bs)) / "c.zarr" for name, bs in
              (("b7", 7), ("b32", 32), ("b7again", 7))]
    roots = [zarr.open_group(str(s), mode="r") for s in stores]
    for loss in ("error_l2", "error_l1", "error_huber"):
        values = [r[loss][:] for r in roots]
        assert np.isfinite(values[0]).all()
        np.testing.assert_array_equal(values[0], values[2])  # same batch size: bit for bit
        np.testing.assert_allclose(values[0], values[1], rtol=1e-4, atol=1e-6)
    assert all((r["prediction"][:] == roots[0]["prediction"][:]).all() for r in roots)
