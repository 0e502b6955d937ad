"""Oxford Flowers-102 (8189 images, 102 classes).

Layout (root is the folder the three downloads were unpacked to)::

    imagelabels.mat     labels: 1 x 8189, 1-based class of image_{i:05d}
    setid.mat           trnid, valid, tstid: 1-based image numbers of each split
    jpg/image_00001.jpg ...

Splits ``train`` (trnid, 1020), ``val`` (valid, 1020), ``test`` (tstid, 6149) and
``trainval`` (trnid + valid). The official split is deliberately small for
training: ``test`` is the large one. The dataset itself ships only numbers; class
names (label order) are the list the Diffusion Classifier's code uses (its
``prompts/flowers_prompts.csv``), shipped as package data in
``pipeline/datasets/classnames/flowers102.txt``. image_id is ``jpg/image_NNNNN.jpg``.
"""

from __future__ import annotations

from importlib import resources

from pipeline.datasets.annotations import check_options, load_mat, mat_ints, mat_key
from pipeline.datasets.base import DatasetReader
from pipeline.errors import DatasetError

NUM_CLASSES = 102
SPLIT_KEYS = {"train": ("trnid",), "val": ("valid",), "test": ("tstid",), "trainval": ("trnid", "valid")}
LAYOUT = "imagelabels.mat, setid.mat, jpg/image_NNNNN.jpg"


class FlowersReader(DatasetReader):
    name = "flowers"
    splits = tuple(SPLIT_KEYS)

    def __init__(self, root, split: str = "train", **options):
        super().__init__(root, split, **options)
        check_options(self.name, options, {})
        root = self.require_root()
        labels_path = self.require_file("imagelabels.mat", LAYOUT)
        setid_path = self.require_file("setid.mat", LAYOUT)
        labels = mat_ints(mat_key(load_mat(labels_path), "labels", labels_path))
        setid = load_mat(setid_path)
        numbers = sorted(n for key in SPLIT_KEYS[split] for n in mat_ints(mat_key(setid, key, setid_path)))
        self.class_names = flower_names()
        for n in numbers:
            if not 1 <= n <= len(labels):
                raise DatasetError(f"{setid_path}: image number {n} is outside 1..{len(labels)} (imagelabels.mat)")
            label = labels[n - 1]
            if not 1 <= label <= len(self.class_names):
                raise DatasetError(f"{labels_path}: image {n} has label {label}, outside 1..{len(self.class_names)}")
            self.listing.append(f"jpg/image_{n:05d}.jpg", label - 1)


def flower_names() -> list[str]:
    """The 102 shipped class names in label order (package data)."""
    text = (resources.files("pipeline.datasets") / "classnames" / "flowers102.txt").read_text(encoding="utf-8")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != NUM_CLASSES:  # a broken installation, not a user error
        raise RuntimeError(f"pipeline/datasets/classnames/flowers102.txt has {len(names)} names, not {NUM_CLASSES}")
    return names
