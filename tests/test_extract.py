"""The extract stage: exact activations, batch/shard invariance, resume, skip/refuse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline import store
from pipeline.store.failures import read_failed_images
from pipeline.workflow.config import load_workflow
from stages import STAGES
from pipeline.datasets import DatasetConfig, open_dataset, preprocess
from pipeline.errors import StoreError
from pipeline.models import ModelConfig, load_model
from pipeline.noise import sample_noise
from pipeline.workflow.runner import Runner

DIFFPROBE = [sys.executable, "-m", "pipeline.cli.commands"]


def run_wf(path: Path, **kw):
    return Runner(load_workflow(path, STAGES), progress=False, **kw).run()


def read_block(store_path: Path, block: str) -> np.ndarray:
    return zarr.open_group(str(store_path), mode="r")[f"blocks/{block}/activations"][:]


def test_stored_activations_equal_direct_forward(extract_workflow):
    wf = extract_workflow(dataset="{reader: digits, split: test, limit: 6}", timesteps="[0, 250, 999]")
    run_wf(wf)
    out = wf.parent / "out" / "ex.zarr"
    adapter = load_model(ModelConfig(config=str(wf.parent / "tiny_unet.json"), null_class=10))
    reader = open_dataset(DatasetConfig(reader="digits", split="test", limit=6))
    captured = {}
    names = ["down_blocks.1", "mid_block", "up_blocks.0"]
    modules = dict(adapter.module.named_modules())
    handles = [modules[n].register_forward_hook(
        lambda m, i, o, n=n: captured.__setitem__(n, (o[0] if isinstance(o, tuple) else o).detach()))
        for n in names]
    try:
        for s, rec in enumerate(reader.records):
            x0 = torch.from_numpy(preprocess(reader.load_image(rec), adapter.preprocessing))[None]
            for ti, t in enumerate([0, 250, 999]):
                eps = sample_noise(0, rec.image_id, 0, t, x0.shape[1:])[None]
                abar = adapter.alphas_cumprod[t]
                x_t = (abar.sqrt() * x0.double() + (1 - abar).sqrt() * eps.double()).float()
                with torch.no_grad():
                    adapter.module(x_t, torch.tensor([t]), class_labels=torch.tensor([rec.label]))
                for n in names:
                    stored = read_block(out, n)[s, ti].astype(np.float32)
                    direct = captured[n][0].numpy()
                    np.testing.assert_allclose(stored, direct, rtol=2e-3, atol=2e-3)
    finally:
        for h in handles:
            h.remove()


def test_cpu_settings_leave_a_core_for_the_writer_and_decode_off_the_forward():
    from stages.extract import ExtractConfig, available_cores

    cfg = ExtractConfig(model=ModelConfig(config="m.json"), dataset=DatasetConfig(reader="digits"))
    assert cfg.cpu_settings("cpu", cores=1) == (1, 1)
    assert cfg.cpu_settings("cpu", cores=2) == (1, 1)  # one core for the forward, one for the writer
    assert cfg.cpu_settings("cpu", cores=16) == (15, 1)
    assert cfg.cpu_settings("cuda", cores=16) == (15, 8)  # on a GPU node the CPU decodes for the device
    assert cfg.cpu_settings("cuda", cores=2) == (1, 1)
    mine = ExtractConfig(model=ModelConfig(config="m.json"), dataset=DatasetConfig(reader="digits"),
                         torch_threads=3, decode_threads=0)
    assert mine.cpu_settings("cpu", cores=16) == (3, 0)
    assert cfg.cpu_settings("cpu")[0] == max(1, available_cores() - 1)
    with pytest.raises(ValueError, match="'decode_threads' must be >= 0"):
        ExtractConfig(model=ModelConfig(config="m.json"), dataset=DatasetConfig(reader="digits"), decode_threads=-1)


def test_batch_size_does_not_change_the_store(extract_workflow):
    """Same numbers from batch 4 and batch 7 (and other decode / thread settings), up to the
    backend's batch-dependent kernels.

    Noise and inputs are per sample, so the only difference left is that oneDNN/BLAS
    pick different GEMM blockings for different batch sizes (a 1x1 conv already
    differs in the last fp32 bit between batch 4 and 28 here). After rounding to
    float16 that is a rounding-level difference on a tiny fraction of values; everything else is
    bit-identical.
    """
    # a decodes in the default decode thread, b in a DataLoader worker process: where
    # images decode cannot change a stored value either. (One torch thread each: the
    # thread count changes reduction orders, like the batch size.)
    a = extract_workflow("a", batch_size=4, torch_threads=1)
    b = extract_workflow("b", batch_size=7, num_workers=1, decode_threads=0, torch_threads=1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_wf(a)
        assert torch.get_num_threads() == 2  # the stage's setting ends with the stage
    finally:
        torch.set_num_threads(before)
    run_wf(b)
    for block in ("down_blocks.1", "mid_block", "up_blocks.0"):
        x = read_block(a.parent / "out/ex.zarr", block)
        y = read_block(b.parent / "out/ex.zarr", block)
        assert np.isfinite(x).all()
        # float16 rounding: relative 2^-10, plus a tiny absolute floor for values near 0.
        np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), rtol=2e-3, atol=1e-4)
        assert np.mean(x != y) < 1e-3


def test_two_shard_processes_fill_one_identical_store(extract_workflow):
    single, sharded = extract_workflow("single"), extract_workflow("sharded")
    run_wf(single)
    procs = [subprocess.Popen([*DIFFPROBE, "run", str(sharded), "--shard", f"{i}/2", "--no-progress"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    done = sharded.parent / "out/ex.zarr"
    assert store.read_attrs(done)["complete"] is True
    for block in ("down_blocks.1", "mid_block", "up_blocks.0"):
        np.testing.assert_array_equal(read_block(single.parent / "out/ex.zarr", block), read_block(done, block))


def test_killed_run_resumes_and_writes_each_unit_once(killed_extract, tmp_path):
    ref, wf = killed_extract(tmp_path)  # a run SIGKILLed after 2 units, and an uninterrupted one
    out = wf.parent / "out/ex.zarr"
    status = store.unit_status(out)
    assert 2 <= status.sum() < len(status), status
    assert store.read_attrs(out)["complete"] is False
    first_units = {p: p.stat().st_mtime_ns for p in (out / "blocks").glob("*/activations/c/**/*") if p.is_file()}
    assert len(first_units) == 3 * status.sum()  # one shard file per (written unit, block)
    report = run_wf(wf)
    assert report == [("ex", "resume")]
    assert store.read_attrs(out)["complete"] is True
    # Shards written before the kill were not rewritten.
    for p, mtime in first_units.items():
        assert p.stat().st_mtime_ns == mtime, p
    for block in ("down_blocks.1", "mid_block", "up_blocks.0"):
        np.testing.assert_array_equal(read_block(ref.parent / "out/ex.zarr", block), read_block(out, block))


def test_rerun_is_skipped_and_changed_config_is_refused(extract_workflow, tmp_path):
    wf = extract_workflow()
    assert run_wf(wf) == [("ex", "run")]
    assert run_wf(wf) == [("ex", "skip (up to date)")]
    text = wf.read_text().replace("timesteps: [10, 100, 400]", "timesteps: [10, 100, 401]")
    wf.write_text(text)
    with pytest.raises(StoreError, match="--force"):
        run_wf(wf)
    assert run_wf(wf, force=True) == [("ex", "replace (--force)")]
    assert zarr.open_group(str(wf.parent / "out/ex.zarr"), mode="r")["timestep"][:].tolist() == [10, 100, 401]


def test_views_flip_and_pooling(extract_workflow):
    wf = extract_workflow(views=2, flip="true", pool="{size: 2, mode: max}",
                          dataset="{reader: digits, split: test, limit: 5}")
    run_wf(wf)
    root = zarr.open_group(str(wf.parent / "out/ex.zarr"), mode="r")
    ids = root["image_id"][:].tolist()
    assert ids[0::2] == ids[1::2] and len(set(ids)) == 5  # each image twice, views adjacent
    assert root["view"][:].tolist()[:4] == [0, 1, 0, 1]
    assert root["flipped"][:].tolist()[:4] == [False, True, False, True]
    assert root["blocks/mid_block/activations"].shape == (10, 3, 16, 2, 2)
    acts = root["blocks/mid_block/activations"][:]
    assert np.isfinite(acts).all()
    assert not np.array_equal(acts[0], acts[1])  # views differ (noise + flip)


def _image_folder(root: Path, corrupt: bool = True) -> Path:
    from PIL import Image

    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(root / c / f"{i}.png")
    if corrupt:
        (root / "b" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def test_corrupt_image_is_recorded_and_masked_never_zero_filled(extract_workflow, tmp_path):
    data = _image_folder(tmp_path / "imgs")
    wf = extract_workflow(dataset=f"{{reader: imagefolder, root: {data}, split: all}}", num_workers=2)
    run_wf(wf)
    out = wf.parent / "out/ex.zarr"
    root = zarr.open_group(str(out), mode="r")
    ids = root["image_id"][:].tolist()
    bad = ids.index("b/9.png")
    assert root["done"][bad] == store.FAILED
    assert np.isnan(root["blocks/mid_block/activations"][bad]).all()
    good = [i for i in range(len(ids)) if i != bad]
    assert (root["done"][:][good] == store.WRITTEN).all()
    assert np.isfinite(root["blocks/mid_block/activations"][good]).all()
    failed = read_failed_images(out)
    assert [f["image_id"] for f in failed] == ["b/9.png"] and failed[0]["reason"]
    assert store.read_attrs(out)["complete"] is True


def test_strict_makes_unreadable_images_fatal(extract_workflow, tmp_path):
    from pipeline.errors import DatasetError

    data = _image_folder(tmp_path / "imgs")
    wf = extract_workflow(dataset=f"{{reader: imagefolder, root: {data}, split: all}}")
    with pytest.raises(DatasetError, match="b/9.png.*--strict"):
        run_wf(wf, strict=True)
    assert store.unit_status(wf.parent / "out/ex.zarr").sum() == 0  # nothing marked done


def test_float16_overflow_is_an_error_naming_block_timestep_samples(tmp_path):
    from pipeline.workflow.runner import Runner
    from stages.extract import NonFiniteError

    factory = Path(__file__).resolve().parent / "factories" / "overflow.py"
    wf = tmp_path / "wf.yaml"
    body = (f"name: o\noutput_dir: out\nstages:\n  - name: ex\n    stage: extract\n"
            f"    model: {{kind: factory, factory: '{factory}:overflow'}}\n"
            f"    dataset: {{reader: digits, split: test, limit: 4}}\n    blocks: [blow_up]\n    timesteps: [5]\n")
    wf.write_text(body)
    with pytest.raises(NonFiniteError, match=r"block 'blow_up' produced inf/NaN in float16 at timestep\(s\) \[5\] "
                                             r"for sample\(s\) digits/"):
        Runner(load_workflow(wf, STAGES), progress=False).run()
    assert store.unit_status(tmp_path / "out/ex.zarr").sum() == 0  # nothing marked done
    wf.write_text(body + "    dtype: float32\n")
    Runner(load_workflow(wf, STAGES), progress=False, force=True).run()
    values = read_block(tmp_path / "out/ex.zarr", "blow_up")
    assert values.dtype == np.float32 and np.isfinite(values).all() and np.abs(values).max() > 65504


def test_bfloat16_is_rounded_in_bf16_and_stored_as_float32(extract_workflow):
    a, b = extract_workflow("bf", dtype="bfloat16"), extract_workflow("f32", dtype="float32")
    run_wf(a)
    run_wf(b)
    bf = read_block(a.parent / "out/ex.zarr", "mid_block")
    f32 = read_block(b.parent / "out/ex.zarr", "mid_block")
    assert bf.dtype == np.float32
    assert np.all(bf.view(np.uint32) & 0xFFFF == 0)  # exactly representable in bfloat16
    np.testing.assert_allclose(bf, f32, rtol=1 / 128, atol=1e-6)


@pytest.mark.gpu
def test_cuda_extraction_matches_cpu(extract_workflow):
    """CUDA path (pinned host copies, fp16 compute): same store as CPU within fp16 tolerance."""
    cpu, gpu = extract_workflow("cpu"), extract_workflow("gpu", device="cuda", compute_dtype="float16")
    run_wf(cpu)
    run_wf(gpu)
    for block in ("down_blocks.1", "mid_block", "up_blocks.0"):
        np.testing.assert_allclose(read_block(cpu.parent / "out/ex.zarr", block).astype(np.float32),
                                   read_block(gpu.parent / "out/ex.zarr", block).astype(np.float32),
                                   rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_cuda_index_out_of_range_is_an_error(extract_workflow):
    from pipeline.errors import ModelError

    wf = extract_workflow(device=f"cuda:{torch.cuda.device_count()}")
    with pytest.raises(ModelError, match="does not exist"):
        run_wf(wf)
