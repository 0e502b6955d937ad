"""Minimal fake datasets, one per reader, in each dataset's native layout.

``make_dataset(reader, folder)`` writes two classes with two tiny JPEGs per class in
every official split (annotation files in their real formats: whitespace tables, CSV,
JSON, MATLAB ``.mat``) and returns the path to give as the dataset's ``root``. The
trees are the smallest the readers accept, for tests that need *a* valid dataset
(template dry-runs); tests/test_datasets.py checks the readers' details on its own trees.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

PER_CLASS = 2


def _image(path: Path, shade: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), (shade, 64, 255 - shade)).save(path, format="JPEG")


def _lines(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _cell(strings) -> np.ndarray:
    """An N x 1 MATLAB cell array of strings."""
    arr = np.empty(len(strings), dtype=object)
    arr[:] = [np.array([s]) for s in strings]
    return arr.reshape(-1, 1)


def imagenet(folder: Path) -> Path:
    wnids = ["n01440764", "n01443537"]
    for c, wnid in enumerate(wnids):
        for k in range(PER_CLASS):
            _image(folder / "train" / wnid / f"{wnid}_{k}.JPEG", 40 * c)
            _image(folder / "val" / wnid / f"ILSVRC2012_val_{c * PER_CLASS + k + 1:08d}.JPEG", 40 * c)
    _lines(folder / "LOC_synset_mapping.txt", ["n01440764 tench, Tinca tinca", "n01443537 goldfish"])
    return folder


def _cub_style(base: Path, classes: list[tuple[int, str]], hierarchy: dict[int, int] | None = None) -> None:
    """CUB / NABirds: images.txt, labels, train/test split, classes and boxes, keyed by image id."""
    images, labels, split, boxes = [], [], [], []
    n = 0
    for class_id, name in classes:
        for k in range(2 * PER_CLASS):
            n += 1
            rel = f"{class_id:03d}.{name.replace(' ', '_')}/img_{n:02d}.jpg"
            _image(base / "images" / rel, 30 * k)
            images.append(f"{n} {rel}")
            labels.append(f"{n} {class_id}")
            split.append(f"{n} {int(k < PER_CLASS)}")
            boxes.append(f"{n} 1.0 1.0 8.0 6.0")
    _lines(base / "images.txt", images)
    _lines(base / "image_class_labels.txt", labels)
    _lines(base / "train_test_split.txt", split)
    _lines(base / "bounding_boxes.txt", boxes)
    if hierarchy is None:
        _lines(base / "classes.txt", [f"{i} {i:03d}.{name.replace(' ', '_')}" for i, name in classes])
    else:
        _lines(base / "classes.txt", ["0 Birds", *(f"{i} {name}" for i, name in classes)])
        _lines(base / "hierarchy.txt", [f"{child} {parent}" for child, parent in hierarchy.items()])


def cub(folder: Path) -> Path:
    _cub_style(folder / "CUB_200_2011", [(1, "Black footed Albatross"), (2, "Laysan Albatross")])
    return folder


def nabirds(folder: Path) -> Path:
    _cub_style(folder / "nabirds", [(295, "Bewick's Wren"), (313, "Marsh Wren")], {295: 0, 313: 0})
    return folder


def cars(folder: Path) -> Path:
    """The Kaggle CSV re-packaging (names.csv, anno_<split>.csv, car_data/car_data/<split>/<class>/)."""
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    _lines(folder / "names.csv", names)
    for split in ("train", "test"):
        rows = []
        for c, name in enumerate(names, start=1):
            for k in range(PER_CLASS):
                fname = f"{c}{k:04d}.jpg"
                _image(folder / "car_data" / "car_data" / split / name / fname, 40 * c)
                rows.append(f"{fname},1,1,8,6,{c}")
        _lines(folder / f"anno_{split}.csv", rows)
    return folder


def aircraft(folder: Path) -> Path:
    data = folder / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "A300B4"]
    members = {split: [] for split in ("train", "val", "test")}
    n = 0
    for variant in variants:
        for split in members:
            for _ in range(PER_CLASS):
                n += 1
                image_id = f"{1000000 + n:07d}"
                members[split].append(f"{image_id} {variant}")
                _image(data / "images" / f"{image_id}.jpg")
    _lines(data / "variants.txt", variants)
    for split, rows in {**members, "trainval": members["train"] + members["val"]}.items():
        _lines(data / f"images_variant_{split}.txt", rows)
    _lines(data / "images_box.txt", [f"{1000000 + i:07d} 1 1 8 6" for i in range(1, n + 1)])
    return folder


def flowers(folder: Path) -> Path:
    labels, splits = [], {"trnid": [], "valid": [], "tstid": []}
    n = 0
    for c in (1, 2):
        for key in splits:
            for _ in range(PER_CLASS):
                n += 1
                labels.append(c)
                splits[key].append(n)
                _image(folder / "jpg" / f"image_{n:05d}.jpg", 40 * c)
    scipy.io.savemat(folder / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    scipy.io.savemat(folder / "setid.mat", {k: np.array([v]) for k, v in splits.items()})
    return folder


def pets(folder: Path) -> Path:
    for split in ("trainval", "test"):
        rows = []
        for c, (breed, species) in enumerate([("Abyssinian", 1), ("american_bulldog", 2)], start=1):
            for k in range(PER_CLASS):
                name = f"{breed}_{split}{k}"
                rows.append(f"{name} {c} {species} 1")
                _image(folder / "images" / f"{name}.jpg", 40 * c)
        _lines(folder / "annotations" / f"{split}.txt", rows)
    return folder


def food(folder: Path) -> Path:
    base = folder / "food-101"
    classes = ["apple_pie", "beignets"]
    _lines(base / "meta" / "classes.txt", classes)
    for split in ("train", "test"):
        lists = {c: [f"{c}/{split}{k}" for k in range(PER_CLASS)] for c in classes}
        (base / "meta" / f"{split}.json").write_text(json.dumps(lists))
        for entries in lists.values():
            for entry in entries:
                _image(base / "images" / f"{entry}.jpg")
    return folder


def dogs(folder: Path) -> Path:
    breeds = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]
    (folder / "lists").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        files, labels = [], []
        for c, breed in enumerate(breeds, start=1):
            for k in range(PER_CLASS):
                files.append(f"{breed}/{breed.split('-')[0]}_{split}{k}.jpg")
                labels.append([float(c)])
                _image(folder / "Images" / files[-1], 40 * c)
                if k:  # every image but the first of each breed has a VOC box (two dogs)
                    xml = folder / "Annotation" / files[-1][:-4]
                    xml.parent.mkdir(parents=True, exist_ok=True)
                    xml.write_text(f"<annotation><object><bndbox><xmin>{1 + k}</xmin><ymin>2</ymin><xmax>9</xmax>"
                                   "<ymax>10</ymax></bndbox></object><object><bndbox><xmin>3</xmin><ymin>1</ymin>"
                                   "<xmax>12</xmax><ymax>8</ymax></bndbox></object></annotation>")
        scipy.io.savemat(folder / "lists" / f"{split}_list.mat",
                         {"file_list": _cell(files), "annotation_list": _cell([f[:-4] for f in files]),
                          "labels": np.array(labels)})
    return folder


def imagefolder(folder: Path) -> Path:
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            for k in range(PER_CLASS):
                _image(folder / split / c / f"{k:04d}.jpg")
    return folder


MAKERS = {f.__name__: f for f in (imagenet, cub, nabirds, cars, aircraft, flowers, pets, food, dogs, imagefolder)}


def make_dataset(reader: str, folder: Path) -> Path:
    """Write a fake ``reader`` dataset under ``folder``; returns the ``root`` to configure."""
    folder.mkdir(parents=True, exist_ok=True)
    return MAKERS[reader](folder)
