"""scikit-learn's bundled digits (1797 8x8 grayscale images, 10 classes), no download.

Split: image i is in ``test`` when i % 5 == 0 (360 images), else ``train`` (1437);
``all`` is every image. image_id is ``digits/NNNN`` (the index in ``load_digits``).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.datasets.base import DatasetReader, Record


class DigitsReader(DatasetReader):
    name = "digits"
    splits = ("train", "test", "all")

    def __init__(self, root=None, split: str = "train", **options):
        super().__init__(None, split, **options)
        from sklearn.datasets import load_digits

        bunch = load_digits()
        self._images = bunch.images  # (1797, 8, 8) float64 in 0..16
        self.class_names = [str(c) for c in bunch.target_names]
        keep = {
            "train": lambda i: i % 5 != 0,
            "test": lambda i: i % 5 == 0,
            "all": lambda i: True,
        }[split]
        for i in range(len(bunch.target)):
            if keep(i):
                self.listing.append(f"digits/{i:04d}", int(bunch.target[i]))

    def load_image(self, record: Record) -> Image.Image:
        index = int(record.image_id.split("/")[1])
        pixels = np.clip(self._images[index] * 16.0, 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, mode="L")
