"""FGVC-Aircraft 2013b, read from ``fgvc-aircraft-2013b/data``.

Layout (root is ``fgvc-aircraft-2013b``, its parent, or the ``data`` folder)::

    data/images_<annotation>_<split>.txt   <image id> <class name, may contain spaces>
    data/variants.txt | families.txt | manufacturers.txt    class names, one a line
    data/images_box.txt                    <image id> <xmin> <ymin> <xmax> <ymax> (1-based)
    data/images/<image id>.jpg

Splits ``train``, ``val``, ``trainval``, ``test``. Options:

- ``annotation``: ``variant`` (100 classes, the usual benchmark; default), ``family``
  (70) or ``manufacturer`` (30).
- ``crop_banner`` (default true): the official images carry a 20-pixel copyright
  banner along the bottom edge. The dataset's README asks users to remove it and
  common practice crops it, so ``load_image`` drops the bottom 20 rows; set false to
  keep the full image. Boxes are measured from the top-left corner, so they stay
  valid either way (a box reaching into the banner is clipped by the crop).

Labels index the class-name file in its own line order. image_id is the path
relative to the folder holding ``data/`` (``data/images/1025794.jpg``).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from pipeline.datasets.annotations import check_options, matlab_box, read_lines, read_rows
from pipeline.datasets.base import DatasetReader, Record
from pipeline.datasets.records import RecordsBuilder
from pipeline.errors import DatasetError, ImageReadError

BANNER_PIXELS = 20
CLASS_FILES = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}
LAYOUT = (
    "fgvc-aircraft-2013b/data/{images_variant_<split>.txt, variants.txt, images_box.txt, images/<id>.jpg} "
    "(family / manufacturer files for the other annotation levels)"
)


class AircraftReader(DatasetReader):
    name = "aircraft"
    splits = ("train", "val", "trainval", "test")

    def __init__(self, root, split: str = "train", annotation: str = "variant", crop_banner: bool = True, **options):
        super().__init__(root, split, annotation=annotation, crop_banner=crop_banner, **options)
        check_options(self.name, self.options, {"annotation": tuple(CLASS_FILES), "crop_banner": (True, False)})
        self.annotation = annotation
        self.crop_banner = crop_banner
        data = self.data_folder()
        prefix = data.relative_to(self.root).as_posix()
        prefix = "" if prefix == "." else prefix + "/"
        self.class_names = read_lines(self.require_file(prefix + CLASS_FILES[annotation], LAYOUT))
        label_of = {name: i for i, name in enumerate(self.class_names)}
        boxes = {}
        if (data / "images_box.txt").exists():
            for fields in read_rows(data / "images_box.txt", 5):
                boxes[fields[0]] = matlab_box(*map(float, fields[1:5]))
        list_file = self.require_file(f"{prefix}images_{annotation}_{split}.txt", LAYOUT)
        self.listing = RecordsBuilder(data.parent)
        for image_id, class_name in read_rows(list_file, 2, max_split=1):
            class_name = class_name.strip()
            if class_name not in label_of:
                raise DatasetError(
                    f"{list_file}: image {image_id!r} has class {class_name!r}, which {CLASS_FILES[annotation]} lacks"
                )
            path = data / "images" / f"{image_id}.jpg"
            self.listing.append(path.relative_to(data.parent).as_posix(), label_of[class_name], boxes.get(image_id))

    def data_folder(self) -> Path:
        root = self.require_root()
        for candidate in (root / "data", root / "fgvc-aircraft-2013b" / "data", root):
            if (candidate / "images").is_dir() or (candidate / CLASS_FILES[self.annotation]).exists():
                return candidate
        return root / "data"  # absent: require_file names data/<file> in its message

    def load_image(self, record: Record) -> Image.Image:
        img = super().load_image(record)
        if not self.crop_banner:
            return img
        if img.height <= BANNER_PIXELS:
            raise ImageReadError(
                record.image_id,
                f"image is {img.height} px high, too small to drop the {BANNER_PIXELS}-px banner (set crop_banner: false)",
            )
        return img.crop((0, 0, img.width, img.height - BANNER_PIXELS))
