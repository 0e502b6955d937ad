"""ImageNet ILSVRC-2012 classification, in the layouts it is commonly unpacked to.

Images (root, or ``root/ILSVRC/Data/CLS-LOC`` for the Kaggle download)::

    train/<wnid>/<wnid>_<n>.JPEG
    val/<wnid>/ILSVRC2012_val_<n>.JPEG        (val sorted into class folders), or
    val/ILSVRC2012_val_<n>.JPEG               (flat, labels from one of:)
        root/LOC_val_solution.csv             ImageId,PredictionString ("<wnid> x0 y0 x1 y1 ...")
        root/ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt + meta.mat

Classes are the 1000 wnids sorted, which is the standard class index order. The
wnid list comes from ``LOC_synset_mapping.txt`` when present (lines
``n01440764 tench, Tinca tinca``, which also give the class names), else the devkit's
``meta.mat``, else the ``train/`` folder names, else the ``val/`` folder names or the
wnids the val labels use (these last two give fewer than 1000 classes for a partial
copy, which shifts the indices: ship LOC_synset_mapping.txt to avoid that). Without
a names source, class names are the wnids. Class names are not unique in ImageNet
("crane", "maillot" appear twice): select such classes by index.

image_id is the path relative to root. No boxes: ImageNet boxes exist only for part
of the data and can be several per image, so ``crop: bbox`` is not offered here.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from pipeline.datasets.annotations import check_options, load_mat, mat_key, mat_struct_rows, read_lines
from pipeline.datasets.base import DatasetReader
from pipeline.datasets.files import list_folder, open_text
from pipeline.datasets.imagefolder import IMAGE_SUFFIXES
from pipeline.errors import DatasetError

WNID = re.compile(r"^n\d{8}$")
DEVKIT = "ILSVRC2012_devkit_t12/data"
LAYOUT = (
    "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, or flat val/*.JPEG with LOC_val_solution.csv "
    "(or ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt + meta.mat); "
    "optional LOC_synset_mapping.txt for class names"
)


class ImageNetReader(DatasetReader):
    name = "imagenet"
    splits = ("train", "val")

    def __init__(self, root, split: str = "train", **options):
        super().__init__(root, split, **options)
        check_options(self.name, options, {})
        root = self.require_root()
        kaggle = root / "ILSVRC" / "Data" / "CLS-LOC"
        self.image_root = kaggle if kaggle.is_dir() else root
        split_dir = self.image_root / split
        if not split_dir.is_dir():
            rel = split_dir.relative_to(root).as_posix()
            raise DatasetError(f"{self.name}: missing folder {rel!r} under {str(root)!r}; expected layout: {LAYOUT}")

        class_folders = wnid_folders(split_dir)
        if class_folders:
            labelled = [(wnid, path) for wnid in class_folders for path in list_images(split_dir / wnid)]
        else:
            labelled = self.flat_val_labels(split_dir)

        self.wnids, self.class_names = self.class_list(labelled)
        label_of = {wnid: i for i, wnid in enumerate(self.wnids)}
        for wnid, path in labelled:
            if wnid not in label_of:
                raise DatasetError(
                    f"{self.name}: image {path.name!r} has class {wnid!r}, which the class list "
                    f"({self.class_source}) lacks"
                )
            self.listing.append(path.relative_to(root).as_posix(), label_of[wnid])

    def flat_val_labels(self, val_dir: Path) -> list[tuple[str, Path]]:
        """(wnid, path) for a flat val folder, from the Kaggle CSV or the devkit ground truth."""
        if self.split != "val":
            raise DatasetError(
                f"{self.name}: {str(val_dir)!r} has no <wnid>/ class folders; expected layout: {LAYOUT}"
            )
        suffix = ".JPEG"
        existing = list_images(val_dir)
        if existing:
            suffix = existing[0].suffix
        csv_path = self.root / "LOC_val_solution.csv"
        if csv_path.exists():
            pairs = []
            with open_text(csv_path, newline="") as f:
                reader = csv.DictReader(f)
                if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or ()):
                    raise DatasetError(f"{csv_path}: expected columns ImageId,PredictionString, got {reader.fieldnames}")
                for row in reader:
                    tokens = (row["PredictionString"] or "").split()
                    if not tokens:
                        raise DatasetError(f"{csv_path}: image {row['ImageId']!r} has an empty PredictionString")
                    pairs.append((row["ImageId"], tokens[0]))
            pairs.sort()
            return [(wnid, val_dir / f"{image_id}{suffix}") for image_id, wnid in pairs]
        truth = self.root / DEVKIT / "ILSVRC2012_validation_ground_truth.txt"
        if truth.exists():
            ids = [int(x) for x in read_lines(truth)]
            by_id = self.devkit_synsets()
            wnid_of = {ilsvrc_id: wnid for ilsvrc_id, (wnid, _) in by_id.items()}
            out = []
            for n, ilsvrc_id in enumerate(ids, start=1):
                if ilsvrc_id not in wnid_of:
                    raise DatasetError(f"{truth}: line {n} has class id {ilsvrc_id}, which meta.mat lacks")
                out.append((wnid_of[ilsvrc_id], val_dir / f"ILSVRC2012_val_{n:08d}{suffix}"))
            return out
        # Name the file most users have; the message lists the devkit alternative too.
        self.require_file("LOC_val_solution.csv", LAYOUT)
        return []  # unreachable: require_file raised

    def devkit_synsets(self) -> dict[int, tuple[str, str]]:
        """ILSVRC2012_ID -> (wnid, words) for the 1000 leaf classes of the devkit's meta.mat."""
        path = self.require_file(f"{DEVKIT}/meta.mat", LAYOUT)
        rows = mat_struct_rows(mat_key(load_mat(path), "synsets", path), ("ILSVRC2012_ID", "WNID", "words", "num_children"), path)
        return {
            int(r["ILSVRC2012_ID"]): (str(r["WNID"]), str(r["words"]))
            for r in rows
            if int(r["num_children"]) == 0
        }

    def class_list(self, labelled: list[tuple[str, Path]]) -> tuple[list[str], list[str]]:
        """Sorted wnids and their names, from the best source present (see module doc)."""
        mapping = self.root / "LOC_synset_mapping.txt"
        if mapping.exists():
            self.class_source = "LOC_synset_mapping.txt"
            entries = {}
            for n, line in enumerate(read_lines(mapping), start=1):
                wnid, _, words = line.partition(" ")
                if not WNID.match(wnid):
                    raise DatasetError(f"{mapping}: line {n} does not start with a wnid: {line[:60]!r}")
                entries[wnid] = words.strip() or wnid
            wnids = sorted(entries)
            return wnids, [entries[w] for w in wnids]
        if (self.root / DEVKIT / "meta.mat").exists():
            self.class_source = f"{DEVKIT}/meta.mat"
            entries = dict(self.devkit_synsets().values())
            wnids = sorted(entries)
            return wnids, [entries[w] for w in wnids]
        train_dir = self.image_root / "train"
        wnids = wnid_folders(train_dir) if train_dir.is_dir() else []
        self.class_source = "train/ folder names"
        if not wnids:
            wnids = sorted({wnid for wnid, _ in labelled})
            self.class_source = f"{self.split} labels"
        return wnids, list(wnids)


def wnid_folders(folder: Path) -> list[str]:
    """Sorted names of the sub-folders that look like WordNet ids (n01440764)."""
    return [name for name, kind in list_folder(folder) if kind == "directory" and WNID.match(name)]


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (one listing: os.scandir, fast on 1.28M files)."""
    return [folder / name for name, kind in list_folder(folder)
            if kind == "file" and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES]
