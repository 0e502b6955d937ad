"""The resize recipes against independent implementations of the published ones.

The references are re-implemented here from their published descriptions (plain PIL
calls, size arithmetic done up front, crops by numpy slicing), never by calling
diffprobe's recipes, and compared pixel for pixel and float for float:

* adm: guided-diffusion's loader + ``center_crop_arr`` (arXiv 2307.08702):
  ``convert("RGB")``; while the short side >= 2 x target, BOX-resize to
  ``(w // 2, h // 2)``; one BICUBIC resize to ``round(x * target / short)``; crop at
  ``(dim - target) // 2``; ``x / 127.5 - 1``.
* torchvision: the dataset's ``convert("RGB")``, ``Resize(target, BICUBIC)`` (long
  side ``int(target * long / short)``), ``CenterCrop(target)`` (offsets
  ``int(round((dim - target) / 2.0))``), ``ToTensor`` + ``Normalize(0.5, 0.5)``
  (arXiv 2303.16203).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from conftest import TINY_UNET
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline import store
from pipeline.datasets import DatasetConfig, Preprocessing, preprocess
from pipeline.datasets.recipes import RESIZE_STYLES
from pipeline.errors import ConfigError, DatasetError, StoreError
from pipeline.workflow.config import load_workflow
from pipeline.workflow.runner import Runner
from stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
AWKWARD = [(64, 99), (203, 150), (640, 480), (1024, 768)]
TARGETS = [64, 224, 256]


# -- the published recipes, written from their descriptions -----------------------------


def reference_adm(img: Image.Image, target: int, mode: str = "RGB") -> np.ndarray:
    pil = img.convert(mode)
    halvings = []
    w, h = pil.size
    while min(w, h) >= 2 * target:
        w, h = w // 2, h // 2
        halvings.append((w, h))
    for size in halvings:
        pil = pil.resize(size, resample=Image.BOX)
    factor = target / min(pil.size)
    pil = pil.resize(tuple(round(n * factor) for n in pil.size), resample=Image.BICUBIC)
    arr = np.array(pil)
    y0, x0 = (arr.shape[0] - target) // 2, (arr.shape[1] - target) // 2
    return arr[y0:y0 + target, x0:x0 + target]


def reference_torchvision(img: Image.Image, target: int, mode: str = "RGB") -> np.ndarray:
    pil = img.convert(mode)
    w, h = pil.size
    out = (target, int(target * h / w)) if w <= h else (int(target * w / h), target)
    pil = pil.resize(out, resample=Image.BICUBIC)  # PIL returns a copy when the size is unchanged
    arr = np.array(pil)
    top = round((arr.shape[0] - target) / 2.0)  # Python 3 round: halves to even
    left = round((arr.shape[1] - target) / 2.0)
    return arr[top:top + target, left:left + target]


def adm_scaling(arr: np.ndarray) -> np.ndarray:
    """guided-diffusion: ``arr.astype(np.float32) / 127.5 - 1``, HWC -> CHW."""
    out = arr.astype(np.float32) / 127.5 - 1
    return out[None] if out.ndim == 2 else np.transpose(out, [2, 0, 1])


def torchvision_scaling(arr: np.ndarray) -> np.ndarray:
    """``ToTensor()`` then ``Normalize([0.5], [0.5])``, as torch ops in float32."""
    t = torch.from_numpy(np.array(arr))
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    return t.to(torch.float32).div(255).sub_(0.5).div_(0.5).numpy()


REFERENCES = {"adm": (reference_adm, adm_scaling), "torchvision": (reference_torchvision, torchvision_scaling)}


# -- test images: photo-like content, read back from PNG as a reader would -------------


def from_png(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    buf.seek(0)
    with Image.open(buf) as out:
        out.load()
        return out.copy()


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Smooth structure, fine stripes near the Nyquist limit and noise, (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = 120 + 60 * np.sin(x / 7.3 + seed) * np.cos(y / 5.1) + 40 * np.sin((x + y) / 1.7)
    rgb = np.stack([base, np.roll(base, 5, axis=1), 255 - base], -1) + rng.normal(0, 18, (h, w, 3))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def rgba_image(w: int = 203, h: int = 150) -> Image.Image:
    rgba = np.dstack([photo(w, h, 1), np.zeros((h, w), np.uint8)])
    rgba[..., 3] = np.where(np.arange(w)[None, :] < w // 3, 0, np.linspace(0, 255, w)[None, :].astype(np.uint8))
    return from_png(Image.fromarray(rgba, "RGBA"))


def palette_image(w: int = 203, h: int = 150) -> Image.Image:
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 16, (h, w), dtype=np.uint8), "P")
    img.putpalette(rng.integers(0, 256, 16 * 3, dtype=np.uint8).tolist())
    img.info["transparency"] = 3
    out = from_png(img)
    assert out.mode == "P" and out.info.get("transparency") == 3
    return out


def prep(target: int, resize: str, channels: int = 3) -> Preprocessing:
    return Preprocessing(size=target, channels=channels, value_range=(-1.0, 1.0), resize=resize)


def grey_levels(arr: np.ndarray) -> np.ndarray:
    return np.rint((arr.astype(np.float64) + 1) * 127.5)


# -- pixel-exact agreement ---------------------------------------------------------------


@pytest.mark.parametrize("style", ["adm", "torchvision"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("w,h", AWKWARD + [(99, 64), (150, 203)], ids=lambda v: str(v))
def test_recipe_equals_the_published_one(style, target, w, h):
    img = from_png(Image.fromarray(photo(w, h)))
    recipe, scaling = REFERENCES[style]
    expected = scaling(recipe(img, target))
    got = preprocess(img, prep(target, style))
    assert got.shape == (3, target, target) and got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("style", ["adm", "torchvision"])
@pytest.mark.parametrize("make", [rgba_image, palette_image], ids=["RGBA", "P+transparency"])
def test_alpha_is_dropped_as_the_references_do(style, make):
    img = make()
    recipe, scaling = REFERENCES[style]
    got = preprocess(img, prep(64, style))
    np.testing.assert_array_equal(got, scaling(recipe(img, 64)))
    # diffprobe's original recipe composites on white instead: not the references' pixels
    assert np.abs(grey_levels(preprocess(img, prep(64, "direct"))) - grey_levels(got)).max() > 50


@pytest.mark.parametrize("style", ["adm", "torchvision"])
@pytest.mark.parametrize("mode", ["L", "LA", "CMYK", "1", "YCbCr", "RGB"])
def test_every_8bit_mode_goes_through_pil_convert(style, mode):
    img = from_png(Image.fromarray(photo(203, 150, 3))) if mode != "CMYK" else Image.fromarray(photo(203, 150, 3))
    img = img.convert(mode)
    recipe, scaling = REFERENCES[style]
    np.testing.assert_array_equal(preprocess(img, prep(64, style)), scaling(recipe(img, 64)))
    np.testing.assert_array_equal(preprocess(img, prep(64, style, channels=1)), scaling(recipe(img, 64, mode="L")))


@pytest.mark.parametrize("style", ["adm", "torchvision"])
def test_16bit_grey_is_taken_to_8_bits_not_clipped_white(style):
    eight = photo(150, 203, 4)[..., 0]
    sixteen = from_png(Image.fromarray(eight.astype(np.uint16) * 257))
    assert sixteen.mode.startswith("I")
    assert (np.asarray(sixteen.convert("L")) == 255).mean() > 0.9  # PIL's own convert clips at 255
    recipe, scaling = REFERENCES[style]
    np.testing.assert_array_equal(preprocess(sixteen, prep(64, style)), scaling(recipe(Image.fromarray(eight), 64)))


def test_bbox_crop_comes_before_the_recipe():
    img = from_png(Image.fromarray(photo(640, 480, 5)))
    box = (100.0, 40.0, 560.4, 470.0)
    cropped = img.crop((100, 40, 560, 470))
    np.testing.assert_array_equal(preprocess(img, prep(224, "adm"), bbox=box), adm_scaling(reference_adm(cropped, 224)))


def test_scaling_is_bit_exact_for_all_256_levels():
    levels = from_png(Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)))  # small: no resize
    for style, (_, scaling) in REFERENCES.items():
        got = preprocess(levels, prep(16, style, channels=1))
        np.testing.assert_array_equal(got, scaling(np.asarray(levels)))


# -- where diffprobe's original recipe differs --------------------------------------------


def test_direct_differs_from_adm_where_adm_halves_first():
    """640x480 at 224: adm halves to 320x240 with a box filter before its bicubic step."""
    img = from_png(Image.fromarray(photo(640, 480)))
    direct = grey_levels(preprocess(img, prep(224, "direct")))
    adm = grey_levels(adm_scaling(reference_adm(img, 224)))
    assert np.abs(direct - adm).max() >= 10
    # 203x150 at 64 also halves; at 224 no recipe halves and both are one bicubic resize
    small = from_png(Image.fromarray(photo(203, 150)))
    assert np.abs(grey_levels(preprocess(small, prep(64, "direct")))
                  - grey_levels(adm_scaling(reference_adm(small, 64)))).max() > 0
    np.testing.assert_array_equal(preprocess(small, prep(224, "direct")), preprocess(small, prep(224, "adm")))


def test_torchvision_truncates_the_long_side_where_adm_rounds():
    img = from_png(Image.fromarray(photo(640, 427)))  # 224 * 640 / 427 = 335.7: 335 vs 336
    tv = preprocess(img, prep(224, "torchvision"))
    assert not np.array_equal(tv, preprocess(img, prep(224, "adm")))
    np.testing.assert_array_equal(tv, torchvision_scaling(reference_torchvision(img, 224)))


# -- property: random sizes --------------------------------------------------------------


@settings(max_examples=60, deadline=None, derandomize=True)
@given(w=st.integers(1, 600), h=st.integers(1, 600), target=st.integers(1, 300),
       style=st.sampled_from(["adm", "torchvision"]))
def test_random_sizes_match_the_references(w, h, target, style):
    img = Image.fromarray(photo(w, h, w * 7 + h))
    recipe, scaling = REFERENCES[style]
    np.testing.assert_array_equal(preprocess(img, prep(target, style)), scaling(recipe(img, target)))


# -- configuration, provenance, stages ---------------------------------------------------


def test_styles_and_their_validation():
    assert RESIZE_STYLES == ("direct", "adm", "torchvision")
    assert DatasetConfig().resize == "direct"
    with pytest.raises(DatasetError, match=r"resize: 'admm' \(did you mean 'adm'\?\); valid: direct, adm, torchvision"):
        Preprocessing(size=8, resize="admm")
    with pytest.raises(DatasetError, match="adm always resizes bicubic"):
        Preprocessing(size=8, resample="bilinear", resize="adm")


def _folder(root: Path) -> Path:
    """Two classes of 40x33 RGBA images: adm halves them (33 >= 2 x 16) and drops alpha."""
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            rgba = np.dstack([photo(40, 33, 10 * i + ord(c)), np.full((33, 40), 90, np.uint8)])
            Image.fromarray(rgba, "RGBA").save(root / c / f"{i}.png")
    return root


def _workflow(folder: Path, stage: str, dataset: str, extra: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny_unet.json").write_text(json.dumps(TINY_UNET))
    (folder / "wf.yaml").write_text(
        f"name: t\noutput_dir: out\nstages:\n  - name: s\n    stage: {stage}\n"
        f"    model: {{config: tiny_unet.json, null_class: 10}}\n    dataset: {dataset}\n{extra}")
    return folder / "wf.yaml"


def test_yaml_typo_is_one_line_naming_the_choices(tmp_path):
    wf = _workflow(tmp_path / "w", "extract", "{reader: digits, split: test, resize: admm}",
                   "    blocks: [mid_block]\n    timesteps: [10]\n    conditioning: class\n")
    with pytest.raises(ConfigError, match=r"resize' is 'admm' \(did you mean 'adm'\?\); valid: direct, adm, torchvision"):
        load_workflow(wf, STAGES)


def _recording(monkeypatch, module, name: str = "load_images") -> list[dict[int, np.ndarray]]:
    """Wrap the stage module's ``load_images`` (or ``DecodeAhead``): the arrays the stage actually fed the model."""
    seen = []
    original = getattr(module, name)

    def load_images(*args, **kwargs):
        arrays, failures = original(*args, **kwargs)
        seen.append(arrays)
        return arrays, failures

    class DecodeAhead(original if isinstance(original, type) else object):
        def __iter__(self):
            for arrays, failures in super().__iter__():
                seen.append(arrays)
                yield arrays, failures

    monkeypatch.setattr(module, name, DecodeAhead if isinstance(original, type) else load_images)
    return seen


