"""The dataset reader interface every reader implements, and subsetting.

A reader knows one dataset's native on-disk layout. It lists the official split as
columnar :class:`~pipeline.datasets.records.Records` (stable ``image_id``, integer
label, optional box; class names beside them) and decodes one image (a ``Record``
view of one row) to a PIL image. Everything after decoding (resize, crop, normalise) is the
shared, deterministic ``preprocess`` so that every dataset is treated alike and the
settings can be recorded in the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from pipeline.datasets.files import dataset_root, open_binary
from pipeline.datasets.records import Record, Records, RecordsBuilder  # Record re-exported
from pipeline.errors import DatasetError, ImageReadError


@dataclass(frozen=True)
class DatasetConfig:
    """Which dataset, split and subset to read.

    reader: registered reader name (``digits``, ``imagefolder``, ``imagenet``, ``cub`` ...).
    root: the dataset's root folder in its native layout (None for digits): a local path
        or a URL (``s3://...``; :mod:`pipeline.datasets.files`), opened with the workflow's
        ``storage_options``.
    split: the official split name the reader understands (``train``, ``test``, ``val`` ...).
    limit: keep at most this many images (after ``classes``/``per_class``), chosen with ``seed``.
    classes: keep only these classes (names or 0-based indices); labels stay the dataset's.
    per_class: keep at most this many images per class, chosen with ``seed``.
    seed: seed for the subset choice; the kept images stay in dataset order.
    crop: ``center`` (resize shorter side, centre crop) or ``bbox`` (crop to the
        annotated box first, for CUB / Cars / Aircraft).
    resize: the resize recipe (``pipeline.datasets.recipes``): ``direct``
        (diffprobe's original: one bicubic resize, alpha on white), ``adm``
        (guided-diffusion's ``center_crop_arr``, arXiv 2307.08702) or
        ``torchvision`` (``Resize`` + ``CenterCrop``, the Stable Diffusion runs of
        arXiv 2303.16203).
    options: reader-specific extras (e.g. ``variant: family`` for Aircraft).
    """

    reader: str = "digits"
    root: str | None = field(default=None, metadata={"path": "path"})
    split: str = "train"
    limit: int | None = None
    classes: tuple[str | int, ...] | None = None
    per_class: int | None = None
    seed: int = 0
    crop: str = "center"
    resize: Literal["direct", "adm", "torchvision"] = "direct"
    options: dict = field(default_factory=dict)


class DatasetReader:
    """Base class. Subclasses fill ``self.listing`` (a ``RecordsBuilder`` over the folder
    their ids are paths in) and set ``class_names`` in ``__init__``; ``records`` is the
    built listing."""

    name: str = "base"
    splits: tuple[str, ...] = ("train", "test")

    def __init__(self, root: Path | None, split: str, **options):
        if split not in self.splits:
            raise DatasetError(
                f"dataset {self.name!r} has no split {split!r}; valid: {', '.join(self.splits)}"
            )
        self.root = dataset_root(root) if root is not None else None
        self.split = split
        self.options = options
        self.listing = RecordsBuilder(self.root)
        self._records: Records | None = None
        self.class_names: list[str] = []

    @property
    def records(self) -> Records:
        """The split's images (the listing, built on first use)."""
        if self._records is None:
            self._records = self.listing.build()
            self.listing = None
        return self._records

    @records.setter
    def records(self, value: Records) -> None:
        base = self._records.base if self._records is not None else self.root
        self._records = value if isinstance(value, Records) else Records.from_records(value, base)
        self.listing = None

    def require_root(self) -> Path:
        if self.root is None:
            raise DatasetError(f"dataset {self.name!r} needs 'root:' (the folder it was unpacked to)")
        if not self.root.is_dir():
            raise DatasetError(
                f"dataset root {str(self.root)!r} for {self.name!r} does not exist; set 'root:' to the unpacked dataset folder"
            )
        return self.root

    def require_file(self, relative: str, layout_hint: str) -> Path:
        """Path of an annotation file, or a DatasetError naming it and the layout expected."""
        path = self.require_root() / relative
        if not path.exists():
            raise DatasetError(
                f"{self.name}: missing {relative!r} under {str(self.root)!r}; expected layout: {layout_hint}"
            )
        return path

    def load_image(self, record: Record) -> Image.Image:
        """Decode one image as PIL (any mode); raise ImageReadError on failure."""
        if record.path is None:
            raise NotImplementedError(f"{type(self).__name__} must override load_image")
        try:
            with open_binary(record.path) as f, Image.open(f) as img:
                img.load()
                return img.copy()
        except FileNotFoundError:
            raise ImageReadError(record.image_id, f"file not found: {record.path}") from None
        except (OSError, SyntaxError, ValueError) as exc:  # PIL raises these for corrupt/truncated files
            raise ImageReadError(record.image_id, f"{type(exc).__name__}: {exc}") from None

    def __len__(self) -> int:
        return len(self.records)


def select_subset(records: Records, class_names: Sequence[str], cfg: DatasetConfig) -> Records:
    """Apply ``classes``, ``per_class`` and ``limit`` deterministically (dataset order kept).

    The draws are those of the list-of-records version this replaced, on the same seed:
    ``per_class`` draws each class's positions (within the kept images) in order of the
    class's first appearance, then ``limit`` draws positions among what is left.
    """
    rng = np.random.default_rng(cfg.seed)
    keep = np.arange(len(records))
    labels = records.labels
    if cfg.classes:
        wanted = set()
        for c in cfg.classes:
            if str(c) in class_names:
                wanted.add(list(class_names).index(str(c)))
            elif str(c).isdigit() and int(c) < len(class_names):
                wanted.add(int(c))
            else:
                raise DatasetError(f"unknown class {c!r} in 'classes'; use a class name or 0-based index")
        keep = keep[np.isin(labels, sorted(wanted))]
    if cfg.per_class is not None:
        kept = labels[keep]
        classes, first = np.unique(kept, return_index=True)
        chosen = np.zeros(len(keep), dtype=bool)
        by_class = np.split(np.argsort(kept, kind="stable"), np.cumsum(np.bincount(np.searchsorted(classes, kept)))[:-1])
        for k in np.argsort(first):  # each class's positions, ascending, as the old lists held them
            idx = by_class[k]
            chosen[rng.choice(idx, size=min(cfg.per_class, len(idx)), replace=False)] = True
        keep = keep[chosen]
    if cfg.limit is not None and cfg.limit < len(keep):
        chosen = np.zeros(len(keep), dtype=bool)
        chosen[rng.choice(len(keep), size=cfg.limit, replace=False)] = True
        keep = keep[chosen]
    return records if len(keep) == len(records) else records.take(keep)
