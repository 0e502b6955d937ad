"""Caltech-UCSD Birds-200-2011, read from the files of ``CUB_200_2011.tgz``.

Layout (root is the ``CUB_200_2011`` folder or the folder that contains it)::

    images.txt              <image_id> <relative path under images/>
    image_class_labels.txt  <image_id> <class_id>          (1-based)
    train_test_split.txt    <image_id> <1 = train, 0 = test>
    classes.txt             <class_id> <NNN.Folder_Name>
    bounding_boxes.txt      <image_id> <x> <y> <width> <height>   (optional; pixels)
    images/<NNN.Folder_Name>/<file>.jpg

Splits ``train`` (5994 images) and ``test`` (5794). Labels are 0-based positions in
the sorted class ids; class names drop the ``NNN.`` prefix and underscores
(``001.Black_footed_Albatross`` -> ``Black footed Albatross``). image_id is the path
relative to the ``CUB_200_2011`` folder. Records carry the annotated box as
``(x, y, x + width, y + height)``.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.datasets.annotations import check_options, read_id_map, read_rows, readable, xywh_to_box
from pipeline.datasets.base import DatasetReader
from pipeline.datasets.records import RecordsBuilder
from pipeline.errors import DatasetError


class CUBReader(DatasetReader):
    name = "cub"
    splits = ("train", "test")
    folder = "CUB_200_2011"
    layout = (
        "CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, "
        "bounding_boxes.txt, images/<class>/<file>.jpg}"
    )

    def __init__(self, root, split: str = "train", **options):
        super().__init__(root, split, **options)
        check_options(self.name, options, {})
        base = self.dataset_folder()
        rel = base.relative_to(self.root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        image_paths = read_id_map(self.require_file(prefix + "images.txt", self.layout))
        image_classes = read_id_map(self.require_file(prefix + "image_class_labels.txt", self.layout), int)
        is_train = read_id_map(self.require_file(prefix + "train_test_split.txt", self.layout), int)
        class_table = read_class_table(self.require_file(prefix + "classes.txt", self.layout))
        boxes = {}
        if (base / "bounding_boxes.txt").exists():
            for fields in read_rows(base / "bounding_boxes.txt", 5):
                boxes[fields[0]] = xywh_to_box(*map(float, fields[1:5]))

        class_ids = self.label_space(class_table, image_classes)
        unknown = [cid for cid in class_ids if cid not in class_table]
        if unknown:
            raise DatasetError(f"{self.name}: image_class_labels.txt uses class id(s) {unknown[:5]} that classes.txt lacks")
        label_of = {cid: i for i, cid in enumerate(class_ids)}
        self.class_ids = class_ids
        self.class_names = [self.clean_name(class_table[cid]) for cid in class_ids]

        want_train = split == "train"
        self.listing = RecordsBuilder(base)
        for image_id, rel_path in image_paths.items():
            for table, what in ((image_classes, "image_class_labels.txt"), (is_train, "train_test_split.txt")):
                if image_id not in table:
                    raise DatasetError(f"{self.name}: image {image_id!r} from images.txt has no line in {what}")
            if bool(is_train[image_id]) != want_train:
                continue
            class_id = image_classes[image_id]
            if class_id not in label_of:
                raise DatasetError(f"{self.name}: image {image_id!r} has class {class_id}, which classes.txt lacks")
            path = base / "images" / rel_path
            self.listing.append(path.relative_to(base).as_posix(), label_of[class_id], boxes.get(image_id))

    def dataset_folder(self) -> Path:
        """The folder holding ``images.txt``: root itself or ``root/<folder>``."""
        root = self.require_root()
        if not (root / "images.txt").exists() and (root / self.folder / "images.txt").exists():
            return root / self.folder
        return root

    def label_space(self, class_table: dict, image_classes: dict) -> list[int]:
        """Class ids in label order: every class of classes.txt, sorted by id."""
        return sorted(class_table)

    @staticmethod
    def clean_name(name: str) -> str:
        return readable(re.sub(r"^\d+\.", "", name))


def read_class_table(path: Path) -> dict[int, str]:
    """``<class_id> <name>`` lines as {int id: name}."""
    table = {}
    for key, name in read_id_map(path).items():
        if not key.isdigit():
            raise DatasetError(f"{path}: class id {key!r} is not an integer")
        table[int(key)] = name
    return table
