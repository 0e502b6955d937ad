"""A plain image folder: ``root/<class>/<image>`` (optionally ``root/<split>/<class>/<image>``).

Classes are the sorted sub-folder names; image_id is the path relative to the split
folder (``cat/0001.png``). If ``root/<split>/`` exists it is used, otherwise ``root``
itself is the split.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.datasets.base import DatasetReader
from pipeline.datasets.records import Records, RecordsBuilder
from pipeline.datasets.files import files_under, list_folder
from pipeline.errors import DatasetError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def scan_class_folders(base: Path) -> tuple[list[str], Records]:
    """Sorted class folders under ``base`` and their images (ids relative to base, the records' base).

    One listing of ``base`` and one recursive listing per class folder, on object storage too.
    """
    classes = [name for name, kind in list_folder(base) if kind == "directory" and not name.startswith(".")]
    records = RecordsBuilder(base)
    for label, name in enumerate(classes):
        for rel in files_under(base / name):
            if os.path.splitext(rel)[1].lower() in IMAGE_SUFFIXES:
                records.append(f"{name}/{rel}", label)
    return classes, records.build()


class ImageFolderReader(DatasetReader):
    name = "imagefolder"
    splits = ("train", "val", "test", "all")

    def __init__(self, root, split: str = "train", **options):
        super().__init__(root, split, **options)
        base = self.require_root()
        if (base / split).is_dir():
            base = base / split
        classes, records = scan_class_folders(base)
        if not classes:
            raise DatasetError(
                f"imagefolder: no class folders under {str(base)!r}; expected layout root/<class>/<image>"
            )
        if not records:
            raise DatasetError(f"imagefolder: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {str(base)!r}")
        self.class_names = classes
        self.records = records
