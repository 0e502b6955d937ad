"""Decode + preprocess in DataLoader worker processes (PIL / numpy only, no torchvision).

An image that cannot be read is not an exception that kills the worker, and never a
silently zero-filled sample: the item comes back as an all-NaN array plus the reason,
so the extract stage can record ``(image_id, reason)`` and mask the sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.datasets.base import DatasetReader
from pipeline.datasets.preprocess import Preprocessing, preprocess
from pipeline.errors import DatasetError, ImageReadError


class PreprocessedImages(Dataset):
    """``reader`` as a map-style Dataset of preprocessed arrays.

    Item ``i`` is ``(i, array, error)``: ``i`` the position in ``reader.records``,
    ``array`` a ``(channels, size, size) float32`` array in ``prep.value_range``
    (all NaN when the image failed), ``error`` ``""`` or the reason it failed.
    With ``use_bbox`` the annotated box is cropped first; records without a box use
    the whole image. Picklable (the reader travels to each worker).
    """

    def __init__(self, reader: DatasetReader, prep: Preprocessing, use_bbox: bool = False):
        if use_bbox and not any(r.bbox is not None for r in reader.records):
            raise DatasetError(
                f"crop: bbox needs bounding boxes, but dataset {reader.name!r} (split {reader.split!r}) provides none; "
                "use crop: center"
            )
        self.reader = reader
        self.prep = prep
        self.use_bbox = use_bbox

    def __len__(self) -> int:
        return len(self.reader.records)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray, str]:
        record = self.reader.records[index]
        try:
            img = self.reader.load_image(record)
            array = self.transform(img, record)
        except ImageReadError as exc:
            return index, self.failed(), exc.reason
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            # Decoding is lazy for some formats: a damaged file can fail here, after open().
            return index, self.failed(), f"{type(exc).__name__}: {exc}"
        return index, array, ""

    def transform(self, img: Image.Image, record) -> np.ndarray:
        """The model input(s) of one decoded image (``AugmentedImages`` returns every view)."""
        return preprocess(img, self.prep, record.bbox if self.use_bbox else None, name=record.image_id)

    def failed(self) -> np.ndarray:
        return np.full((self.prep.channels, self.prep.size, self.prep.size), np.nan, dtype=np.float32)


def make_loader(
    reader: DatasetReader,
    prep: Preprocessing,
    indices: Sequence[int] | None = None,
    batch_size: int | None = 32,
    num_workers: int = 0,
    use_bbox: bool = False,
    dataset: PreprocessedImages | None = None,
) -> DataLoader:
    """A DataLoader over ``indices`` (default: all records), in that order.

    Batches are ``(indices (B,) int64 tensor, images (B, C, S, S) float32 tensor,
    errors list[str])``; failed images are NaN rows with a non-empty error.
    ``batch_size=None`` yields single ``(index, (C, S, S) array, error)`` items.
    ``dataset`` replaces the plain ``PreprocessedImages(reader, prep, use_bbox)``.
    """
    dataset = PreprocessedImages(reader, prep, use_bbox) if dataset is None else dataset
    order = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    bad = [i for i in order if not 0 <= i < len(dataset)]
    if bad:
        raise DatasetError(f"sample indices {bad[:5]} are outside 0..{len(dataset) - 1}")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order,
        num_workers=num_workers,
        persistent_workers=False,
        drop_last=False,
    )


def load_images(reader: DatasetReader, prep: Preprocessing, indices: Sequence[int], num_workers: int = 0,
                use_bbox: bool = False, dataset: PreprocessedImages | None = None,
                ) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """Decode + preprocess ``indices`` of ``reader`` in DataLoader workers.

    Returns
    -------
    arrays : index -> (C, H, W) float32 preprocessed image, for the images that decoded
        (with ``dataset``: what its ``transform`` returns, arrays as numpy).
    failures : index -> reason, for the images that did not (never zero-filled).
    """
    arrays, failures = {}, {}
    workers = num_workers if len(indices) > 1 else 0
    loader = make_loader(reader, prep, list(indices), batch_size=None, num_workers=workers, use_bbox=use_bbox,
                         dataset=dataset)
    for index, arr, reason in loader:
        if reason:
            failures[int(index)] = reason
        else:
            arrays[int(index)] = tuple(map(np.asarray, arr)) if isinstance(arr, (tuple, list)) else np.asarray(arr)
    return arrays, failures
