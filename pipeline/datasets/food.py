"""Food-101 (101 dishes, 750 train + 250 test images each).

Layout (root is the ``food-101`` folder or the folder that contains it)::

    meta/classes.txt      apple_pie ... (label order)
    meta/labels.txt       Apple pie ... (readable names, same order; optional)
    meta/train.json       {"apple_pie": ["apple_pie/1005649", ...], ...}
    meta/test.json
    images/<class>/<id>.jpg

Splits ``train`` (75750) and ``test`` (25250). When ``meta/<split>.json`` is absent
the equivalent ``meta/<split>.txt`` (one ``<class>/<id>`` a line) is used. Class
names are ``labels.txt`` when present, else ``classes.txt`` with underscores as
spaces. Records follow classes.txt order, then the list order. image_id is
``images/<class>/<id>.jpg``.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.datasets.annotations import check_options, read_lines, readable
from pipeline.datasets.base import DatasetReader
from pipeline.datasets.records import RecordsBuilder
from pipeline.datasets.files import open_text
from pipeline.errors import DatasetError

LAYOUT = "food-101/{meta/classes.txt, meta/labels.txt, meta/train.json, meta/test.json, images/<class>/<id>.jpg}"


class FoodReader(DatasetReader):
    name = "food"
    splits = ("train", "test")

    def __init__(self, root, split: str = "train", **options):
        super().__init__(root, split, **options)
        check_options(self.name, options, {})
        root = self.require_root()
        base = root / "food-101" if not (root / "meta").is_dir() and (root / "food-101" / "meta").is_dir() else root
        prefix = "food-101/" if base != root else ""
        classes = read_lines(self.require_file(prefix + "meta/classes.txt", LAYOUT))
        label_of = {c: i for i, c in enumerate(classes)}
        labels_txt = base / "meta" / "labels.txt"
        readable_names = read_lines(labels_txt) if labels_txt.exists() else []
        if readable_names and len(readable_names) != len(classes):
            raise DatasetError(f"{labels_txt}: {len(readable_names)} names for {len(classes)} classes in classes.txt")
        self.class_names = readable_names or [readable(c) for c in classes]

        entries = self.split_entries(base, prefix)
        by_class: dict[str, list[str]] = {}
        for entry in entries:
            cls = entry.split("/", 1)[0]
            if cls not in label_of:
                raise DatasetError(f"{self.name}: {split} list names {entry!r}, whose class is not in meta/classes.txt")
            by_class.setdefault(cls, []).append(entry)
        self.listing = RecordsBuilder(base)
        for cls in classes:
            for entry in by_class.get(cls, []):
                self.listing.append(f"images/{entry}.jpg", label_of[cls])

    def split_entries(self, base: Path, prefix: str) -> list[str]:
        """``<class>/<id>`` entries of the split, from meta/<split>.json or meta/<split>.txt."""
        json_path = base / "meta" / f"{self.split}.json"
        txt_path = base / "meta" / f"{self.split}.txt"
        if json_path.exists():
            try:
                with open_text(json_path) as f:
                    table = json.load(f)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{json_path}: not valid JSON ({exc}); re-download meta/") from None
            if not isinstance(table, dict):
                raise DatasetError(f"{json_path}: expected an object {{class: [\"class/id\", ...]}}")
            return [str(e) for entries in table.values() for e in entries]
        if txt_path.exists():
            return read_lines(txt_path)
        self.require_file(f"{prefix}meta/{self.split}.json", LAYOUT)
        return []  # unreachable: require_file raised
