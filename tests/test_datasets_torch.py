"""The DataLoader wrapper: preprocessed arrays out, decoding failures returned, never zero-filled."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.datasets import Preprocessing
from pipeline.datasets.base import DatasetReader, Record
from pipeline.datasets.imagefolder import ImageFolderReader
from pipeline.datasets.torch_data import DecodeAhead, PreprocessedImages, load_images, make_loader
from pipeline.errors import DatasetError

PREP = Preprocessing(size=8, channels=3, value_range=(-1.0, 1.0))


@pytest.fixture
def folder(tmp_path) -> Path:
    """imagefolder tree: a/0 red, a/1 truncated JPEG, b/2 gray, b/3 not an image, b/4 blue PNG."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.new("RGB", (20, 12), (255, 0, 0)).save(tmp_path / "a" / "0.jpg")
    Image.new("RGB", (64, 64), (0, 255, 0)).save(tmp_path / "a" / "1.jpg")
    data = (tmp_path / "a" / "1.jpg").read_bytes()
    (tmp_path / "a" / "1.jpg").write_bytes(data[: len(data) // 2])
    Image.new("L", (12, 20), 0).save(tmp_path / "b" / "2.jpg")
    (tmp_path / "b" / "3.jpg").write_bytes(b"not an image at all")
    Image.new("RGBA", (10, 10), (0, 0, 255, 255)).save(tmp_path / "b" / "4.png")
    return tmp_path


def test_items_return_arrays_or_nan_with_reason(folder):
    reader = ImageFolderReader(folder, "all")
    assert [r.image_id for r in reader.records] == ["a/0.jpg", "a/1.jpg", "b/2.jpg", "b/3.jpg", "b/4.png"]
    data = PreprocessedImages(reader, PREP, use_bbox=False)
    index, red, error = data[0]
    assert index == 0 and error == "" and red.shape == (3, 8, 8) and red.dtype == np.float32
    assert red[0].min() > 0.9 and red[1].max() < -0.9
    index, bad, error = data[1]
    assert index == 1 and "truncated" in error.lower()
    assert bad.shape == (3, 8, 8) and np.isnan(bad).all()  # NaN, never zeros
    _, gray, error = data[2]
    assert error == "" and np.allclose(gray, -1.0, atol=0.02)
    _, junk, error = data[3]
    assert "cannot identify image file" in error and np.isnan(junk).all()
    _, blue, _ = data[4]
    assert blue[2].min() > 0.99 and blue[0].max() < -0.99


def test_dataloader_with_two_workers_returns_reasons(folder):
    reader = ImageFolderReader(folder, "all")
    loader = make_loader(reader, PREP, indices=[4, 3, 2, 1, 0], batch_size=2, num_workers=2)
    seen, errors, images = [], {}, {}
    for idx, batch, errs in loader:
        assert batch.dtype.is_floating_point and tuple(batch.shape[1:]) == (3, 8, 8)
        for i, x, e in zip(idx.tolist(), batch.numpy(), errs):
            seen.append(i)
            errors[i] = e
            images[i] = x
    assert seen == [4, 3, 2, 1, 0]  # the requested order, across workers
    assert errors[0] == errors[2] == errors[4] == ""
    assert "truncated" in errors[1].lower() and "cannot identify" in errors[3]
    assert np.isnan(images[1]).all() and np.isnan(images[3]).all()
    assert np.isfinite(images[0]).all() and images[0][0].mean() > 0.9


def test_bbox_crop_through_the_wrapper(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste(Image.new("RGB", (20, 20), (0, 0, 255)), (20, 0))
    img.save(tmp_path / "x.png")
    reader = DatasetReader(tmp_path, "train")
    reader.records = [Record("x.png", 0, tmp_path / "x.png", bbox=(20.0, 0.0, 40.0, 20.0))]
    boxed = PreprocessedImages(reader, PREP, use_bbox=True)[0][1]
    centre = PreprocessedImages(reader, PREP, use_bbox=False)[0][1]
    assert boxed[2].min() > 0.99 and boxed[0].max() < -0.99
    assert centre[0, :, 0].mean() > 0.9  # the centre crop still holds red on its left edge


def test_bbox_crop_refused_without_boxes(folder):
    reader = ImageFolderReader(folder, "all")
    with pytest.raises(DatasetError, match="crop: bbox needs bounding boxes.*'imagefolder'"):
        PreprocessedImages(reader, PREP, use_bbox=True)


def test_dataset_pickles_and_bad_indices_are_refused(folder):
    reader = ImageFolderReader(folder, "all")
    clone = pickle.loads(pickle.dumps(PreprocessedImages(reader, PREP)))
    assert clone[2][2] == "" and len(clone) == 5
    with pytest.raises(DatasetError, match=r"sample indices \[7\] are outside 0..4"):
        make_loader(reader, PREP, indices=[0, 7], batch_size=2, num_workers=0)


def test_unbatched_loader_yields_single_items(folder):
    reader = ImageFolderReader(folder, "all")
    items = list(make_loader(reader, PREP, indices=[3, 0], batch_size=None, num_workers=0))
    assert [(i, e == "") for i, _, e in items] == [(3, False), (0, True)]
    assert tuple(items[1][1].shape) == (3, 8, 8)


@pytest.mark.parametrize("threads, workers", [(0, 0), (1, 0), (2, 0), (0, 2)])
def test_decode_ahead_gives_each_group_what_load_images_gives(folder, threads, workers):
    """On the forward's thread, in threads ahead of it or in worker processes: the same
    arrays and the same failure reasons, group by group, in order."""
    reader = ImageFolderReader(folder, "all")
    groups = [[3, 0], [1], [4, 2]]
    with DecodeAhead(PreprocessedImages(reader, PREP), groups, threads=threads, workers=workers) as ahead:
        got = list(ahead)
    assert len(got) == len(groups)
    for (arrays, failures), group in zip(got, groups):
        want_arrays, want_failures = load_images(reader, PREP, group)
        assert sorted(arrays) == sorted(want_arrays) and failures == want_failures
        for i in arrays:
            np.testing.assert_array_equal(arrays[i], want_arrays[i])
    assert sorted(got[0][1]) == [3] and sorted(got[1][1]) == [1]  # the junk file and the truncated JPEG


def test_decode_ahead_refuses_bad_indices_and_stops_when_closed(folder):
    reader = ImageFolderReader(folder, "all")
    with pytest.raises(DatasetError, match=r"sample indices \[9\] are outside 0..4"):
        DecodeAhead(PreprocessedImages(reader, PREP), [[0], [9]])
    ahead = DecodeAhead(PreprocessedImages(reader, PREP), [[0], [1], [2], [3]], threads=1)
    groups = iter(ahead)
    assert sorted(next(groups)[0]) == [0]
    ahead.close()  # the consumer stopped early (an interrupted run): nothing more is decoded or served
    assert list(groups) == []