def test_extract_reads_pixels_by_the_recipe_records_it_and_hashes_it(tmp_path, monkeypatch):
    import stages.extract

    data = _folder(tmp_path / "imgs")
    extra = "    blocks: [mid_block]\n    timesteps: [10]\n    conditioning: class\n    batch_size: 4\n"
    wf = _workflow(tmp_path / "w", "extract", f"{{reader: imagefolder, root: {data}, split: all, resize: adm}}", extra)
    seen = _recording(monkeypatch, stages.extract, "DecodeAhead")
    Runner(load_workflow(wf, STAGES), progress=False).run()
    arrays = {k: v for unit in seen for k, v in unit.items()}
    assert sorted(arrays) == [0, 1, 2, 3]
    for index, image_id in enumerate(["a/0.png", "a/1.png", "b/0.png", "b/1.png"]):
        with Image.open(data / image_id) as img:
            np.testing.assert_array_equal(arrays[index], adm_scaling(reference_adm(img, 16, mode="L")))

    out = wf.parent / "out" / "s.zarr"
    recorded = store.read_attrs(out)["provenance"]["preprocessing"]
    assert recorded["resize"] == "adm" and recorded["size"] == 16 and recorded["channels"] == 1
    assert "center_crop_arr" in recorded["recipe"]["reference"] and "w // 2" in recorded["recipe"]["halve"]
    assert zarr.open_group(str(out), mode="r")["done"][:].tolist() == [1, 1, 1, 1]
    # the recipe is part of the stage's identity: another one is a different output
    wf.write_text(wf.read_text().replace("resize: adm", "resize: direct"))
    with pytest.raises(StoreError, match="--force"):
        Runner(load_workflow(wf, STAGES), progress=False).run()


