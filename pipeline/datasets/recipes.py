"""Resize recipes: how a decoded PIL image becomes a ``size x size`` image in RGB or L.

Each recipe owns three things: the mode conversion, the resize + centre crop, and a
description of every parameter for the store's provenance. Two recipes reproduce the
published references exactly (pixel for pixel, same PIL calls and integer rounding);
the third is diffprobe's original behaviour, kept so older stores stay reproducible.

``direct``
    diffprobe's original recipe. Alpha (RGBA, LA, PA, P with a transparent index) is
    composited on white; 16-bit / 32-bit grey is divided by the image's own peak; then
    one resize (``resample`` filter, bicubic by default) so the short side is ``size``
    (long side ``max(size, round(long * size / short))``), centre crop at offsets
    ``(dim - size) // 2``.
``adm``
    guided-diffusion's ``center_crop_arr`` with its loader (used by 2307.08702 and by
    the DiT evaluation of 2303.16203): PIL ``convert("RGB")``, which drops alpha (a
    transparent pixel keeps its stored colour); while the short side is at least
    ``2 * size``, halve both sides (``w // 2, h // 2``) with a BOX filter; then one
    BICUBIC resize to ``round(w * scale), round(h * scale)`` with
    ``scale = size / short``; centre crop at offsets ``(dim - size) // 2``.
``torchvision``
    torchvision's ``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` on a PIL image after
    the datasets' ``convert("RGB")`` (the Stable Diffusion evaluation of 2303.16203):
    short side to ``size``, long side ``int(size * long / short)`` (truncated), one
    resize with the ``resample`` filter (PIL always antialiases), centre crop at
    offsets ``int(round((dim - size) / 2.0))`` (Python's round: halves go to even).

The training augmentation of 2307.08702 (guided-diffusion's ``random_crop_arr``) lives
here too, with its random choices passed in (``adm_random_crop``; the draws are
``pipeline.datasets.augment``'s): the short side is rescaled to ``side`` exactly as
``adm`` rescales it to ``size`` (box halvings while the short side is at least
``2 * side``, one bicubic resize by ``round``), then a ``size x size`` window is cut
at the chosen offsets; ``side`` ranges over ``adm_crop_sides`` (``ceil(size / 1.0) ..
ceil(size / 0.8)`` by default). ``adm`` is this with ``side = size``, centred.

Both reference recipes take 16-bit grey (PIL modes ``I;16*`` and ``I``) to 8 bits by
``round(v / 257)`` before converting: PIL's own conversion clips such images at 255
(all white), which no reference dataset exercises. Every other mode (P, L, LA, RGBA,
CMYK, YCbCr, 1) goes through PIL's ``convert`` exactly as the references do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

HIGH_BIT_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _filter(name: str) -> Image.Resampling:
    return getattr(Image.Resampling, name.upper())


def _target(channels: int) -> str:
    return "RGB" if channels == 3 else "L"


# -- mode conversion --------------------------------------------------------------------


def composite_on_white(img: Image.Image, channels: int) -> Image.Image:
    """``direct``: alpha composited on white; 16-bit grey divided by its own peak."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    if img.mode in HIGH_BIT_DEPTH:
        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max() if arr.max() > 0 else 1.0
        img = Image.fromarray((arr / peak * 255).astype(np.uint8))
    return img.convert(_target(channels))


def plain_convert(img: Image.Image, channels: int) -> Image.Image:
    """Reference recipes: PIL ``convert`` (alpha dropped); 16-bit grey -> 8 bits by /257."""
    if img.mode in HIGH_BIT_DEPTH:
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8))
    return img.convert(_target(channels))


# -- resize + centre crop -----------------------------------------------------------------


def _crop_square(img: Image.Image, left: int, top: int, size: int) -> Image.Image:
    return img.crop((left, top, left + size, top + size))


