"""Oxford-IIIT Pets (37 cat and dog breeds, 7349 images).

Layout (root holds the two unpacked archives)::

    annotations/trainval.txt   <name> <class id 1..37> <species 1=cat 2=dog> <breed id>
    annotations/test.txt       same
    images/<name>.jpg          e.g. images/Abyssinian_100.jpg

Splits ``trainval`` (3680) and ``test`` (3669), the official ones. Labels are
``class id - 1``. Class names come from the file names (``american_bulldog_12`` ->
``american bulldog``): capitalisation as in the files (cats are capitalised, dogs
are not), underscores as spaces. Both list files are read so that every class has a
name whichever split is opened. image_id is ``images/<name>.jpg``. The head boxes in
``annotations/xmls`` cover the head only, not the animal, so no ``bbox`` is given.
"""

from __future__ import annotations

from pipeline.datasets.annotations import check_options, read_rows, readable
from pipeline.datasets.base import DatasetReader
from pipeline.errors import DatasetError

LAYOUT = "annotations/{trainval.txt, test.txt} with lines '<name> <class id> <species> <breed id>', images/<name>.jpg"


class PetsReader(DatasetReader):
    name = "pets"
    splits = ("trainval", "test")

    def __init__(self, root, split: str = "trainval", **options):
        super().__init__(root, split, **options)
        check_options(self.name, options, {})
        root = self.require_root()
        names: dict[int, str] = {}
        rows_by_split = {}
        for s in self.splits:
            path = self.require_file(f"annotations/{s}.txt", LAYOUT)
            rows_by_split[s] = rows = []
            for fields in read_rows(path, 2):
                image_name, class_id = fields[0], fields[1]
                if not class_id.isdigit() or int(class_id) < 1:
                    raise DatasetError(f"{path}: image {image_name!r} has class id {class_id!r}, expected 1, 2, ...")
                breed = readable(image_name.rsplit("_", 1)[0])
                previous = names.setdefault(int(class_id), breed)
                if previous != breed:
                    raise DatasetError(
                        f"{path}: class id {class_id} is used for both {previous!r} and {breed!r} (from {image_name!r})"
                    )
                rows.append((image_name, int(class_id)))
        missing = sorted(set(range(1, max(names) + 1)) - set(names))
        if missing:
            raise DatasetError(f"{self.name}: class id(s) {missing[:5]} never appear in annotations/*.txt")
        self.class_names = [names[i] for i in range(1, max(names) + 1)]
        for image_name, class_id in rows_by_split[split]:
            self.listing.append(f"images/{image_name}.jpg", class_id - 1)
