"""A split's images as columns: ids, labels and boxes in numpy arrays, not one object per image.

A listing of a million images held as one Python object per image costs ~390 bytes an
image (the object, its id string, its label int, its path); extract, plan and classify
each hold one. :class:`Records` keeps the same information in arrays:

- ``ids``: numpy ``StringDType`` (16 bytes an id inline up to 15 characters, plus the
  characters beyond that in one arena), so the strings are not Python objects;
- ``labels``: int32;
- ``bboxes``: an (n, 4) float64 array of ``(x0, y0, x1, y1)`` with NaN rows for images
  without a box, or None where no image has one;
- ``base``: the one folder (a local ``Path`` or a ``UPath``) an image's file lies in as
  ``base / image_id``: every reader's ids are their file's path below some folder, so
  the paths need no column of their own. None for in-memory datasets (digits).

``records[i]`` and iteration give :class:`Record` views built
on demand (a DataLoader item, an error message); whole-listing work (subsetting, the
dataset identity, the sample table) uses the arrays.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.store.layout import STRINGS


@dataclass(frozen=True, slots=True)
class Record:
    """One image of a split: a view of one row of a reader's ``Records``, built on demand.

    image_id: the dataset's own id (relative path or official id), stable across runs.
    label: 0-based class index into the reader's ``class_names``.
    path: file to decode, or None for in-memory datasets (digits).
    bbox: optional (x0, y0, x1, y1) box in pixels, for bounding-box crops.
    """

    image_id: str
    label: int
    path: Path | None = None
    bbox: tuple[float, float, float, float] | None = None


#: ids collected as Python strings are packed into a StringDType chunk this often, so a
#: listing never holds more than this many id objects at once
_PACK = 65536


class Records:
    """The images of a split in dataset order (see the module docstring for the columns)."""

    __slots__ = ("ids", "labels", "bboxes", "base")

    def __init__(self, ids, labels, bboxes: np.ndarray | None = None, base=None):
        self.ids = np.asarray(ids, dtype=STRINGS)
        self.labels = np.asarray(labels, dtype=np.int32)
        self.bboxes = None if bboxes is None else np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
        self.base = base
        if len(self.labels) != len(self.ids) or (self.bboxes is not None and len(self.bboxes) != len(self.ids)):
            raise ValueError(f"records: {len(self.ids)} ids but {len(self.labels)} labels"
                             + ("" if self.bboxes is None else f" and {len(self.bboxes)} boxes"))

    @classmethod
    def from_records(cls, records, base=None) -> Records:
        """Columns of a sequence of ``Record``-likes (``image_id``, ``label``, ``bbox``); every
        ``path`` must be ``base / image_id`` (or None)."""
        builder = RecordsBuilder(base)
        for r in records:
            if getattr(r, "path", None) is not None and (base is None or r.path != base / r.image_id):
                raise ValueError(f"records: {r.image_id!r} has path {str(r.path)!r}, not under {str(base)!r} "
                                 "as base / image_id")
            builder.append(r.image_id, r.label, getattr(r, "bbox", None))
        return builder.build()

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_bbox(self) -> bool:
        """Whether any image has an annotated box."""
        return self.bboxes is not None and bool((~np.isnan(self.bboxes[:, 0])).any())

    def path(self, i: int):
        """The file of image ``i`` (``base / image_id``), or None for an in-memory dataset."""
        return None if self.base is None else self.base / str(self.ids[i])

    def bbox(self, i: int) -> tuple[float, float, float, float] | None:
        if self.bboxes is None or np.isnan(self.bboxes[i, 0]):
            return None
        return tuple(float(v) for v in self.bboxes[i])

    def take(self, indices) -> Records:
        """The images at ``indices`` (positions or a boolean mask), in that order."""
        return Records(self.ids[indices], self.labels[indices],
                       None if self.bboxes is None else self.bboxes[indices], self.base)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if i < 0:
                i += len(self)
            if not 0 <= i < len(self):
                raise IndexError(f"record {key} out of range for {len(self)} images")
            return Record(str(self.ids[i]), int(self.labels[i]), self.path(i), self.bbox(i))
        return self.take(key)

    def __iter__(self) -> Iterator:
        for i in range(len(self)):
            yield self[i]

    def pairs(self, chunk: int = _PACK) -> Iterator[tuple[str, int]]:
        """``(image_id, label)`` in order, converted a chunk at a time (for hashing)."""
        for start in range(0, len(self), chunk):
            yield from zip(self.ids[start:start + chunk].tolist(), self.labels[start:start + chunk].tolist())

    def __repr__(self) -> str:
        return f"Records({len(self)} images, base={self.base!r})"


class RecordsBuilder:
    """Collects a listing image by image (``append``) and packs it into :class:`Records`.

    Ids are packed into StringDType chunks every ``_PACK`` images, labels and boxes go
    straight into C arrays (boxes from the first image that has one), so building a listing holds at most one chunk of Python
    strings beyond the packed columns.
    """

    def __init__(self, base=None):
        self.base = base
        self._chunks: list[np.ndarray] = []
        self._pending: list[str] = []
        self._labels = array("i")
        self._boxes = array("d")
        self._any_box = False

    def append(self, image_id: str, label: int, bbox=None) -> None:
        """Add one image: its id (its file is ``base / image_id``), 0-based label, optional box."""
        self._pending.append(image_id)
        if len(self._pending) >= _PACK:
            self._pack()
        self._labels.append(int(label))
        if bbox is not None:
            if not self._any_box:  # the images before the first box have none
                self._boxes.extend((np.nan,) * (4 * (len(self._labels) - 1)))
                self._any_box = True
            self._boxes.extend(float(v) for v in bbox)
        elif self._any_box:
            self._boxes.extend((np.nan,) * 4)

    def __len__(self) -> int:
        return len(self._labels)

    def _pack(self) -> None:
        if self._pending:
            self._chunks.append(np.array(self._pending, dtype=STRINGS))
            self._pending = []

    def build(self) -> Records:
        self._pack()
        ids = np.concatenate(self._chunks) if self._chunks else np.array([], dtype=STRINGS)
        boxes = np.frombuffer(self._boxes, dtype=np.float64).reshape(-1, 4).copy() if self._any_box else None
        return Records(ids, np.frombuffer(self._labels, dtype=np.intc).astype(np.int32), boxes, self.base)
