"""The paper's training augmentation as stored views: guided-diffusion's random crop and
flip, drawn per (seed, image_id, view), recorded per sample, and the probe protocol
that trains on views 1..k-1 and tests on the centre view 0."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from helpers import write_extract_workflow
from PIL import Image

from pipeline import store
from pipeline.datasets import DatasetConfig, open_dataset
from pipeline.datasets.augment import AugmentedImages, AugmentSpec, preprocess_views, view_flipped
from pipeline.datasets.preprocess import Preprocessing, preprocess
from pipeline.datasets.recipes import adm_crop_at, adm_crop_sides, adm_random_crop
from pipeline.datasets.torch_data import load_images
from pipeline.errors import ConfigError
from pipeline.models import ModelConfig, load_model
from pipeline.noise import sample_noise
from pipeline.store.source import ZarrSource
from pipeline.workflow.config import load_workflow
from pipeline.workflow.runner import Runner
from stages import STAGES
from stages.probe import GroupTask, ProbeConfig, group_splits, build_grid

AWKWARD = [(64, 99), (203, 150), (640, 480), (1024, 768)]


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: resampling filters and off-by-one offsets both show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) % 256], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def published_random_crop(img: Image.Image, image_size: int, side: int, crop_y: int, crop_x: int) -> np.ndarray:
    """guided-diffusion's random_crop_arr, written from its description with the draws given.

    The short side is to become ``side``: first halve the image with a BOX filter for
    as long as its short side is at least twice ``side``, then one BICUBIC resize
    that maps every dimension d to round(d * side / short); finally take the
    ``image_size`` square whose top-left pixel is row crop_y, column crop_x.
    """
    width, height = img.size
    while min(width, height) >= 2 * side:
        width, height = width // 2, height // 2
        img = img.resize((width, height), resample=Image.BOX)
    factor = side / min(width, height)
    img = img.resize((round(width * factor), round(height * factor)), resample=Image.BICUBIC)
    pixels = np.array(img)
    return pixels[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def rescaled_dims(width: int, height: int, side: int) -> tuple[int, int]:
    while min(width, height) >= 2 * side:
        width, height = width // 2, height // 2
    factor = side / min(width, height)
    return round(width * factor), round(height * factor)


@pytest.mark.parametrize("width,height", AWKWARD)
@pytest.mark.parametrize("size", [32, 64])
def test_random_crop_equals_the_published_recipe_pixel_for_pixel(width, height, size):
    img = photo(width, height, seed=width)
    lo, hi = adm_crop_sides(size)
    rng = np.random.default_rng(size)
    for side in sorted({lo, hi, int(rng.integers(lo, hi + 1))}):
        w, h = rescaled_dims(width, height, side)
        corners = {(0, 0), (h - size, w - size), (int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1)))}
        for y0, x0 in corners:
            ours, (got_x, got_y) = adm_random_crop(img, size, side, lambda n_y, n_x, y0=y0, x0=x0: (y0, x0))
            assert (got_x, got_y) == (x0, y0)
            expected = published_random_crop(img, size, side, y0, x0)
            assert expected.shape == (size, size, 3)
            np.testing.assert_array_equal(np.asarray(ours), expected)
            np.testing.assert_array_equal(np.asarray(adm_crop_at(img, size, side, x0, y0)), expected)


def test_crop_side_range_is_the_references():
    # ceil(size / max_crop_frac) .. ceil(size / min_crop_frac), defaults 0.8 .. 1.0
    assert adm_crop_sides(224) == (224, 280)
    assert adm_crop_sides(256) == (256, 320)
    assert adm_crop_sides(16) == (16, 20)
    assert adm_crop_sides(100, 0.5, 0.9) == (112, 200)


def test_offsets_outside_the_image_are_refused():
    with pytest.raises(ValueError, match="outside"):
        adm_random_crop(photo(64, 99), 32, 40, lambda n_y, n_x: (n_y, 0))


def independent_draw(seed: int, image_id: str, view: int, size: int, width: int, height: int):
    """The documented draw, from the sha256 words: (side, x0, y0, flipped)."""
    digest = hashlib.sha256(f"diffprobe-view-v1|{seed}|{image_id}|{view}".encode()).digest()
    w = [int.from_bytes(digest[8 * i : 8 * i + 8], "little") for i in range(4)]
    lo, hi = math.ceil(size / 1.0), math.ceil(size / 0.8)
    side = lo + w[0] % (hi - lo + 1)
    rw, rh = rescaled_dims(width, height, side)
    return side, w[2] % (rw - size + 1), w[1] % (rh - size + 1), bool(w[3] & 1)


def test_views_follow_the_documented_draw_and_cover_the_reference_distribution():
    spec, size, prep = AugmentSpec(), 32, Preprocessing(32, resize="adm")
    img = photo(203, 150, seed=3)
    sides, flips, x0s = [], [], []
    for i in range(400):
        image_id = f"im{i}"
        _, boxes = preprocess_views(img, prep, spec, seed=7, image_id=image_id, n_views=2)
        side, x0, y0, flipped = independent_draw(7, image_id, 1, size, 203, 150)
        assert tuple(boxes[1]) == (side, x0, y0) and tuple(boxes[0]) == (-1, -1, -1)
        assert view_flipped(spec, 7, image_id, 1) == flipped and not view_flipped(spec, 7, image_id, 0)
        sides.append(side), flips.append(flipped), x0s.append(x0)
    assert sorted(set(sides)) == list(range(32, 41))  # every side in 32..40 is drawn
    assert 0.4 < np.mean(flips) < 0.6
    assert min(x0s) == 0 and max(x0s) >= 15  # offsets span the rescaled width
    assert not any(view_flipped(AugmentSpec(flip=False), 7, f"im{i}", 1) for i in range(50))


def test_views_do_not_depend_on_order_subset_or_worker():
    reader = open_dataset(DatasetConfig(reader="digits", split="test", limit=12))
    prep = Preprocessing(16, channels=1, resize="adm")

    def views(indices, workers=0):
        dataset = AugmentedImages(reader, prep, AugmentSpec(), seed=3, n_views=4)
        return load_images(reader, prep, indices, workers, dataset=dataset)[0]

    whole = views(list(range(12)))
    backwards = views(list(range(11, -1, -1)))
    part = views([5, 2], workers=2)
    for i in range(12):
        np.testing.assert_array_equal(whole[i][0], backwards[i][0])
        np.testing.assert_array_equal(whole[i][1], backwards[i][1])
    for i in (5, 2):
        np.testing.assert_array_equal(whole[i][0], part[i][0])
        np.testing.assert_array_equal(whole[i][1], part[i][1])
    # view 0 is the dataset's centre recipe
    np.testing.assert_array_equal(whole[2][0][0], preprocess(reader.load_image(reader.records[2]), prep))
    other_seed = load_images(reader, prep, [2], dataset=AugmentedImages(reader, prep, AugmentSpec(), 4, 4))[0]
    assert not np.array_equal(other_seed[2][1], whole[2][1])


def test_augment_config_errors(tmp_path):
    for overrides, message in [({"views": 1}, "views >= 2"), ({"views": 2, "flip": "true"}, "exclude each other"),
                               ({"views": 2, "augment": "{kind: adm_random_crop, min_crop_frac: 1.2}"},
                                "min_crop_frac")]:
        wf = write_extract_workflow(tmp_path / str(len(message)), **{"augment": "{kind: adm_random_crop}",
                                                                   **overrides})
        with pytest.raises(ConfigError, match=message):
            load_workflow(wf, STAGES)


BLOCKS = ["down_blocks.1", "mid_block"]


def augmented_workflow(folder, batch_size=4, unit_samples=8):
    return write_extract_workflow(
        folder, dataset="{reader: digits, split: test, limit: 5, resize: adm}", views=3, seed=11,
        augment="{kind: adm_random_crop}", timesteps="[10, 300]", blocks=f"[{', '.join(BLOCKS)}]",
        batch_size=batch_size, unit_samples=unit_samples)


@pytest.fixture(scope="module")
def augmented(tmp_path_factory):
    """Two extracts of 5 digits x 3 views that differ only in batch size and unit size."""
    folder = tmp_path_factory.mktemp("augmented")
    paths = []
    for name, batch, unit in (("a", 4, 8), ("b", 7, 4)):
        wf = augmented_workflow(folder / name, batch, unit)
        Runner(load_workflow(wf, STAGES), progress=False).run()
        paths.append(wf.parent / "out" / "ex.zarr")
    return paths


def test_stored_views_are_the_recorded_crops_and_flips(augmented):
    """Recompute every view from its recorded coordinates, run the model, compare activations."""
    path = augmented[0]
    root = store.open_root(path)
    attrs = store.read_attrs(path)["provenance"]["augment"]
    assert attrs["kind"] == "adm_random_crop" and "16..20" in attrs["side"]
    crops = np.stack([root[name][:] for name in store.CROP_COORDS], axis=1)
    views, flipped = root["view"][:], root["flipped"][:]
    assert (crops[views == 0] == -1).all() and not flipped[views == 0].any()
    assert (crops[views > 0, 0] >= 16).all() and (crops[views > 0, 0] <= 20).all()
    reader = open_dataset(DatasetConfig(reader="digits", split="test", limit=5))
    adapter = load_model(ModelConfig(config=str(path.parent.parent / "tiny_unet.json"), null_class=10))
    prep = Preprocessing(16, channels=1, resize="adm")
    captured = {}
    modules = dict(adapter.module.named_modules())
    handles = [modules[n].register_forward_hook(
        lambda m, i, o, n=n: captured.__setitem__(n, (o[0] if isinstance(o, tuple) else o).detach()))
        for n in BLOCKS]
    try:
        for s, image_id in enumerate(root["image_id"][:]):
            record = reader.records[s // 3]
            assert record.image_id == image_id
            img = reader.load_image(record).convert("L")
            if views[s] == 0:
                pixels = np.asarray(preprocess(img, prep)[0])
            else:
                side, x0, y0 = crops[s]
                rw, rh = rescaled_dims(*img.size, side)
                assert 0 <= x0 <= rw - 16 and 0 <= y0 <= rh - 16
                pixels = published_random_crop(img, 16, int(side), int(y0), int(x0)).astype(np.float32) / 127.5 - 1
            if flipped[s]:
                pixels = pixels[:, ::-1]
            x0_img = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None, None]
            for ti, t in enumerate([10, 300]):
                eps = sample_noise(11, image_id, int(views[s]), t, x0_img.shape[1:])[None]
                abar = adapter.alphas_cumprod[t]
                x_t = (abar.sqrt() * x0_img.double() + (1 - abar).sqrt() * eps.double()).float()
                with torch.no_grad():
                    adapter.module(x_t, torch.tensor([t]), class_labels=torch.tensor([record.label]))
                for n in BLOCKS:
                    stored = root[f"blocks/{n}/activations"][s, ti].astype(np.float32)
                    np.testing.assert_allclose(stored, captured[n][0].numpy(), rtol=2e-3, atol=2e-3)
    finally:
        for h in handles:
            h.remove()


def test_recorded_views_do_not_depend_on_batch_or_unit_size(augmented):
    a, b = (store.open_root(p) for p in augmented)
    assert a["crop_side"].chunks != b["crop_side"].chunks  # per-unit chunks: 8 vs 4 samples
    for name in ("image_id", "view", "flipped", *store.CROP_COORDS):
        np.testing.assert_array_equal(a[name][:], b[name][:])
    assert (a["crop_side"][:] > 0).sum() == 10 and a["flipped"][:].any()
    for block in BLOCKS:
        x = a[f"blocks/{block}/activations"][:].astype(np.float32)
        y = b[f"blocks/{block}/activations"][:].astype(np.float32)
        np.testing.assert_allclose(x, y, rtol=2e-3, atol=1e-4)


def test_derived_stores_keep_the_crop_coordinates(tmp_path):
    n = 6
    crops = np.arange(3 * n, dtype=np.int32).reshape(n, 3)
    samples = store.SampleTable([f"im{i // 3}" for i in range(n)], [i % 3 for i in range(n)],
                                [bool(i % 2) for i in range(n)], [0] * n, crops)
    layout = store.make_layout(n, {"b": (2, 1, 1)}, [1], unit_samples=4)
    store.create_store(tmp_path / "s.zarr", layout, samples, ["a"], {"stage": "extract"})
    again = store.read_sample_table(store.open_root(tmp_path / "s.zarr"))
    np.testing.assert_array_equal(again.crops, crops)
    for name in ("image_id", "view", "flipped"):
        np.testing.assert_array_equal(getattr(again, name), getattr(samples, name))
    plain = store.SampleTable(["x"], [0], [False], [0])
    store.create_store(tmp_path / "p.zarr", store.make_layout(1, {"b": (2, 1, 1)}, [1]), plain, ["a"], {})
    assert store.read_sample_table(store.open_root(tmp_path / "p.zarr")).crops is None


# ----------------------------------------------------------------- the probe protocol


@pytest.fixture(scope="module")
def views_workflow(tmp_path_factory, cluster_address):
    """An augmented extract of 40 digits x 4 views (pooled on the device to 1x1) and a probe
    stage with the paper's protocol; the extract has run."""
    folder = tmp_path_factory.mktemp("views")
    wf = write_extract_workflow(folder, dataset="{reader: digits, split: train, limit: 40}", views=4,
                                augment="{kind: adm_random_crop}", timesteps="[10]", blocks="[mid_block]",
                                pool="{size: 1}", batch_size=32, unit_samples=64)
    text = wf.read_text().replace(
        "output_dir: out\n",
        f'output_dir: out\ncluster: {{kind: address, address: "{cluster_address}", dashboard: false}}\n')
    wf.write_text(text + """  - name: probe
    stage: probe
    input: ex
    train_views: [1, 2, 3]
    test_views: [0]
    test_fraction: 0.25
    train: {epochs: 2}
""")
    workflow = load_workflow(wf, STAGES)
    Runner(workflow, progress=False).run(until="ex")
    return workflow


