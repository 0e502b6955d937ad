"""Stanford Cars (196 classes), in the three layouts it circulates in.

1. The devkit (``car_devkit.tgz`` + ``cars_train.tgz`` + ``cars_test.tgz`` +
   ``cars_test_annos_withlabels.mat``; torchvision's layout)::

       devkit/cars_meta.mat               class_names: 1 x 196 cell of strings
       devkit/cars_train_annos.mat        annotations: struct array with fields
                                          bbox_x1 bbox_y1 bbox_x2 bbox_y2 class fname
       cars_test_annos_withlabels.mat     same struct, test split with labels
                                          (also accepted inside devkit/)
       cars_train/<fname>   cars_test/<fname>   (or cars_train/cars_train/ as in
                                          some re-uploads)

   ``devkit/cars_test_annos.mat`` has no labels; it is not enough for ``test``.
2. The all-in-one release: ``cars_annos.mat`` (annotations with relative_im_path,
   bbox_x1 bbox_y1 bbox_x2 bbox_y2, class, test; and class_names) + ``car_ims/``.
3. The Kaggle "Stanford Car Dataset by classes folder" CSV re-packaging::

       names.csv                one class name per line, no header
       anno_train.csv           fname,x1,y1,x2,y2,class  (no header, class 1-based)
       anno_test.csv
       car_data/car_data/{train,test}/<class name>/<fname>

   Class folders there do not always equal the names.csv text (``Ram C/V`` is
   stored as ``Ram C-V``), so images are found by file name within the split folder.

Splits ``train`` (8144) and ``test`` (8041). Labels are ``class - 1``; class names in
that order. Boxes are 1-based inclusive pixel corners in the files; records carry
them as 0-based ``(x0, y0, x1, y1)`` edges. image_id is the path relative to root.
The layout is detected in the order above.
"""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline.datasets.annotations import (
    check_options,
    load_mat,
    mat_key,
    mat_strings,
    mat_struct_rows,
    matlab_box,
    read_lines,
)
from pipeline.datasets.base import DatasetReader
from pipeline.datasets.files import files_under, open_text
from pipeline.errors import DatasetError

BOX_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
LAYOUT = (
    "devkit/{cars_meta.mat, cars_train_annos.mat} + cars_test_annos_withlabels.mat + cars_train/ + cars_test/; "
    "or cars_annos.mat + car_ims/; or names.csv + anno_{train,test}.csv + car_data/car_data/{train,test}/<class>/"
)


class CarsReader(DatasetReader):
    name = "cars"
    splits = ("train", "test")

    def __init__(self, root, split: str = "train", **options):
        super().__init__(root, split, **options)
        check_options(self.name, options, {})
        root = self.require_root()
        if (root / "devkit").is_dir() or (root / "cars_train").is_dir() or (root / "cars_test").is_dir():
            self.layout = "devkit"
            self.read_devkit(root)
        elif (root / "cars_annos.mat").exists():
            self.layout = "cars_annos.mat"
            self.read_all_in_one(root)
        elif (root / "names.csv").exists() or (root / "anno_train.csv").exists():
            self.layout = "csv"
            self.read_csv(root)
        else:
            raise DatasetError(f"{self.name}: no Stanford Cars layout found under {str(root)!r}; expected one of: {LAYOUT}")

    # -- layout 1: devkit -------------------------------------------------------------
    def read_devkit(self, root: Path) -> None:
        meta = self.require_file("devkit/cars_meta.mat", LAYOUT)
        self.class_names = mat_strings(mat_key(load_mat(meta), "class_names", meta))
        if self.split == "train":
            annos = self.require_file("devkit/cars_train_annos.mat", LAYOUT)
        else:
            candidates = ["cars_test_annos_withlabels.mat", "devkit/cars_test_annos_withlabels.mat"]
            found = [c for c in candidates if (root / c).exists()]
            if not found:
                hint = (
                    " (devkit/cars_test_annos.mat has no labels; get cars_test_annos_withlabels.mat)"
                    if (root / "devkit/cars_test_annos.mat").exists()
                    else ""
                )
                raise DatasetError(
                    f"{self.name}: missing 'cars_test_annos_withlabels.mat' under {str(root)!r}{hint}; "
                    f"expected layout: {LAYOUT}"
                )
            annos = root / found[0]
        image_dir = root / f"cars_{self.split}"
        if (image_dir / f"cars_{self.split}").is_dir():
            image_dir = image_dir / f"cars_{self.split}"
        if not image_dir.is_dir():
            raise DatasetError(f"{self.name}: missing folder 'cars_{self.split}/' under {str(root)!r}; expected layout: {LAYOUT}")
        rows = mat_struct_rows(mat_key(load_mat(annos), "annotations", annos), (*BOX_FIELDS, "class", "fname"), annos)
        for row in rows:
            self.add(root, image_dir / str(row["fname"]), row["class"], [row[f] for f in BOX_FIELDS], annos)

    # -- layout 2: cars_annos.mat + car_ims/ ------------------------------------------
    def read_all_in_one(self, root: Path) -> None:
        path = root / "cars_annos.mat"
        mat = load_mat(path)
        self.class_names = mat_strings(mat_key(mat, "class_names", path))
        fields = ("relative_im_path", *BOX_FIELDS, "class", "test")
        for row in mat_struct_rows(mat_key(mat, "annotations", path), fields, path):
            if bool(int(row["test"])) == (self.split == "test"):
                self.add(root, root / str(row["relative_im_path"]), row["class"], [row[f] for f in BOX_FIELDS], path)

    # -- layout 3: Kaggle CSV ---------------------------------------------------------
    def read_csv(self, root: Path) -> None:
        self.class_names = [next(csv.reader([line]))[0] for line in read_lines(self.require_file("names.csv", LAYOUT))]
        annos = self.require_file(f"anno_{self.split}.csv", LAYOUT)
        split_dir = root / "car_data" / "car_data" / self.split
        if not split_dir.is_dir():
            split_dir = root / "car_data" / self.split
        if not split_dir.is_dir():
            raise DatasetError(
                f"{self.name}: missing folder 'car_data/car_data/{self.split}/' under {str(root)!r}; expected layout: {LAYOUT}"
            )
        by_name: dict[str, Path] = {}
        for rel in files_under(split_dir):  # one recursive listing, also on object storage
            by_name.setdefault(rel.rsplit("/", 1)[-1], split_dir / rel)
        with open_text(annos, newline="") as f:
            for number, fields in enumerate(csv.reader(f), start=1):
                if not fields:
                    continue
                if len(fields) < 6:
                    raise DatasetError(f"{annos}: line {number} has {len(fields)} fields, expected fname,x1,y1,x2,y2,class")
                fname = fields[0].strip()
                path = by_name.get(fname, split_dir / fname)  # a missing file becomes a per-image read error
                self.add(root, path, fields[5], fields[1:5], annos)

    def add(self, root: Path, path: Path, class_value, box, source: Path) -> None:
        try:
            class_id = int(class_value)
            x1, y1, x2, y2 = (float(v) for v in box)
        except (TypeError, ValueError):
            raise DatasetError(f"{source}: bad class or box for {path.name!r}: {class_value!r} {box!r}") from None
        if not 1 <= class_id <= len(self.class_names):
            raise DatasetError(
                f"{source}: {path.name!r} has class {class_id}, outside 1..{len(self.class_names)} (the class-name list)"
            )
        self.listing.append(path.relative_to(root).as_posix(), class_id - 1, matlab_box(x1, y1, x2, y2))
