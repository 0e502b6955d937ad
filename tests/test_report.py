"""The report: every headline number against an independent recomputation from the stores,
and the page as a real browser renders it (desktop and phone width).

One small workflow (the shipped digits model, its random-init twin and the raw pixels,
pooled and probed; CKA; an adaptive Diffusion Classifier; the report) runs once per module.
"""

from __future__ import annotations

import json
import math
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from pipeline.errors import ConfigError
from pipeline.workflow.config import load_workflow
from pipeline.workflow.runner import Runner
from stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
DIGITS_MODEL = ROOT / "data" / "models" / "digits-ddpm"
PIXELS = ROOT / "data" / "factories" / "pixels.py"
NOTES = Path("/work/notes")
# The module's workflow runs in the first test's setup: about a minute on a quiet laptop.
pytestmark = pytest.mark.timeout(900)

HEADS = """
    heads:
      - {name: linear, head: {kind: linear}, train: {optimizer: sgd, lr: 0.05, momentum: 0.9, schedule: step, step_size: 3}}
      - {name: mlp, head: {kind: mlp, hidden: 32}}
    train: {optimizer: adamw, lr: 0.003, schedule: cosine, epochs: 4}
    test_fraction: 0.25"""


def _extract(name: str, model: str, blocks: str, timesteps: str) -> str:
    return f"""
  - name: {name}
    stage: extract
    model: {model}
    dataset: {{reader: digits, split: all, limit: 240}}
    blocks: {blocks}
    timesteps: {timesteps}
    batch_size: 120"""


def workflow_text(address: str) -> str:
    digits = f"{{path: {DIGITS_MODEL}, null_class: 10"
    return (
        f'name: reporttest\noutput_dir: out\ncluster: {{kind: address, address: "{address}", dashboard: false}}\n'
        "stages:"
        + _extract("trained", digits + "}", "[down_blocks.1, mid_block]", "[10, 100]") + "\n    conditioning: null"
        + _extract("random", digits + ", random_init: true, seed: 0}", "[down_blocks.1, mid_block]", "[10, 100]")
        + "\n    conditioning: null"
        + _extract("pixels", f"{{kind: factory, factory: {PIXELS}:pixels, options: {{image_size: 16, in_channels: 1, "
                             "timestep_free: true}}", "[image]", "[0]")
        + """
  - {name: trained_pooled, stage: pool, input: trained, sizes: [1, 4]}
  - {name: random_pooled, stage: pool, input: random, sizes: [1, 4]}
  - {name: pixels_pooled, stage: pool, input: pixels, sizes: [1, 4, 16]}
  - name: trained_probe
    stage: probe
    input: trained_pooled""" + HEADS + """
  - name: random_probe
    stage: probe
    input: random_pooled""" + HEADS + """
  - name: pixels_probe
    stage: probe
    input: pixels_pooled""" + HEADS + """
  - {name: cka_trained, stage: cka, selections: [{input: trained}]}
  - {name: cka_twins, stage: cka, mode: across, rows: [{input: trained}], cols: [{input: random}]}
  - name: classify
    stage: classify
""" + f"    model: {digits}}}" + """
    dataset: {reader: digits, split: test, limit: 40}
    schedule: {timesteps_per_round: [4, 8], keep_per_round: [3, 1]}   # a grid of 8 timesteps
  - name: report
    stage: report
    title: report test
    probe: trained_probe
    control: random_probe
    baseline: pixels_probe
    inputs: [trained, random, pixels, trained_probe, random_probe, pixels_probe, cka_trained, cka_twins, classify]
""")


@pytest.fixture(scope="module")
def run(tmp_path_factory, cluster_address):
    folder = tmp_path_factory.mktemp("report")
    (folder / "wf.yaml").write_text(workflow_text(cluster_address))
    workflow = load_workflow(folder / "wf.yaml", STAGES)
    Runner(workflow, progress=False).run()
    return workflow


def out(workflow, name: str) -> Path:
    return workflow.stage(name).output


