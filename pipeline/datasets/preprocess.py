"""Deterministic preprocessing: PIL image -> model input array.

Resize the shorter side to ``size`` (bicubic, PIL), centre-crop to size x size (or
crop to a bounding box first), convert mode (RGB for 3 channels, L for 1; alpha is
composited on white, CMYK/P/I;16 converted), scale to the model's value range.
PIL + numpy only: torchvision is not a dependency.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Preprocessing:
    """How images become model inputs; recorded in the store's attrs.

    size: output height = width in pixels.
    channels: 1 (grayscale) or 3 (RGB).
    value_range: (low, high) the model expects, e.g. (-1, 1) for DDPM/ADM.
    resample: PIL filter name for the resize.
    """

    size: int
    channels: int = 3
    value_range: tuple[float, float] = (-1.0, 1.0)
    resample: str = "bicubic"

    def to_attrs(self) -> dict:
        d = asdict(self)
        d["value_range"] = list(self.value_range)
        d["steps"] = "mode convert -> [bbox crop] -> resize shorter side -> centre crop -> scale"
        return d


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to RGB (channels=3) or L (channels=1); alpha goes on white."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max() if arr.max() > 0 else 1.0
        img = Image.fromarray((arr / peak * 255).astype(np.uint8))
    return img.convert("RGB" if channels == 3 else "L")


def resize_center_crop(img: Image.Image, size: int, resample: str = "bicubic") -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), getattr(Image.Resampling, resample.upper()))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def preprocess(
    img: Image.Image,
    prep: Preprocessing,
    bbox: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Return a ``(channels, size, size) float32`` array in ``prep.value_range``."""
    img = to_mode(img, prep.channels)
    if bbox is not None:
        x0, y0, x1, y1 = bbox
        img = img.crop((max(0, int(x0)), max(0, int(y0)), min(img.width, int(round(x1))), min(img.height, int(round(y1)))))
    img = resize_center_crop(img, prep.size, prep.resample)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    low, high = prep.value_range
    return np.ascontiguousarray(arr * (high - low) + low, dtype=np.float32)
