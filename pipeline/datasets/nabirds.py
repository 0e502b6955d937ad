"""NABirds (Cornell Lab), CUB-style annotation files plus a class hierarchy.

Layout (root is the ``nabirds`` folder or the folder that contains it)::

    images.txt              <uuid> <relative path under images/>
    image_class_labels.txt  <uuid> <class_id>
    train_test_split.txt    <uuid> <1 = train, 0 = test>
    classes.txt             <class_id> <name with spaces>     (all hierarchy nodes)
    hierarchy.txt           <child class_id> <parent class_id>
    bounding_boxes.txt      <uuid> <x> <y> <width> <height>   (optional; pixels)
    images/<folder>/<file>.jpg

Splits ``train`` and ``test``. classes.txt lists every node of the taxonomy (1011),
but images are labelled with leaf classes only (555), and the ids are sparse; labels
are therefore 0..K-1 over the class ids that have at least one image in the whole
dataset (both splits, sorted by id), so train and test share one label space.
``reader.class_ids[label]`` gives the original id back; ``reader.hierarchy`` maps
child id -> parent id and ``reader.all_class_names`` id -> name for every node.
"""

from __future__ import annotations

from pipeline.datasets.annotations import read_rows
from pipeline.datasets.cub import CUBReader
from pipeline.errors import DatasetError


class NABirdsReader(CUBReader):
    name = "nabirds"
    folder = "nabirds"
    layout = (
        "nabirds/{images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, "
        "hierarchy.txt, bounding_boxes.txt, images/<folder>/<file>.jpg}"
    )

    def label_space(self, class_table: dict, image_classes: dict) -> list[int]:
        """Only class ids that label at least one image (in either split), sorted."""
        base = self.dataset_folder()
        rel = base.relative_to(self.root).as_posix()
        hierarchy_file = self.require_file(("" if rel == "." else rel + "/") + "hierarchy.txt", self.layout)
        self.hierarchy: dict[int, int] = {}
        for child, parent in (fields[:2] for fields in read_rows(hierarchy_file, 2)):
            if not (child.isdigit() and parent.isdigit()):
                raise DatasetError(f"{hierarchy_file}: expected '<child id> <parent id>', got {child!r} {parent!r}")
            self.hierarchy[int(child)] = int(parent)
        self.all_class_names: dict[int, str] = dict(class_table)
        return sorted(set(image_classes.values()))

    @staticmethod
    def clean_name(name: str) -> str:
        return name.strip()

    def ancestors(self, class_id: int) -> list[int]:
        """Parent, grandparent, ... of an original class id, up to the root."""
        chain = []
        while class_id in self.hierarchy and len(chain) <= len(self.hierarchy):
            class_id = self.hierarchy[class_id]
            chain.append(class_id)
        return chain