@pytest.fixture(scope="module")
def views_store(views_workflow):
    return views_workflow.stage("ex").output


def _task(path, **kw) -> GroupTask:
    return GroupTask("g", "mid_block", 1, ((str(path), "blocks/mid_block/activations"),), (10,), (), 10,
                     0.25, 0.0, 8, 64, 0, 1 << 20, 1, **kw)


def test_probe_trains_on_random_views_and_tests_on_the_centre_view(views_store):
    with ZarrSource([(str(views_store), "blocks/mid_block/activations")], [10]) as source:
        views = store.open_root(views_store)["view"][:]
        every_train, every_test = group_splits(source, _task(views_store))
        train, test = group_splits(source, _task(views_store, train_views=(1, 2, 3), test_views=(0,)))
        ids = source.image_ids
    assert not set(ids[train]) & set(ids[test])  # no view of a test image in training
    assert set(views[test]) == {0} and set(views[train]) == {1, 2, 3}
    assert len(test) == len(set(ids[test])) == 10  # each test image once, by its centre view
    assert set(ids[test]) == set(ids[every_test]) and set(ids[train]) == set(ids[every_train])
    assert len(train) == 3 * 30


def test_probe_view_options_are_checked_against_the_store(views_store):
    cfg = ProbeConfig(input="x", train_views=(1, 7), test_views=(0,))
    with pytest.raises(ConfigError, match=r"train_views asks for view\(s\) \[7\].*views \[0, 1, 2, 3\]"):
        build_grid(cfg, views_store, None)
    grid = build_grid(ProbeConfig(input="x", train_views=(1, 2, 3), test_views=(0,)), views_store, None)
    assert {(t.train_views, t.test_views) for t in grid.tasks} == {((1, 2, 3), (0,))}
    with pytest.raises(ValueError, match="test_views"):
        ProbeConfig(input="x", test_views=())


def test_probe_stage_runs_the_paper_protocol(views_workflow):
    import pandas as pd

    Runner(views_workflow, progress=False).run()
    table = pd.read_csv(views_workflow.stage("probe").output / "results.csv")
    # 30 train images (3 of them validation) x views 1-3; 10 test images x view 0
    assert set(table["n_test"]) == {10} and set(table["n_train"]) == {27 * 3} and set(table["n_val"]) == {3 * 3}