def direct_resize_crop(img: Image.Image, size: int, resample: str) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), _filter(resample))
    return _crop_square(img, (new_w - size) // 2, (new_h - size) // 2, size)


def adm_rescale(img: Image.Image, side: int) -> Image.Image:
    """guided-diffusion's resize: the short side becomes ``side`` (the long side by ``round``)."""
    # Repeated 2x BOX reductions first: one bicubic step from far above the target aliases.
    while min(img.size) >= 2 * side:
        img = img.resize((img.width // 2, img.height // 2), Image.Resampling.BOX)
    scale = side / min(img.size)
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)


def adm_resize_crop(img: Image.Image, size: int, resample: str) -> Image.Image:
    img = adm_rescale(img, size)
    return _crop_square(img, (img.width - size) // 2, (img.height - size) // 2, size)


# -- the training augmentation ----------------------------------------------------------


def adm_crop_sides(size: int, min_crop_frac: float = 0.8, max_crop_frac: float = 1.0) -> tuple[int, int]:
    """The inclusive range ``random_crop_arr`` draws the resized short side from.

    guided-diffusion: ``ceil(size / max_crop_frac) .. ceil(size / min_crop_frac)``
    (``random.randrange(lo, hi + 1)``); 224 px at the defaults gives 224 .. 280.
    """
    return math.ceil(size / max_crop_frac), math.ceil(size / min_crop_frac)


def adm_random_crop(
    img: Image.Image, size: int, side: int, choose_offsets: Callable[[int, int], tuple[int, int]]
) -> tuple[Image.Image, tuple[int, int]]:
    """guided-diffusion's ``random_crop_arr`` with the random choices passed in.

    The image is rescaled by :func:`adm_rescale` so its short side is ``side``
    (``side >= size``, drawn from :func:`adm_crop_sides`), then a ``size x size``
    window is cut at ``(x0, y0)``. ``choose_offsets(n_y, n_x)`` returns ``(y0, x0)``
    with ``0 <= y0 < n_y`` and ``0 <= x0 < n_x``, the counts of possible positions
    (``randrange(h - size + 1)``, then ``randrange(w - size + 1)`` in the reference).
    The flip the reference applies afterwards is not part of this function.

    Returns
    -------
    (image ``size x size``, (x0, y0)) : the crop and its top-left corner in the
    rescaled image.
    """
    if side < size:
        raise ValueError(f"the rescaled short side {side} must be >= the crop size {size}")
    img = adm_rescale(img, side)
    n_y, n_x = img.height - size + 1, img.width - size + 1
    y0, x0 = choose_offsets(n_y, n_x)
    if not (0 <= y0 < n_y and 0 <= x0 < n_x):
        raise ValueError(f"crop offsets ({x0}, {y0}) outside 0..{n_x - 1} x 0..{n_y - 1}")
    return _crop_square(img, x0, y0, size), (int(x0), int(y0))


def adm_crop_at(img: Image.Image, size: int, side: int, x0: int, y0: int) -> Image.Image:
    """Re-apply a recorded random crop: rescale to short side ``side``, cut at ``(x0, y0)``."""
    return adm_random_crop(img, size, side, lambda n_y, n_x: (y0, x0))[0]


def torchvision_resize_crop(img: Image.Image, size: int, resample: str) -> Image.Image:
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _filter(resample))
    # new_long >= size always, so torchvision's padding branch never applies here.
    left, top = round((new_w - size) / 2.0), round((new_h - size) / 2.0)
    return _crop_square(img, left, top, size)


# -- the registry -----------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """One resize style: mode conversion, resize + crop, and its provenance text.

    convert(img, channels) -> PIL image in RGB (channels=3) or L (channels=1).
    resize_crop(img, size, resample) -> PIL image of ``size x size``.
    describe(resample) -> dict of every parameter, stored in the store's attrs.
    """

    name: str
    convert: Callable[[Image.Image, int], Image.Image]
    resize_crop: Callable[[Image.Image, int, str], Image.Image]
    describe: Callable[[str], dict]


RECIPES: dict[str, Recipe] = {
    "direct": Recipe(
        "direct", composite_on_white, direct_resize_crop,
        lambda resample: {
            "reference": "diffprobe's original recipe",
            "mode": "alpha composited on white; 16-bit grey divided by the image's peak; PIL convert",
            "resize": f"one {resample} resize, short side = size, long side max(size, round(long * size / short))",
            "crop": "centre, offsets (dim - size) // 2",
        }),
    "adm": Recipe(
        "adm", plain_convert, adm_resize_crop,
        lambda resample: {
            "reference": "guided-diffusion image_datasets.center_crop_arr (arXiv 2307.08702; DiT in 2303.16203)",
            "mode": "PIL convert (alpha dropped, not composited); 16-bit grey round(v / 257)",
            "halve": "while short side >= 2 * size: box resize to (w // 2, h // 2)",
            "resize": "one bicubic resize to (round(w * scale), round(h * scale)), scale = size / short",
            "crop": "centre, offsets (dim - size) // 2",
        }),
    "torchvision": Recipe(
        "torchvision", plain_convert, torchvision_resize_crop,
        lambda resample: {
            "reference": "torchvision Resize(size, BICUBIC) + CenterCrop(size) on PIL (arXiv 2303.16203, Stable Diffusion)",
            "mode": "PIL convert (alpha dropped, not composited); 16-bit grey round(v / 257)",
            "resize": f"one {resample} resize, short side = size, long side int(size * long / short)",
            "crop": "centre, offsets int(round((dim - size) / 2.0))",
        }),
}

#: the values ``resize:`` accepts, in documentation order.
RESIZE_STYLES: tuple[str, ...] = tuple(RECIPES)