class Numbers(HTMLParser):
    """``data-key -> (text, data-value)`` of every headline number, plus section ids."""

    def __init__(self):
        super().__init__()
        self.numbers: dict[str, tuple[str, str, str]] = {}
        self.ids: set[str] = set()
        self._open: tuple[str, str, str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "a" and "num" in (attrs.get("class") or "").split():
            self._open = (attrs["data-key"], attrs["data-value"], attrs["href"])

    def handle_data(self, data):
        if self._open:
            key, value, href = self._open
            self.numbers[key] = (data, value, href)
            self._open = None


def parse(page_html: str) -> Numbers:
    parser = Numbers()
    parser.feed(page_html)
    return parser


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval, written out from its textbook formula."""
    p = k / n
    centre = (k + z**2 / 2) / (n + z**2)
    half = z / (n + z**2) * math.sqrt(n * p * (1 - p) + z**2 / 4)
    return centre - half, centre + half


def pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}\u00a0%"  # a no-break space: the number never wraps from its unit


def best_on_validation(path: Path) -> dict:
    """Argmax of val_accuracy over the stacked grid, first in (block, timestep, pool, head) order."""
    ds = xr.open_zarr(path).load()
    stacked = ds[["val_accuracy", "accuracy", "n_test"]].stack(cell=("block", "timestep", "pool", "head"))
    val = stacked["val_accuracy"].values
    val = np.where(np.isfinite(val) & np.isfinite(stacked["accuracy"].values), val, -1.0)
    i = int(np.flatnonzero(val == val.max())[0])
    block, timestep, pool, head = stacked["cell"].values[i]
    return {"block": block, "timestep": int(timestep), "pool": int(pool), "head": head, "val": val[i],
            "test": float(stacked["accuracy"].values[i]), "n_test": int(stacked["n_test"].values[i]), "ds": ds}


def _val_grid(ds) -> np.ndarray:
    val = ds["val_accuracy"].values
    return np.where(np.isfinite(val) & np.isfinite(ds["accuracy"].values), val, -1.0)


def test_headline_numbers_equal_values_recomputed_from_the_stores(run):
    page = (out(run, "report") / "index.html").read_text()
    found = parse(page)
    nums = {k: (text, float(value), href) for k, (text, value, href) in found.numbers.items()}

    # best cell: validation argmax, its test accuracy and a Wilson interval on the test images
    best = best_on_validation(out(run, "trained_probe"))
    n_images = len(zarr.open_group(str(out(run, "trained")), mode="r")["image_id"][:])
    assert best["n_test"] == round(0.25 * n_images)  # every image is one sample (views: 1)
    assert f"{best['block']}, t={best['timestep']}, pool {best['pool']}x{best['pool']}, {best['head']} head" in page
    k = round(best["test"] * best["n_test"])
    assert k == pytest.approx(best["test"] * best["n_test"], abs=1e-6)
    low, high = wilson(k, best["n_test"])
    for key, expected in (("best.val", best["val"]), ("best.test", best["test"]), ("best.ci.low", low),
                          ("best.ci.high", high)):
        text, value, href = nums[key]
        assert value == pytest.approx(expected, abs=1e-9), key
        assert text == pct(expected), key
        assert href == "#probe-trained_probe"
    n_tied = int((_val_grid(best["ds"]) == best["val"]).sum())
    assert ("tie on validation" in page) == (n_tied > 1)

    # control and baseline: their own validation argmax; the control also at the trained cell
    for role, stage in (("control", "random_probe"), ("baseline", "pixels_probe")):
        other = best_on_validation(out(run, stage))
        assert nums[f"{role}.test"][1] == pytest.approx(other["test"], abs=1e-9)
        assert nums[f"{role}.delta"][1] == pytest.approx(best["test"] - other["test"], abs=1e-9)
        assert nums[f"{role}.delta"][0] == f"{100 * (best['test'] - other['test']):+.1f} points"
        assert nums[f"{role}.test"][2] == f"#probe-{stage}"
    control = best_on_validation(out(run, "random_probe"))["ds"]
    same = float(control["accuracy"].sel(block=best["block"], timestep=best["timestep"], pool=best["pool"],
                                         head=best["head"]))
    assert nums["control.same_cell"][1] == pytest.approx(same, abs=1e-9)

    # the classifier, from the error tensor with numpy: candidates that reached the last round
    # (most finite trials) compete on their mean error; a candidate stands for its class
    root = zarr.open_group(str(out(run, "classify")), mode="r")
    errors, labels, done = root["error_l2"][:], root["label"][:], root["done"][:]
    ok = done == 1
    coverage = np.isfinite(errors).sum(axis=2)
    means = np.where(coverage == coverage.max(axis=1, keepdims=True), np.nanmean(errors, axis=2), np.inf)
    predicted = root["candidate_class"][:][means.argmin(axis=1)]
    accuracy = float((predicted[ok] == labels[ok]).mean())
    assert accuracy == float((root["prediction"][:][ok] == labels[ok]).mean())
    assert nums["classify.accuracy"][1] == pytest.approx(accuracy, abs=1e-12)
    assert nums["classify.accuracy"][0] == pct(accuracy)
    assert nums["classify.n_images"][1] == ok.sum()
    low, high = wilson(int((predicted[ok] == labels[ok]).sum()), int(ok.sum()))
    assert (nums["classify.ci.low"][1], nums["classify.ci.high"][1]) == pytest.approx((low, high), abs=1e-12)
    passes = root["forward_passes"][:][ok].mean()
    assert passes == np.isfinite(errors[ok]).sum() / ok.sum()  # one pass per evaluated cell
    assert nums["classify.passes_per_image"][1] == pytest.approx(passes)
    exhaustive = errors.shape[1] * int(np.isfinite(errors).any(axis=(0, 1)).sum())  # candidates x trials run
    assert exhaustive == 10 * 8
    assert nums["classify.exhaustive_per_image"][1] == exhaustive
    assert nums["classify.saving"][1] == pytest.approx(1 - passes / exhaustive)

    # CKA within the trained model: same block across timesteps vs same timestep across blocks
    cka = xr.open_zarr(out(run, "cka_trained"))["cka"].load()
    rb, rt = cka["row_block"].values, cka["row_timestep"].values
    pairs = [(i, j) for i in range(len(rb)) for j in range(len(rb)) if i != j]
    same_block = np.mean([cka.values[i, j] for i, j in pairs if rb[i] == rb[j] and rt[i] != rt[j]])
    same_t = np.mean([cka.values[i, j] for i, j in pairs if rb[i] != rb[j] and rt[i] == rt[j]])
    assert nums["cka.cka_trained.same_block"][1] == pytest.approx(same_block, abs=1e-12)
    assert nums["cka.cka_trained.same_timestep"][1] == pytest.approx(same_t, abs=1e-12)

    # every number links to a section that exists
    for key, (_, _, href) in nums.items():
        assert href[1:] in found.ids, key
    assert {"findings", "probes", "cka", "classify-classify", "provenance"} <= found.ids


def test_page_is_self_contained_and_says_percentages(run):
    page = (out(run, "report") / "index.html").read_text()
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert "<script" not in page
    assert 'src="data:image/svg+xml;base64,' in page and 'src="http' not in page
    assert sorted(p.name for p in out(run, "report").iterdir()) == ["findings.json", "index.html", "zarr.json"]
    # tables hold percentages, never raw fractions like 0.9972
    import re

    cells = re.findall(r"<td[^>]*>([^<]*)</td>", page)
    assert not [c for c in cells if re.fullmatch(r"0\.\d{3,}", c.strip())]
    provenance = page[page.index('id="provenance"'):]
    for name in ("torch", "diffusers", "zarr", "dask", "xarray", "numpy", "git commit", "host", "device(s)"):
        assert f"<td class=text>{name}</td>" in provenance, name
    for stage in ("trained", "pixels_probe", "classify"):
        assert f'id="stage-{stage}"' in provenance
    attrs = json.loads((out(run, "trained") / "zarr.json").read_text())["attributes"]["diffprobe"]
    assert attrs["wall_time_s"] > 0  # stamped by the runner, shown in the cost table
    assert f"{attrs['wall_time_s']:.1f} s" in provenance


def test_report_roles_must_be_probe_stages(run, tmp_path):
    text = (run.file.read_text().replace("control: random_probe", "control: cka_trained")
            .replace("output_dir: out", f"output_dir: {run.output_dir}")
            .replace("    stage: report\n", f"    stage: report\n    output: {tmp_path / 'report'}\n"))
    (tmp_path / "wf.yaml").write_text(text)
    workflow = load_workflow(tmp_path / "wf.yaml", STAGES)
    with pytest.raises(ConfigError, match="control 'cka_trained' is a cka stage; give a probe stage"):
        Runner(workflow, progress=False).run(only="report")


# ----------------------------------------------------------------- in a real browser

MEASURE = """() => {
  const nums = {};
  for (const a of document.querySelectorAll('a.num')) nums[a.dataset.key] = a.innerText;
  const images = [...document.querySelectorAll('img')];
  return {
    width: window.innerWidth,
    scrollWidth: document.documentElement.scrollWidth,
    sections: [...document.querySelectorAll('section')].map(s => s.id),
    headings: [...document.querySelectorAll('h2')].map(h => h.innerText),
    nums: nums,
    findingsTop: document.getElementById('findings').getBoundingClientRect().top,
    images: images.length,
    brokenImages: images.filter(i => !(i.complete && i.naturalWidth > 0)).length,
    imagesWiderThanPage: images.filter(i => i.getBoundingClientRect().right > window.innerWidth + 1).length,
    provenanceOpen: document.querySelector('#provenance details').open,
  };
}"""


@pytest.mark.parametrize("width", [1280, 390], ids=["desktop", "phone"])
def test_report_renders_in_chromium(run, chromium, width, tmp_path):
    """Read from the rendered DOM (after layout), not the HTML source; keep full-page screenshots."""
    page_path = out(run, "report") / "index.html"
    expected = json.loads((out(run, "report") / "findings.json").read_text())
    shot = tmp_path / f"report-{width}.png"
    with chromium.page(width, 900) as tab:
        tab.goto(page_path.as_uri(), wait_until="load")
        seen = tab.evaluate(MEASURE)
        tab.screenshot(path=str(shot), full_page=True)
    assert seen["width"] == width
    assert seen["scrollWidth"] <= width, "the page scrolls sideways"
    assert seen["imagesWiderThanPage"] == 0 and seen["brokenImages"] == 0 and seen["images"] >= 5
    assert seen["sections"][:2] == ["findings", "probes"] and "provenance" in seen["sections"]
    assert "classify-classify" in seen["sections"] and "cka" in seen["sections"]
    assert seen["findingsTop"] < 400  # the findings open the page
    assert not seen["provenanceOpen"]  # provenance is collapsed
    best = expected["probes"]["trained_probe"]["best"]
    assert seen["nums"]["best.test"] == pct(best["accuracy"])
    assert seen["nums"]["best.val"] == pct(best["val_accuracy"])
    assert seen["nums"]["classify.accuracy"] == pct(expected["classify"]["classify"]["accuracy"])
    assert seen["nums"]["baseline.test"] == pct(expected["probes"]["pixels_probe"]["best"]["accuracy"])
    assert shot.stat().st_size > 10_000
    if NOTES.is_dir():  # for a person to look at
        shutil.copyfile(shot, NOTES / f"report-test-{width}.png")


def test_legend_names_line_styles_only_beside_a_control_or_baseline():
    from pipeline.report.markup import legend

    labels = {"trained": "probe", "control": "random-init control", "baseline": "pixels"}
    alone = legend(["down", "mid"], labels, control=False, baseline=False)
    assert alone.count("<span>") == 2 and "probe" not in alone  # the block colours only
    with_control = legend(["down", "mid"], labels, control=True, baseline=False)
    assert "<i></i>probe" in with_control and "<i class=dashed></i>random-init control" in with_control
    with_baseline = legend(["down"], labels, control=False, baseline=True)
    assert "<i></i>probe" in with_baseline and "<i class=dotted></i>pixels" in with_baseline
