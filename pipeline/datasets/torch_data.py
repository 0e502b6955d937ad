"""Decode + preprocess images (PIL / numpy only, no torchvision): in the caller's thread,
in a thread pool ahead of it, or in DataLoader worker processes.

An image that cannot be read is not an exception that kills the worker, and never a
silently zero-filled sample: the item comes back as an all-NaN array plus the reason,
so the extract stage can record ``(image_id, reason)`` and mask the sample.

:class:`DecodeAhead` decodes groups of images (the extract stage's units) one group
ahead of the consumer, so decoding overlaps the forward instead of preceding it.
Threads are the cheaper carrier for small images: PIL's decoders and resizes and
numpy's arithmetic release the GIL, and a thread costs no pickling; DataLoader
workers (processes) pay a fork per loader and a pickle per batch but take Python
work off the consumer's interpreter, which pays off when each image costs more
(large JPEGs on a node with cores to spare). ``benchmarks/extract_throughput.py``
measures both.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

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
        if use_bbox and not reader.records.has_bbox:
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
    _check_indices(order, len(dataset))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order,
        num_workers=num_workers,
        persistent_workers=False,
        drop_last=False,
    )


#: What decoding a group gives: (index -> preprocessed image, index -> failure reason).
Decoded = tuple[dict[int, np.ndarray], dict[int, str]]


def _collect(items, arrays: dict, failures: dict) -> None:
    for index, arr, reason in items:
        if reason:
            failures[int(index)] = reason
        else:
            arrays[int(index)] = tuple(map(np.asarray, arr)) if isinstance(arr, (tuple, list)) else np.asarray(arr)


def _decode(dataset: Dataset, indices: Sequence[int]) -> list[tuple[int, np.ndarray, str]]:
    return [dataset[int(i)] for i in indices]


def _as_list(items: list) -> list:
    return items


def load_images(reader: DatasetReader, prep: Preprocessing, indices: Sequence[int], num_workers: int = 0,
                use_bbox: bool = False, dataset: PreprocessedImages | None = None) -> Decoded:
    """Decode + preprocess ``indices`` of ``reader`` here (``num_workers=0``) or in DataLoader workers.

    Returns
    -------
    arrays : index -> (C, H, W) float32 preprocessed image, for the images that decoded
        (with ``dataset``: what its ``transform`` returns, arrays as numpy).
    failures : index -> reason, for the images that did not (never zero-filled).
    """
    arrays, failures = {}, {}
    dataset = PreprocessedImages(reader, prep, use_bbox) if dataset is None else dataset
    if num_workers == 0 or len(indices) <= 1:
        # A plain loop: the DataLoader's per-item tensor conversion costs more than the decode of a small image.
        _check_indices([int(i) for i in indices], len(dataset))
        _collect(_decode(dataset, indices), arrays, failures)
        return arrays, failures
    loader = make_loader(reader, prep, list(indices), batch_size=None, num_workers=num_workers, use_bbox=use_bbox,
                         dataset=dataset)
    _collect(loader, arrays, failures)
    return arrays, failures


def _check_indices(order: list[int], n: int) -> None:
    bad = [i for i in order if not 0 <= i < n]
    if bad:
        raise DatasetError(f"sample indices {bad[:5]} are outside 0..{n - 1}")


class DecodeAhead:
    """Decode + preprocess ``groups`` of images in order, one group ahead of the consumer.

    Parameters
    ----------
    dataset : PreprocessedImages
        Item ``i`` is ``(i, array, error)`` (an ``AugmentedImages`` too).
    groups : sequence of sequences of int
        Dataset positions per group (the extract stage: one group per unit, in the
        order the units will be computed).
    threads : int
        With ``workers == 0``: threads decoding the next group while the consumer
        works on the current one (each group split among them); 0 decodes each group
        in the consumer's thread when it is asked for (nothing ahead).
    workers : int
        DataLoader worker processes instead of threads (one loader, forked once, for
        all groups; each group split among the workers).

    Iterating yields one :data:`Decoded` ``(arrays, failures)`` per group, in order
    (see :func:`load_images`). :meth:`close` (or the ``with`` block's end) stops the
    work ahead.
    """

    def __init__(self, dataset: PreprocessedImages, groups: Sequence[Sequence[int]], threads: int = 1,
                 workers: int = 0):
        self.groups = [[int(i) for i in g] for g in groups]
        for group in self.groups:
            _check_indices(group, len(dataset))
        self.dataset, self.threads, self.workers = dataset, int(threads), int(workers)
        self._pool: ThreadPoolExecutor | None = None
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[Decoded]:
        if self.workers > 0:
            yield from self._processes()
        elif self.threads > 0:
            yield from self._threaded()
        else:
            for group in self.groups:
                arrays, failures = {}, {}
                _collect(_decode(self.dataset, group), arrays, failures)
                yield arrays, failures

    @staticmethod
    def _split(group: list[int], parts: int) -> list[list[int]]:
        size = max(1, -(-len(group) // parts))
        return [group[i:i + size] for i in range(0, len(group), size)] or [[]]

    def _threaded(self) -> Iterator[Decoded]:
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="diffprobe-decode")
        pending: deque[list[Future]] = deque()
        todo = iter(self.groups)

        def submit() -> None:
            group = next(todo, None)
            if group is not None and not self._closed.is_set():
                pending.append([self._pool.submit(_decode, self.dataset, part)
                                for part in self._split(group, self.threads)])

        try:
            submit()
            while pending and not self._closed.is_set():
                futures = pending.popleft()
                submit()  # the next group decodes while the consumer works on this one
                arrays, failures = {}, {}
                for future in futures:
                    _collect(future.result(), arrays, failures)
                yield arrays, failures
        finally:
            self.close()

    def _processes(self) -> Iterator[Decoded]:
        batches, owner = [], []
        for g, group in enumerate(self.groups):
            for part in self._split(group, self.workers):
                batches.append(part)
                owner.append(g)
        # prefetch_factor 1: each worker holds one part ahead, so about one group waits decoded.
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers,
                            collate_fn=_as_list, prefetch_factor=1, persistent_workers=False)
        arrays, failures, current = {}, {}, 0
        for g, items in zip(owner, loader):
            if g != current:
                yield arrays, failures
                arrays, failures, current = {}, {}, g
            _collect(items, arrays, failures)
        if self.groups:
            yield arrays, failures

    def close(self) -> None:
        """Stop decoding ahead (the group being decoded finishes in its thread)."""
        self._closed.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> DecodeAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
