"""The training augmentation of arXiv 2307.08702 as deterministic, stored views.

diffssl trains its heads on guided-diffusion's ``random_crop_arr`` (the short side
rescaled to a random ``side`` in ``ceil(size / max_crop_frac) .. ceil(size /
min_crop_frac)``, then a random ``size x size`` window) followed by a horizontal
flip with probability 1/2, redrawn at every step. A cache cannot redraw, so each
image gets ``k`` stored views instead: view 0 is the dataset's deterministic centre
crop (its ``resize`` recipe, never flipped) and views ``1 .. k-1`` are random crops
and flips, each a pure function of ``(seed, image_id, view)`` and the image itself:

    words = sha256("diffprobe-view-v1|{seed}|{image_id}|{view}"), read as four
            little-endian uint64 w0, w1, w2, w3
    side  = lo + w0 % (hi - lo + 1)           (lo, hi = recipes.adm_crop_sides(...))
    y0    = w1 % (h - size + 1),  x0 = w2 % (w - size + 1)   (h, w after the rescale)
    flip  = w3 & 1                             (when ``flip``; else never)

so no view depends on batch size, shard, worker or dataset order (the bias of a
64-bit word taken modulo a few hundred is below 1e-16). The flip needs no pixels
and is known when the store's schema is written; ``(side, x0, y0)`` are recorded
per sample as the unit is written (``crop_side``, ``crop_x0``, ``crop_y0``; -1 for
view 0). The noise of every view is its own draw (``pipeline.noise``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from pipeline.datasets.base import DatasetReader
from pipeline.datasets.preprocess import Preprocessing, preprocess
from pipeline.datasets.recipes import adm_crop_sides, adm_random_crop
from pipeline.datasets.torch_data import PreprocessedImages

VIEW_SCHEME = "diffprobe-view-v1"
#: (side, x0, y0) recorded for a sample that drew no crop (view 0, failed images).
NO_CROP = (-1, -1, -1)


@dataclass(frozen=True)
class AugmentSpec:
    """Random views 1..k-1 of every image (extract's ``augment:``).

    kind: ``adm_random_crop``, guided-diffusion's ``random_crop_arr`` (the only one).
    min_crop_frac, max_crop_frac: the reference's defaults 0.8 and 1.0 (the crop
        covers 80-100 % of the rescaled short side).
    flip: horizontal flip with probability 1/2 per view, as the reference's
        ``random_flip``.
    """

    kind: Literal["adm_random_crop"] = "adm_random_crop"
    min_crop_frac: float = 0.8
    max_crop_frac: float = 1.0
    flip: bool = True

    def __post_init__(self):
        if not 0 < self.min_crop_frac <= self.max_crop_frac <= 1:
            raise ValueError(
                f"augment needs 0 < min_crop_frac <= max_crop_frac <= 1, got {self.min_crop_frac}, "
                f"{self.max_crop_frac}")

    def to_attrs(self, size: int) -> dict:
        lo, hi = adm_crop_sides(size, self.min_crop_frac, self.max_crop_frac)
        return {
            "kind": self.kind, "min_crop_frac": self.min_crop_frac, "max_crop_frac": self.max_crop_frac,
            "flip": self.flip, "scheme": VIEW_SCHEME,
            "reference": "guided-diffusion image_datasets.random_crop_arr + random_flip (diffssl's training loader)",
            "views": "view 0: the dataset's centre recipe, unflipped; views 1..k-1: random crop + flip",
            "side": f"short side rescaled to lo + w0 % (hi - lo + 1), lo..hi = {lo}..{hi}",
            "rescale": "while short side >= 2 * side: box resize to (w // 2, h // 2); one bicubic resize to "
                       "(round(w * s), round(h * s)), s = side / short",
            "crop": "size x size at (x0, y0) = (w2 % (w - size + 1), w1 % (h - size + 1)) in the rescaled image",
            "flip_draw": "w3 & 1, after the crop",
            "words": f"sha256('{VIEW_SCHEME}|seed|image_id|view') as 4 little-endian uint64 w0..w3",
            "recorded": "crop_side, crop_x0, crop_y0 and flipped per sample (-1: no crop drawn)",
        }


def view_words(seed: int, image_id: str, view: int) -> tuple[int, int, int, int]:
    """The four 64-bit words every draw of one (seed, image_id, view) comes from."""
    digest = hashlib.sha256(f"{VIEW_SCHEME}|{int(seed)}|{image_id}|{int(view)}".encode()).digest()
    return tuple(int.from_bytes(digest[i : i + 8], "little") for i in range(0, 32, 8))


def view_flipped(spec: AugmentSpec, seed: int, image_id: str, view: int) -> bool:
    """Whether view ``view`` of ``image_id`` is flipped (view 0 never is)."""
    return bool(view > 0 and spec.flip and view_words(seed, image_id, view)[3] & 1)


def random_view(img: Image.Image, size: int, spec: AugmentSpec, seed: int, image_id: str,
                view: int) -> tuple[Image.Image, tuple[int, int, int]]:
    """The unflipped random crop of view ``view >= 1``: (``size x size`` image, (side, x0, y0))."""
    w0, w1, w2, _ = view_words(seed, image_id, view)
    lo, hi = adm_crop_sides(size, spec.min_crop_frac, spec.max_crop_frac)
    side = lo + w0 % (hi - lo + 1)
    crop, (x0, y0) = adm_random_crop(img, size, side, lambda n_y, n_x: (w1 % n_y, w2 % n_x))
    return crop, (side, x0, y0)


def preprocess_views(img: Image.Image, prep: Preprocessing, spec: AugmentSpec, seed: int, image_id: str,
                     n_views: int, bbox=None) -> tuple[np.ndarray, np.ndarray]:
    """All ``n_views`` views of one image, unflipped (the extract stage flips per ``flipped``).

    Returns
    -------
    arrays : (n_views, channels, size, size) float32 in ``prep.value_range``.
    boxes : (n_views, 3) int64 (side, x0, y0) of each view's crop; view 0's is ``NO_CROP``.
    """
    arrays, boxes = [preprocess(img, prep, bbox, name=image_id)], [NO_CROP]

    def crop(converted: Image.Image) -> Image.Image:
        # preprocess() calls this between its mode conversion / bbox and its scaling;
        # the view being built is the next one, len(boxes)
        out, box = random_view(converted, prep.size, spec, seed, image_id, len(boxes))
        boxes.append(box)
        return out

    for _ in range(1, n_views):
        arrays.append(preprocess(img, prep, bbox, resize_crop=crop))
    return np.stack(arrays), np.asarray(boxes, dtype=np.int64)


class AugmentedImages(PreprocessedImages):
    """``reader`` as a Dataset of every image's views, decoded once per image.

    Item ``i`` is ``(i, (arrays, boxes), error)`` with ``arrays`` (n_views, C, S, S)
    float32 and ``boxes`` (n_views, 3) int64 as :func:`preprocess_views` returns
    them; a failed image gives NaN arrays, ``NO_CROP`` boxes and the reason.
    """

    def __init__(self, reader: DatasetReader, prep: Preprocessing, spec: AugmentSpec, seed: int,
                 n_views: int, use_bbox: bool = False):
        super().__init__(reader, prep, use_bbox)
        self.spec, self.seed, self.n_views = spec, seed, n_views

    def transform(self, img: Image.Image, record) -> tuple[np.ndarray, np.ndarray]:
        return preprocess_views(img, self.prep, self.spec, self.seed, record.image_id, self.n_views,
                                record.bbox if self.use_bbox else None)

    def failed(self) -> tuple[np.ndarray, np.ndarray]:
        return np.stack([super().failed()] * self.n_views), np.tile(NO_CROP, (self.n_views, 1))
