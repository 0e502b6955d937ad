"""Stanford Dogs (120 breeds, ImageNet images).

Layout (root holds the unpacked ``images.tar``, ``lists.tar`` and, optionally,
``annotation.tar``)::

    Images/<wnid>-<Breed_Name>/<wnid>_<n>.jpg
    lists/train_list.mat    file_list: N x 1 cell ('n02085620-Chihuahua/n02085620_5927.jpg'),
                            labels: N x 1, 1-based
    lists/test_list.mat
    Annotation/<wnid>-<Breed_Name>/<wnid>_<n>     optional PASCAL-VOC XML boxes

Splits ``train`` (12000) and ``test`` (8580). Labels are ``labels - 1``, which index
the sorted breed folders; class names are the folder names without the wnid and with
underscores as spaces (``n02085782-Japanese_spaniel`` -> ``Japanese spaniel``). The
folder of every listed file is checked against its label. When ``Annotation/`` is
present, records carry a box enclosing all annotated dogs of the image (an image
may show several). image_id is ``Images/<folder>/<file>``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from pipeline.datasets.annotations import check_options, load_mat, mat_ints, mat_key, mat_strings, matlab_box, readable
from pipeline.datasets.base import DatasetReader
from pipeline.datasets.files import files_under, read_many
from pipeline.errors import DatasetError

LAYOUT = "Images/<wnid>-<breed>/*.jpg, lists/{train_list.mat, test_list.mat} (file_list, labels), optional Annotation/"


class DogsReader(DatasetReader):
    name = "dogs"
    splits = ("train", "test")

    def __init__(self, root, split: str = "train", **options):
        super().__init__(root, split, **options)
        check_options(self.name, options, {})
        root = self.require_root()
        list_path = self.require_file(f"lists/{split}_list.mat", LAYOUT)
        mat = load_mat(list_path)
        files = mat_strings(mat_key(mat, "file_list", list_path))
        labels = mat_ints(mat_key(mat, "labels", list_path))
        if len(files) != len(labels):
            raise DatasetError(f"{list_path}: {len(files)} entries in file_list but {len(labels)} labels")
        image_dir = root / "Images"
        if not image_dir.is_dir():
            raise DatasetError(f"{self.name}: missing folder 'Images/' under {str(root)!r}; expected layout: {LAYOUT}")
        self.class_folders = sorted(p.name for p in image_dir.iterdir() if p.is_dir())
        self.class_names = [readable(f.split("-", 1)[1] if "-" in f else f) for f in self.class_folders]
        annotation_dir = root / "Annotation"
        boxes = {}
        # One listing (empty when there is no Annotation/) and one batched read of the XML
        # files (one per image): on object storage a few round trips, not a request per image.
        present = set(files_under(annotation_dir))
        if present:
            wanted = [str(Path(rel).with_suffix("").as_posix()) for rel in files]
            boxes = {rel: union_box_of(data) for rel, data in
                     read_many(annotation_dir, [w for w in wanted if w in present]).items()}
        for rel, label in zip(files, labels):
            folder = rel.split("/", 1)[0]
            if not 1 <= label <= len(self.class_folders):
                raise DatasetError(
                    f"{list_path}: {rel!r} has label {label}, but Images/ holds {len(self.class_folders)} breed folders"
                )
            if self.class_folders[label - 1] != folder:
                raise DatasetError(
                    f"{list_path}: {rel!r} has label {label}, which is folder {self.class_folders[label - 1]!r} "
                    "among the sorted Images/ folders; Images/ must hold exactly the 120 breed folders"
                )
            box = boxes.get(Path(rel).with_suffix("").as_posix())
            self.listing.append(f"Images/{rel}", label - 1, box)  # its file: root / "Images" / rel


def union_box_of(data: bytes) -> tuple[float, float, float, float] | None:
    """The box around every ``<object><bndbox>`` of a VOC file's bytes, or None if it has none
    or does not parse."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError:
        return None
    boxes = []
    for bnd in root.iter("bndbox"):
        try:
            boxes.append([float(bnd.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
        except (TypeError, ValueError):
            continue
    if not boxes:
        return None
    # VOC boxes are 1-based inclusive pixel corners, like MATLAB's.
    return matlab_box(min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
