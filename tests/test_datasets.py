"""Dataset readers on small fake trees in each dataset's native layout.

Every tree is generated here: tiny PIL images (incl. grayscale and CMYK JPEGs, a PNG
with alpha, a truncated file) and real annotation formats (.mat via scipy.io.savemat
with the datasets' struct / cell layouts, CSV, JSON, whitespace tables).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from pipeline.datasets import READERS, DatasetConfig, Preprocessing, open_dataset, preprocess
from pipeline.datasets.aircraft import AircraftReader
from pipeline.datasets.cars import CarsReader
from pipeline.datasets.cub import CUBReader
from pipeline.datasets.dogs import DogsReader
from pipeline.datasets.flowers import FlowersReader
from pipeline.datasets.food import FoodReader
from pipeline.datasets.imagenet import ImageNetReader
from pipeline.datasets.nabirds import NABirdsReader
from pipeline.datasets.pets import PetsReader
from pipeline.errors import DatasetError, ImageReadError

RED, BLUE = (255, 0, 0), (0, 0, 255)


# -- writers ---------------------------------------------------------------------------


def write_image(path: Path, color=RED, size=(40, 32), mode="RGB", fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt or ("PNG" if path.suffix == ".png" else "JPEG"))
    return path


def write_split_image(path: Path, size=(40, 32)) -> Path:
    """Left half red, right half blue: a box crop shows which half it kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, RED)
    img.paste(Image.new("RGB", (size[0] // 2, size[1]), BLUE), (size[0] // 2, 0))
    img.save(path, format="JPEG", quality=95)
    return path


def write_truncated(path: Path) -> Path:
    write_image(path, size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_text(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def struct_array(rows: list[dict], fields: list[str]) -> np.ndarray:
    """A 1 x N MATLAB struct array as MATLAB writes it: numbers (1,1), strings (1,)."""
    arr = np.empty((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        for f in fields:
            v = row[f]
            arr[0, i][f] = np.array([v]) if isinstance(v, str) else np.array([[v]], dtype=np.uint16)
    return arr


def cell(strings, shape) -> np.ndarray:
    arr = np.empty(len(strings), dtype=object)
    arr[:] = [np.array([s]) for s in strings]
    return arr.reshape(shape)


def ids(reader):
    return [r.image_id for r in reader.records]


def labels(reader):
    return [r.label for r in reader.records]


# -- CUB / NABirds ---------------------------------------------------------------------

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


@pytest.fixture
def cub_root(tmp_path):
    base = tmp_path / "CUB_200_2011"
    images, rows = [], []
    # (class index, is_train, file kind)
    plan = [(0, 1, "rgb"), (0, 0, "gray"), (1, 1, "cmyk"), (1, 0, "png"), (2, 1, "split"), (2, 0, "truncated")]
    for i, (c, train, kind) in enumerate(plan, start=1):
        suffix = ".png" if kind == "png" else ".jpg"
        rel = f"{CUB_CLASSES[c]}/img_{i:02d}{suffix}"
        path = base / "images" / rel
        if kind == "rgb":
            write_image(path)
        elif kind == "gray":
            write_image(path, color=128, mode="L")
        elif kind == "cmyk":
            write_image(path, color=(0, 0, 0, 0), mode="CMYK")
        elif kind == "png":
            write_image(path, color=(0, 0, 0, 0), mode="RGBA")
        elif kind == "split":
            write_split_image(path)
        else:
            write_truncated(path)
        images.append(f"{i} {rel}")
        rows.append((i, c + 1, train))
    write_text(base / "images.txt", images)
    write_text(base / "image_class_labels.txt", [f"{i} {c}" for i, c, _ in rows])
    write_text(base / "train_test_split.txt", [f"{i} {t}" for i, _, t in rows])
    write_text(base / "classes.txt", [f"{k} {n}" for k, n in enumerate(CUB_CLASSES, start=1)])
    write_text(base / "bounding_boxes.txt", [f"{i} 20.0 0.0 20.0 32.0" for i, _, _ in rows])
    return tmp_path


def test_cub_splits_labels_names_and_boxes(cub_root):
    train = CUBReader(cub_root, "train")  # root = folder containing CUB_200_2011
    test = CUBReader(cub_root / "CUB_200_2011", "test")  # root = CUB_200_2011 itself
    assert len(train) == 3 and len(test) == 3
    assert labels(train) == [0, 1, 2] and labels(test) == [0, 1, 2]
    assert train.class_names == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    assert ids(train)[0] == "images/001.Black_footed_Albatross/img_01.jpg"
    assert ids(test)[0] == "images/001.Black_footed_Albatross/img_02.jpg"  # same ids whichever root
    assert train.records[0].bbox == (20.0, 0.0, 40.0, 32.0)  # x y w h -> x0 y0 x1 y1


def test_cub_bbox_crop_keeps_the_box(cub_root):
    reader = CUBReader(cub_root, "train")
    record = reader.records[2]  # the red | blue image, box over the right (blue) half
    prep = Preprocessing(size=8, value_range=(0.0, 1.0))
    whole = preprocess(reader.load_image(record), prep)
    boxed = preprocess(reader.load_image(record), prep, record.bbox)
    assert boxed[2].mean() > 0.9 and boxed[0].mean() < 0.1  # only blue left
    assert whole[0, :, 0].mean() > 0.9  # centre crop still shows red on the left


def test_cub_missing_file_names_it_and_layout(cub_root):
    (cub_root / "CUB_200_2011" / "image_class_labels.txt").unlink()
    with pytest.raises(DatasetError, match=r"image_class_labels\.txt.*expected layout: CUB_200_2011/"):
        CUBReader(cub_root, "train")


@pytest.mark.parametrize(
    "reader_cls, bad_split, valid",
    [
        (CUBReader, "val", "train, test"),
        (AircraftReader, "validation", "train, val, trainval, test"),
        (PetsReader, "train", "trainval, test"),
        (ImageNetReader, "test", "train, val"),
        (FlowersReader, "dev", "train, val, test, trainval"),
    ],
)
def test_unknown_split_names_valid_ones(tmp_path, reader_cls, bad_split, valid):
    with pytest.raises(DatasetError, match=f"no split {bad_split!r}; valid: {valid}$"):
        reader_cls(tmp_path, bad_split)


def test_unknown_option_is_refused(cub_root):
    with pytest.raises(DatasetError, match="unknown option 'variant'"):
        CUBReader(cub_root, "train", variant="family")


@pytest.fixture
def nabirds_root(tmp_path):
    base = tmp_path / "nabirds"
    # Sparse leaf ids 295 / 313 / 1010 under parents 22 and 1 (root 0).
    classes = {0: "Birds", 1: "Perching Birds", 22: "Wrens", 295: "Bewick's Wren", 313: "Red-tailed Hawk (Dark morph)", 1010: "Marsh Wren", 500: "Unused leaf"}
    hierarchy = {1: 0, 22: 1, 295: 22, 1010: 22, 313: 1, 500: 1}
    plan = [("a1", 313, 1), ("a2", 295, 0), ("a3", 1010, 1), ("a4", 295, 1), ("a5", 313, 0)]
    for uid, _, _ in plan:
        write_image(base / "images" / "0817" / f"{uid}.jpg")
    write_text(base / "images.txt", [f"{u} 0817/{u}.jpg" for u, _, _ in plan])
    write_text(base / "image_class_labels.txt", [f"{u} {c}" for u, c, _ in plan])
    write_text(base / "train_test_split.txt", [f"{u} {t}" for u, _, t in plan])
    write_text(base / "classes.txt", [f"{k} {v}" for k, v in classes.items()])
    write_text(base / "hierarchy.txt", [f"{k} {v}" for k, v in hierarchy.items()])
    write_text(base / "bounding_boxes.txt", [f"{u} 1 2 10 20" for u, _, _ in plan])
    return tmp_path


def test_nabirds_remaps_sparse_ids_over_both_splits(nabirds_root):
    train = NABirdsReader(nabirds_root, "train")
    test = NABirdsReader(nabirds_root / "nabirds", "test")
    # classes with images: 295, 313, 1010 -> 0, 1, 2 (500 has none; test lacks 1010)
    assert train.class_ids == test.class_ids == [295, 313, 1010]
    assert train.class_names == ["Bewick's Wren", "Red-tailed Hawk (Dark morph)", "Marsh Wren"]
    assert labels(train) == [1, 2, 0] and labels(test) == [0, 1]
    assert train.hierarchy[295] == 22 and train.ancestors(1010) == [22, 1, 0]
    assert train.all_class_names[22] == "Wrens"
    assert train.records[0].bbox == (1.0, 2.0, 11.0, 22.0)
    assert ids(train)[0] == "images/0817/a1.jpg"


def test_nabirds_needs_hierarchy(nabirds_root):
    (nabirds_root / "nabirds" / "hierarchy.txt").unlink()
    with pytest.raises(DatasetError, match=r"missing 'nabirds/hierarchy\.txt'"):
        NABirdsReader(nabirds_root, "train")


# -- ImageNet --------------------------------------------------------------------------

WNIDS = ["n01440764", "n01443537", "n02012849"]
MAPPING = ["n01440764 tench, Tinca tinca", "n01443537 goldfish, Carassius auratus", "n02012849 crane"]


def imagenet_tree(root: Path, val_layout: str, mapping: bool = True) -> None:
    for w in WNIDS:
        for k in range(2):
            write_image(root / "train" / w / f"{w}_{k}.JPEG", size=(12, 10))
    # val: image n belongs to WNIDS[(n * 2) % 3] -> 2, 1, 0, 2 for n = 1..4
    val_classes = {n: WNIDS[(n * 2) % 3] for n in range(1, 5)}
    for n, w in val_classes.items():
        sub = f"{w}/" if val_layout == "folders" else ""
        write_image(root / "val" / f"{sub}ILSVRC2012_val_{n:08d}.JPEG", size=(12, 10))
    if val_layout == "csv":
        rows = [f"ILSVRC2012_val_{n:08d},{w} 1 2 30 40 {w} 5 6 7 8" for n, w in reversed(val_classes.items())]
        write_text(root / "LOC_val_solution.csv", ["ImageId,PredictionString", *rows])
    if val_layout == "devkit":
        # Devkit ids are not in wnid order: id 1 = n02012849, 2 = n01440764, 3 = n01443537; id 4 is an inner node.
        order = [WNIDS[2], WNIDS[0], WNIDS[1]]
        rows = [dict(ILSVRC2012_ID=i, WNID=w, words=f"words of {w}", num_children=0) for i, w in enumerate(order, 1)]
        rows.append(dict(ILSVRC2012_ID=4, WNID="n00001740", words="entity", num_children=3))
        synsets = np.empty((len(rows), 1), dtype=[(f, "O") for f in rows[0]])
        for i, r in enumerate(rows):
            for f, v in r.items():
                synsets[i, 0][f] = np.array([v]) if isinstance(v, str) else np.array([[v]], dtype=np.int32)
        data = root / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        scipy.io.savemat(data / "meta.mat", {"synsets": synsets})
        write_text(data / "ILSVRC2012_validation_ground_truth.txt", [order.index(val_classes[n]) + 1 for n in range(1, 5)])
    if mapping:
        write_text(root / "LOC_synset_mapping.txt", MAPPING)


@pytest.mark.parametrize("val_layout", ["folders", "csv", "devkit"])
def test_imagenet_val_layouts_agree(tmp_path, val_layout):
    imagenet_tree(tmp_path, val_layout, mapping=val_layout != "devkit")
    val = ImageNetReader(tmp_path, "val")
    assert val.wnids == WNIDS
    assert labels(val) == ([0, 1, 2, 2] if val_layout == "folders" else [2, 1, 0, 2])
    names = {"folders": "crane", "csv": "crane", "devkit": "words of n02012849"}[val_layout]
    assert val.class_names[2] == names
    if val_layout != "folders":
        assert ids(val) == [f"val/ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, 5)]
        assert all(r.path.exists() for r in val.records)


def test_imagenet_train_and_names(tmp_path):
    imagenet_tree(tmp_path, "folders")
    train = ImageNetReader(tmp_path, "train")
    assert len(train) == 6 and labels(train) == [0, 0, 1, 1, 2, 2]
    assert train.class_names == ["tench, Tinca tinca", "goldfish, Carassius auratus", "crane"]
    assert ids(train)[0] == "train/n01440764/n01440764_0.JPEG"
    (tmp_path / "LOC_synset_mapping.txt").unlink()
    assert ImageNetReader(tmp_path, "train").class_names == WNIDS


def test_imagenet_kaggle_layout(tmp_path):
    imagenet_tree(tmp_path / "ILSVRC" / "Data" / "CLS-LOC", "csv", mapping=False)
    (tmp_path / "ILSVRC" / "Data" / "CLS-LOC" / "LOC_val_solution.csv").rename(tmp_path / "LOC_val_solution.csv")
    write_text(tmp_path / "LOC_synset_mapping.txt", MAPPING)
    val = ImageNetReader(tmp_path, "val")
    assert labels(val) == [2, 1, 0, 2]
    assert ids(val)[0] == "ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_00000001.JPEG"


def test_imagenet_flat_val_without_labels(tmp_path):
    imagenet_tree(tmp_path, "flat")
    with pytest.raises(DatasetError, match=r"missing 'LOC_val_solution\.csv'.*ILSVRC2012_validation_ground_truth"):
        ImageNetReader(tmp_path, "val")


# -- Stanford Cars ---------------------------------------------------------------------

CAR_NAMES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Ram C/V Cargo Van Minivan 2012"]
CAR_FIELDS = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
# (fname, class 1-based, box) per split; the box covers the right (blue) half, 1-based inclusive.
CAR_SPLITS = {
    "train": [("00001.jpg", 3, (21, 1, 40, 32)), ("00002.jpg", 1, (21, 1, 40, 32))],
    "test": [("00001.jpg", 2, (21, 1, 40, 32)), ("00002.jpg", 3, (1, 1, 20, 32)), ("00003.jpg", 1, (5, 6, 7, 8))],
}


def car_rows(split):
    return [dict(zip(CAR_FIELDS, (*box, c, f))) for f, c, box in CAR_SPLITS[split]]


def cars_devkit(root: Path) -> None:
    (root / "devkit").mkdir(parents=True)
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": cell(CAR_NAMES, (1, 3))})
    scipy.io.savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": struct_array(car_rows("train"), CAR_FIELDS)})
    unlabelled = [{k: v for k, v in r.items() if k != "class"} for r in car_rows("test")]
    scipy.io.savemat(root / "devkit" / "cars_test_annos.mat", {"annotations": struct_array(unlabelled, CAR_FIELDS[:4] + ["fname"])})
    scipy.io.savemat(root / "cars_test_annos_withlabels.mat", {"annotations": struct_array(car_rows("test"), CAR_FIELDS)})
    for split, rows in CAR_SPLITS.items():
        for fname, _, _ in rows:
            write_split_image(root / f"cars_{split}" / fname)


def test_cars_devkit(tmp_path):
    cars_devkit(tmp_path)
    train, test = CarsReader(tmp_path, "train"), CarsReader(tmp_path, "test")
    assert train.layout == "devkit" and train.class_names == CAR_NAMES
    assert labels(train) == [2, 0] and labels(test) == [1, 2, 0]
    assert ids(test) == ["cars_test/00001.jpg", "cars_test/00002.jpg", "cars_test/00003.jpg"]
    assert test.records[0].bbox == (20.0, 0.0, 40.0, 32.0)  # 1-based inclusive -> 0-based edges
    prep = Preprocessing(size=8, value_range=(0.0, 1.0))
    left = test.records[1]
    boxed = preprocess(test.load_image(left), prep, left.bbox)
    assert boxed[0].mean() > 0.9 and boxed[2].mean() < 0.1  # the box over the red half


def test_cars_test_needs_labelled_annotations(tmp_path):
    cars_devkit(tmp_path)
    (tmp_path / "cars_test_annos_withlabels.mat").unlink()
    assert len(CarsReader(tmp_path, "train")) == 2
    with pytest.raises(DatasetError, match=r"cars_test_annos_withlabels\.mat.*cars_test_annos\.mat has no labels"):
        CarsReader(tmp_path, "test")


def test_cars_all_in_one_mat(tmp_path):
    rows = []
    for split, entries in CAR_SPLITS.items():
        for fname, c, box in entries:
            name = f"{split[:2]}{fname}"
            write_image(tmp_path / "car_ims" / name)
            rows.append(dict(relative_im_path=f"car_ims/{name}", bbox_x1=box[0], bbox_y1=box[1], bbox_x2=box[2], bbox_y2=box[3], **{"class": c}, test=int(split == "test")))
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    scipy.io.savemat(tmp_path / "cars_annos.mat", {"annotations": struct_array(rows, fields), "class_names": cell(CAR_NAMES, (1, 3))})
    test = CarsReader(tmp_path, "test")
    assert test.layout == "cars_annos.mat"
    assert labels(test) == [1, 2, 0] and ids(test)[0] == "car_ims/te00001.jpg"
    assert test.records[2].bbox == (4.0, 5.0, 7.0, 8.0)


def test_cars_kaggle_csv(tmp_path):
    write_text(tmp_path / "names.csv", CAR_NAMES)
    for split, entries in CAR_SPLITS.items():
        write_text(tmp_path / f"anno_{split}.csv", [f"{f},{b[0]},{b[1]},{b[2]},{b[3]},{c}" for f, c, b in entries])
        for fname, c, _ in entries:
            folder = CAR_NAMES[c - 1].replace("/", "-")  # as the Kaggle folders spell it
            write_image(tmp_path / "car_data" / "car_data" / split / folder / fname)
    test = CarsReader(tmp_path, "test")
    assert test.layout == "csv" and test.class_names == CAR_NAMES
    assert labels(test) == [1, 2, 0]
    assert ids(test)[1] == "car_data/car_data/test/Ram C-V Cargo Van Minivan 2012/00002.jpg"
    assert all(r.path.exists() for r in test.records)
    (tmp_path / "anno_train.csv").unlink()
    with pytest.raises(DatasetError, match=r"missing 'anno_train\.csv'"):
        CarsReader(tmp_path, "train")


def test_cars_unrecognised_root(tmp_path):
    with pytest.raises(DatasetError, match="no Stanford Cars layout.*cars_meta.mat"):
        CarsReader(tmp_path, "train")


# -- FGVC-Aircraft ---------------------------------------------------------------------


@pytest.fixture
def aircraft_root(tmp_path):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "A300B4", "Cessna 172"]
    families = ["Boeing 707", "A300", "Cessna 172"]
    split_of = {"0034309": "train", "0056978": "val", "1025794": "test", "0062765": "train"}
    variant_of = {"0034309": "Cessna 172", "0056978": "707-320", "1025794": "A300B4", "0062765": "707-320"}
    for image_id in split_of:
        img = Image.new("RGB", (40, 60), (255, 255, 255))
        img.paste(Image.new("RGB", (40, 20), (0, 0, 0)), (0, 40))  # the banner: bottom 20 rows
        (data / "images").mkdir(parents=True, exist_ok=True)
        img.save(data / "images" / f"{image_id}.jpg", quality=95)
    write_text(data / "variants.txt", variants)
    write_text(data / "families.txt", families)
    for split in ("train", "val", "trainval", "test"):
        members = [i for i, s in split_of.items() if s == split or (split == "trainval" and s in ("train", "val"))]
        write_text(data / f"images_variant_{split}.txt", [f"{i} {variant_of[i]}" for i in members])
        fam = {v: f for v, f in zip(variants, families)}
        write_text(data / f"images_family_{split}.txt", [f"{i} {fam[variant_of[i]]}" for i in members])
    write_text(data / "images_box.txt", [f"{i} 3 4 30 50" for i in split_of])
    return tmp_path


def test_aircraft_splits_annotation_levels_and_boxes(aircraft_root):
    train = AircraftReader(aircraft_root, "train")
    assert train.class_names == ["707-320", "A300B4", "Cessna 172"]
    assert labels(train) == [2, 0] and ids(train) == ["data/images/0034309.jpg", "data/images/0062765.jpg"]
    assert train.records[0].bbox == (2.0, 3.0, 30.0, 50.0)
    assert len(AircraftReader(aircraft_root, "trainval")) == 3
    assert labels(AircraftReader(aircraft_root / "fgvc-aircraft-2013b", "val")) == [0]
    family = AircraftReader(aircraft_root, "test", annotation="family")
    assert family.class_names == ["Boeing 707", "A300", "Cessna 172"] and labels(family) == [1]
    # root may also be the data/ folder itself
    assert ids(AircraftReader(aircraft_root / "fgvc-aircraft-2013b" / "data", "test")) == ["data/images/1025794.jpg"]


def test_aircraft_banner_crop_is_an_option(aircraft_root):
    cropped = AircraftReader(aircraft_root, "test")
    full = AircraftReader(aircraft_root, "test", crop_banner=False)
    a = np.asarray(cropped.load_image(cropped.records[0]))
    b = np.asarray(full.load_image(full.records[0]))
    assert a.shape == (40, 40, 3) and b.shape == (60, 40, 3)
    assert a.min() > 200 and b[-10:].max() < 60  # the dark banner is gone only when cropped


def test_aircraft_bad_options_and_missing_files(aircraft_root):
    with pytest.raises(DatasetError, match="annotation='model' is not one of variant, family, manufacturer"):
        AircraftReader(aircraft_root, "train", annotation="model")
    with pytest.raises(DatasetError, match=r"missing 'fgvc-aircraft-2013b/data/manufacturers\.txt'.*expected layout"):
        AircraftReader(aircraft_root, "train", annotation="manufacturer")


# -- Flowers-102 -----------------------------------------------------------------------


def test_flowers(tmp_path):
    image_labels = [3, 1, 102, 1, 2, 3]  # image_00001 .. image_00006
    for n in range(1, 7):
        write_image(tmp_path / "jpg" / f"image_{n:05d}.jpg")
    scipy.io.savemat(tmp_path / "imagelabels.mat", {"labels": np.array([image_labels], dtype=np.uint8)})
    scipy.io.savemat(
        tmp_path / "setid.mat",
        {"trnid": np.array([[5, 1]]), "valid": np.array([[2]]), "tstid": np.array([[3, 4, 6]])},
    )
    train = FlowersReader(tmp_path, "train")
    assert ids(train) == ["jpg/image_00001.jpg", "jpg/image_00005.jpg"] and labels(train) == [2, 1]
    assert labels(FlowersReader(tmp_path, "test")) == [101, 0, 2]
    assert len(FlowersReader(tmp_path, "trainval")) == 3
    names = train.class_names
    assert len(names) == 102 and len(set(names)) == 102
    assert names[0] == "pink primrose" and names[101] == "blackberry lily" and names[76] == "passion flower"
    # the three names where lists differ, as the Diffusion Classifier's flowers_prompts.csv has them
    assert (names[15], names[59], names[92]) == ("globe flower", "pink and yellow dahlia", "air plant")
    (tmp_path / "setid.mat").unlink()
    with pytest.raises(DatasetError, match=r"missing 'setid\.mat'.*imagelabels\.mat, setid\.mat, jpg/"):
        FlowersReader(tmp_path, "train")


# -- Oxford-IIIT Pets ------------------------------------------------------------------


def test_pets(tmp_path):
    trainval = ["Abyssinian_100 1 1 1", "american_bulldog_10 2 2 1", "Abyssinian_101 1 1 1"]
    test = ["american_pit_bull_terrier_3 3 2 2", "Abyssinian_5 1 1 1"]
    write_text(tmp_path / "annotations" / "trainval.txt", trainval)
    write_text(tmp_path / "annotations" / "test.txt", ["# Image CLASS-ID SPECIES BREED ID", *test])
    tv = PetsReader(tmp_path, "trainval")
    assert tv.class_names == ["Abyssinian", "american bulldog", "american pit bull terrier"]
    assert labels(tv) == [0, 1, 0] and ids(tv)[1] == "images/american_bulldog_10.jpg"
    assert labels(PetsReader(tmp_path, "test")) == [2, 0]
    write_text(tmp_path / "annotations" / "test.txt", ["Bengal_1 1 1 4"])
    with pytest.raises(DatasetError, match="class id 1 is used for both 'Abyssinian' and 'Bengal'"):
        PetsReader(tmp_path, "test")
    (tmp_path / "annotations" / "test.txt").unlink()
    with pytest.raises(DatasetError, match=r"missing 'annotations/test\.txt'"):
        PetsReader(tmp_path, "trainval")


# -- Food-101 --------------------------------------------------------------------------


def test_food(tmp_path):
    meta = tmp_path / "food-101" / "meta"
    write_text(meta / "classes.txt", ["apple_pie", "baby_back_ribs", "beignets"])
    write_text(meta / "labels.txt", ["Apple pie", "Baby back ribs", "Beignets"])
    # JSON key order differs from classes.txt: records follow classes.txt
    (meta / "train.json").write_text(json.dumps({"beignets": ["beignets/11"], "apple_pie": ["apple_pie/1005649", "apple_pie/7"]}))
    (meta / "test.json").write_text(json.dumps({"baby_back_ribs": ["baby_back_ribs/3"]}))
    train = FoodReader(tmp_path, "train")
    assert train.class_names == ["Apple pie", "Baby back ribs", "Beignets"]
    assert ids(train) == ["images/apple_pie/1005649.jpg", "images/apple_pie/7.jpg", "images/beignets/11.jpg"]
    assert labels(train) == [0, 0, 2]
    assert train.records[0].path == tmp_path / "food-101" / "images" / "apple_pie" / "1005649.jpg"
    (meta / "labels.txt").unlink()
    (meta / "test.json").unlink()
    write_text(meta / "test.txt", ["beignets/4"])
    test = FoodReader(tmp_path / "food-101", "test")
    assert test.class_names[1] == "baby back ribs" and labels(test) == [2]
    (meta / "test.txt").unlink()
    with pytest.raises(DatasetError, match=r"missing 'meta/test\.json'"):
        FoodReader(tmp_path / "food-101", "test")


# -- Stanford Dogs ---------------------------------------------------------------------

DOG_FOLDERS = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02116738-African_hunting_dog"]


def dogs_tree(root: Path, with_annotations=True) -> None:
    lists = {
        "train": [(f"{DOG_FOLDERS[2]}/n02116738_1.jpg", 3), (f"{DOG_FOLDERS[0]}/n02085620_5927.jpg", 1)],
        "test": [(f"{DOG_FOLDERS[1]}/n02085782_2.jpg", 2)],
    }
    (root / "lists").mkdir(parents=True)
    for split, entries in lists.items():
        files = [f for f, _ in entries]
        scipy.io.savemat(
            root / "lists" / f"{split}_list.mat",
            {
                "file_list": cell(files, (len(files), 1)),
                "annotation_list": cell([f[:-4] for f in files], (len(files), 1)),
                "labels": np.array([[c] for _, c in entries], dtype=np.float64),
            },
        )
        for f, _ in entries:
            write_image(root / "Images" / f)
            if with_annotations:
                boxes = "".join(
                    f"<object><name>dog</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
                    for x0, y0, x1, y1 in [(3, 4, 10, 12), (8, 2, 20, 9)]
                )
                (root / "Annotation" / f).parent.mkdir(parents=True, exist_ok=True)
                (root / "Annotation" / f[:-4]).write_text(f"<annotation><filename>x</filename>{boxes}</annotation>")


def test_dogs(tmp_path):
    dogs_tree(tmp_path)
    train = DogsReader(tmp_path, "train")
    assert train.class_names == ["Chihuahua", "Japanese spaniel", "African hunting dog"]
    assert labels(train) == [2, 0]
    assert ids(train)[1] == "Images/n02085620-Chihuahua/n02085620_5927.jpg"
    assert train.records[0].bbox == (2.0, 1.0, 20.0, 12.0)  # union of both dogs, 1-based -> 0-based
    assert labels(DogsReader(tmp_path, "test")) == [1]


def test_dogs_without_annotations_and_with_a_wrong_label(tmp_path):
    dogs_tree(tmp_path, with_annotations=False)
    assert DogsReader(tmp_path, "train").records[0].bbox is None
    mat = scipy.io.loadmat(tmp_path / "lists" / "test_list.mat")
    mat["labels"] = np.array([[3.0]])
    scipy.io.savemat(tmp_path / "lists" / "test_list.mat", {k: v for k, v in mat.items() if not k.startswith("__")})
    with pytest.raises(DatasetError, match="has label 3, which is folder 'n02116738-African_hunting_dog'"):
        DogsReader(tmp_path, "test")
    with pytest.raises(DatasetError, match=r"missing 'lists/train_list\.mat'"):
        DogsReader(tmp_path / "Images", "train")


# -- registry, subsetting, preprocessing -----------------------------------------------


def test_registry_holds_every_reader():
    assert {"imagenet", "cub", "cars", "aircraft", "flowers", "pets", "food", "dogs", "nabirds"} <= set(READERS)
    for name, cls in READERS.items():
        assert cls.name == name


def big_cub(tmp_path, per_class=10, classes=4):
    base = tmp_path / "CUB_200_2011"
    rows = []
    for c in range(classes):
        for k in range(per_class):
            i = len(rows) + 1
            rows.append((i, f"{c + 1:03d}.Bird_{c}/{i}.jpg", c + 1))
    write_image(base / "images" / "x.jpg")  # the subset tests never decode
    write_text(base / "images.txt", [f"{i} {p}" for i, p, _ in rows])
    write_text(base / "image_class_labels.txt", [f"{i} {c}" for i, _, c in rows])
    write_text(base / "train_test_split.txt", [f"{i} 1" for i, _, _ in rows])
    write_text(base / "classes.txt", [f"{c + 1} {c + 1:03d}.Bird_{c}" for c in range(classes)])
    return tmp_path


def test_subsetting_is_deterministic(tmp_path):
    root = str(big_cub(tmp_path))

    def subset(**kw):
        return open_dataset(DatasetConfig(reader="cub", root=root, split="train", **kw))

    per = subset(per_class=3, seed=1)
    assert np.bincount(labels(per)).tolist() == [3, 3, 3, 3]
    assert ids(per) == ids(subset(per_class=3, seed=1))
    assert ids(per) != ids(subset(per_class=3, seed=2))
    assert ids(per) == sorted(ids(per), key=lambda s: int(s.rsplit("/", 1)[1][:-4]))  # dataset order kept
    chosen = subset(classes=("Bird 2", "0"), limit=5, seed=3)
    assert len(chosen) == 5 and set(labels(chosen)) <= {0, 2}
    assert ids(chosen) == ids(subset(classes=("Bird 2", "0"), limit=5, seed=3))
    with pytest.raises(DatasetError, match="unknown class 'Bird 9'"):
        subset(classes=("Bird 9",))


def test_preprocess_handles_every_mode(cub_root):
    reader = CUBReader(cub_root, "train")
    test = CUBReader(cub_root, "test")
    prep = Preprocessing(size=16, channels=3, value_range=(-1.0, 1.0))
    red = preprocess(reader.load_image(reader.records[0]), prep)
    gray = preprocess(test.load_image(test.records[0]), prep)
    cmyk = preprocess(reader.load_image(reader.records[1]), prep)
    alpha = preprocess(test.load_image(test.records[1]), prep)
    for arr in (red, gray, cmyk, alpha):
        assert arr.shape == (3, 16, 16) and arr.dtype == np.float32
        assert arr.min() >= -1.0 and arr.max() <= 1.0
    assert red[0].mean() > 0.9 and red[1].mean() < -0.9
    assert np.allclose(gray, 128 / 255 * 2 - 1, atol=0.02)  # gray 128 on all three channels
    assert cmyk.min() > 0.95  # CMYK (0,0,0,0) is white
    assert alpha.min() > 0.99  # transparent PNG composited on white
    one = preprocess(test.load_image(test.records[0]), Preprocessing(size=8, channels=1, value_range=(0.0, 1.0)))
    assert one.shape == (1, 8, 8) and np.allclose(one, 128 / 255, atol=0.01)


def test_corrupt_image_raises_with_its_id(cub_root):
    test = CUBReader(cub_root, "test")
    with pytest.raises(ImageReadError, match="(?i)img_06.jpg.*truncated") as info:
        test.load_image(test.records[2])
    assert info.value.image_id == "images/003.Sooty_Albatross/img_06.jpg"


# ----------------------------------------------------------------- the columnar listing
# The values below were computed by the list-of-Record listing this replaced (main at
# ffc53e8, every reader and subset option compared entry by entry): a store's stage hash
# holds the dataset identity, so a listing that hashed differently would make every
# existing store refuse to resume, and different draws would pick other images.
PINNED_DIGITS = [
    (dict(split="train"), 1437, "9814b6b6770af95b47f5217181907c628b7653418243abac2a46d62135049479",
     ["digits/0001", "digits/0002", "digits/0003", "digits/0004", "digits/0006"]),
    (dict(split="train", classes=("3", 5), per_class=20, limit=30, seed=9), 30,
     "d8d9c246021afa45b082002d37a6213dab4fe675ebadf3e964345a37caf572f8",
     ["digits/0013", "digits/0059", "digits/0153", "digits/0399", "digits/0401"]),
    (dict(split="test", per_class=7, seed=11), 70,
     "0499ce009eaa00aac67d57113e38d8e0f32946edae84b8bfe675d5a5f886d7f3",
     ["digits/0025", "digits/0055", "digits/0070", "digits/0095", "digits/0100"]),
]


@pytest.mark.parametrize("options,n,sha,first", PINNED_DIGITS)
def test_listing_hash_and_subset_draws_are_those_of_the_list_of_records_code(options, n, sha, first):
    from pipeline.workflow.identity import dataset_identity

    reader = open_dataset(DatasetConfig(reader="digits", **options))
    assert dataset_identity(reader.records) == {"n_images": n, "ids_sha256": sha}
    assert ids(reader)[:5] == first
    # the per-item views and the arrays agree
    assert [r.image_id for r in reader.records] == list(reader.records.ids)
    assert [r.label for r in reader.records] == reader.records.labels.tolist()


def test_a_listing_holds_no_python_object_per_image():
    import tracemalloc

    from pipeline.datasets.records import RecordsBuilder

    n = 20_000
    tracemalloc.start()
    try:
        builder = RecordsBuilder(Path("/data"))
        for i in range(n):
            builder.append(f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG", i % 1000)
        records = builder.build()
        del builder
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(records) == n and records[123].image_id == "n00000123/n00000123_123.JPEG"
    assert records[123].path == Path("/data/n00000123/n00000123_123.JPEG")
    # ImageNet-style 30-character ids: 16 B inline + the characters in the arena + 4 B label;
    # a Record object per image held ~390 B
    assert held / n < 100, f"{held / n:.0f} bytes held per image"
