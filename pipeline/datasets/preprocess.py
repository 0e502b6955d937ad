"""Deterministic preprocessing: PIL image -> model input array.

Mode conversion, optional bounding-box crop, resize + centre crop to ``size x size``
by the chosen recipe (``resize: direct | adm | torchvision``, see
``pipeline.datasets.recipes``), then scaling to the model's value range. PIL + numpy
only: torchvision is not a dependency.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image

from pipeline.datasets.recipes import RECIPES, RESIZE_STYLES
from pipeline.errors import DatasetError, DiffprobeWarning, did_you_mean


@dataclass(frozen=True)
class Preprocessing:
    """How images become model inputs; recorded in the store's attrs.

    size: output height = width in pixels.
    channels: 1 (grayscale) or 3 (RGB).
    value_range: (low, high) the model expects, e.g. (-1, 1) for DDPM/ADM.
    resample: PIL filter name for the ``direct`` and ``torchvision`` resizes
        (``adm`` fixes its own: box halvings, then bicubic).
    resize: the recipe (``direct``, ``adm``, ``torchvision``); the model adapter
        leaves the default and the stage sets the dataset's choice (``with_resize``).
    """

    size: int
    channels: int = 3
    value_range: tuple[float, float] = (-1.0, 1.0)
    resample: str = "bicubic"
    resize: str = "direct"

    def __post_init__(self):
        if self.resize not in RECIPES:
            raise DatasetError(
                f"resize: {self.resize!r}{did_you_mean(self.resize, RESIZE_STYLES)}; valid: {', '.join(RESIZE_STYLES)}"
            )
        if self.resize == "adm" and self.resample != "bicubic":
            raise DatasetError(f"resize: adm always resizes bicubic; resample {self.resample!r} is not part of it")

    def with_resize(self, resize: str) -> Preprocessing:
        """The same model input, reached by recipe ``resize``."""
        return replace(self, resize=resize)

    def to_attrs(self) -> dict:
        d = asdict(self)
        d["value_range"] = list(self.value_range)
        d["steps"] = "mode convert -> [bbox crop] -> resize shorter side -> centre crop -> scale"
        d["recipe"] = RECIPES[self.resize].describe(self.resample)
        return d


#: Images with a side under this many pixels get a TinyImageWarning: they are
#: nearly always a broken file or box (the 8x8 digits are the smallest real images here).
TINY_IMAGE_SIDE = 4


#: At most this many tiny images are named per process; then one line says the rest are not.
MAX_TINY_WARNINGS = 5
_tiny_seen = 0


class TinyImageWarning(DiffprobeWarning):
    """An image (or its bbox crop) is only a few pixels on a side."""


def _warn_tiny(img: Image.Image, prep: Preprocessing, bbox, name: str | None) -> None:
    # A dataset of broken files would otherwise print one line per image.
    global _tiny_seen
    _tiny_seen += 1
    if _tiny_seen > MAX_TINY_WARNINGS + 1:
        return
    if _tiny_seen == MAX_TINY_WARNINGS + 1:
        warnings.warn(TinyImageWarning(
            f"more images under {TINY_IMAGE_SIDE} pixels on a side are not named"), stacklevel=3)
        return
    what = f"image {name}" if name else "an image"
    warnings.warn(TinyImageWarning(
        f"{what} is {img.width}x{img.height} pixels{' after its bbox crop' if bbox is not None else ''}; "
        f"resized to {prep.size}x{prep.size} it holds almost nothing: check the dataset files"
        + (" and its boxes" if bbox is not None else "")), stacklevel=3)


def preprocess(
    img: Image.Image,
    prep: Preprocessing,
    bbox: tuple[float, float, float, float] | None = None,
    resize_crop: Callable[[Image.Image], Image.Image] | None = None,
    name: str | None = None,
) -> np.ndarray:
    """Return a ``(channels, size, size) float32`` array in ``prep.value_range``.

    ``name`` (the image id) is only used to name the image in a TinyImageWarning.

    ``resize_crop`` replaces the recipe's resize + centre crop (the training
    augmentation's random crop, ``pipeline.datasets.augment``); mode conversion,
    bbox and scaling stay the recipe's.

    For ``value_range`` (-1, 1) the scaling equals both references bit for bit in
    float32: guided-diffusion's ``x / 127.5 - 1`` and torchvision's
    ``Normalize(0.5, 0.5)(x / 255)`` (multiplying by 2 is exact in binary floating point).
    """
    recipe = RECIPES[prep.resize]
    img = recipe.convert(img, prep.channels)
    if bbox is not None:
        x0, y0, x1, y1 = bbox
        img = img.crop((max(0, int(x0)), max(0, int(y0)), min(img.width, int(round(x1))), min(img.height, int(round(y1)))))
    if min(img.size) < TINY_IMAGE_SIDE:
        _warn_tiny(img, prep, bbox, name)
    img = recipe.resize_crop(img, prep.size, prep.resample) if resize_crop is None else resize_crop(img)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    low, high = prep.value_range
    return np.ascontiguousarray(arr * (high - low) + low, dtype=np.float32)
