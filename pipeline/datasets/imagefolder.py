"""A plain image folder: ``root/<class>/<image>`` (optionally ``root/<split>/<class>/<image>``).

Classes are the sorted sub-folder names; image_id is the path relative to the split
folder (``cat/0001.png``). If ``root/<split>/`` exists it is used, otherwise ``root``
itself is the split.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.datasets.base import DatasetReader, Record
from pipeline.datasets.files import files_under, list_folder
from pipeline.errors import DatasetError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def scan_class_folders(base: Path) -> tuple[list[str], list[Record]]:
    """Sorted class folders under ``base`` and their images as Records (ids relative to base).

    One listing of ``base`` and one recursive listing per class folder, on object storage too.
    """
    classes = [name for name, kind in list_folder(base) if kind == "directory" and not name.startswith(".")]
    records = []
    for label, name in enumerate(classes):
        folder = base / name
        for rel in files_under(folder):
            if os.path.splitext(rel)[1].lower() in IMAGE_SUFFIXES:
                records.append(Record(image_id=f"{name}/{rel}", label=label, path=folder / rel))
    return classes, records


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