def test_classify_reads_pixels_by_the_recipe(tmp_path, monkeypatch):
    import stages.classify

    data = _folder(tmp_path / "imgs")
    wf = _workflow(tmp_path / "w", "classify", f"{{reader: imagefolder, root: {data}, split: all, resize: torchvision}}",
                   "    n_timesteps: 2\n    class_labels: [0, 1]\n")
    seen = _recording(monkeypatch, stages.classify)
    Runner(load_workflow(wf, STAGES), progress=False).run()
    arrays = {k: v for unit in seen for k, v in unit.items()}
    with Image.open(data / "a/1.png") as img:
        np.testing.assert_array_equal(arrays[1], torchvision_scaling(reference_torchvision(img, 16, mode="L")))
    recorded = store.read_attrs(wf.parent / "out" / "s.zarr")["provenance"]["preprocessing"]
    assert recorded["resize"] == "torchvision" and "int(size * long / short)" in recorded["recipe"]["resize"]


# -- the shipped templates use the paper's recipe -----------------------------------------


def _expected_style(model: dict) -> str | None:
    if "guided_diffusion" in str(model.get("factory", "")) or model.get("kind") == "dit":
        return "adm"  # guided-diffusion's loader; DiT's evaluation reuses its center_crop_arr
    if model.get("kind") == "sd":
        return "torchvision"
    return None


@pytest.mark.parametrize("path", sorted((ROOT / "workflows").glob("*.yaml")), ids=lambda p: p.stem)
def test_templates_use_the_matching_recipe(path):
    doc = yaml.safe_load(path.read_text())
    for stage in doc["stages"]:
        if "dataset" in stage and (style := _expected_style(stage.get("model", {}))):
            assert stage["dataset"].get("resize") == style, f"{path.name}: stage {stage['name']}"
