"""The report's headline numbers, computed from the stage outputs (numpy + xarray only).

Model selection never looks at the test split: a probe's best cell is the argmax of
*validation* accuracy over (block, timestep, pool, head), and its test accuracy is
reported with a Wilson score interval over the test images. Validation ties go to
the first cell in grid order (earlier block, smaller timestep, smaller pool, the
head listed first), and the number of tied cells is reported with it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np

from pipeline.errors import StoreError


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / n``, as fractions.

    ``(nan, nan)`` for ``n == 0``. Unlike the normal approximation it stays inside
    [0, 1] and is not degenerate at 0 or ``n`` successes (a probe at 100 %).
    """
    if n <= 0:
        return float("nan"), float("nan")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Cell:
    """One probe-grid cell: where it is and how it scored (fractions in [0, 1])."""

    block: str
    timestep: int
    pool: int
    head: str
    head_kind: str
    val_accuracy: float
    accuracy: float
    n_test: int

    @property
    def correct(self) -> int:
        """Test images classified correctly (accuracy is ``correct / n_test`` exactly)."""
        return round(self.accuracy * self.n_test)

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n_test, confidence)

    def where(self) -> str:
        return f"{self.block}, t={self.timestep}, pool {self.pool}x{self.pool}, {self.head} head"


@dataclass(frozen=True)
class ProbeFinding:
    """A probe stage's best cell on validation, and how many cells tied with it."""

    name: str
    path: Path
    best: Cell
    n_tied: int
    n_cells: int


def open_probe(path: str | Path):
    from pipeline.probing.results import open_results

    ds = open_results(path)
    for var in ("val_accuracy", "n_test"):
        if var not in ds:
            raise StoreError(f"{path} has no {var!r} (written by an older diffprobe); re-run that probe "
                             "stage with --force")
    return ds


def cell_at(ds, block: str, timestep: int, pool: int, head: str) -> Cell:
    """The cell at these coordinates (NaN accuracies where it is not in the grid)."""
    sel = {"block": block, "timestep": timestep, "pool": pool, "head": head}
    n_test = float(ds["n_test"].sel(sel))
    return Cell(str(block), int(timestep), int(pool), str(head), str(ds["head_kind"].sel(head=head).item()),
                float(ds["val_accuracy"].sel(sel)), float(ds["accuracy"].sel(sel)),
                int(n_test) if np.isfinite(n_test) else 0)


def best_by_validation(ds, **fixed) -> tuple[Cell, int]:
    """The cell with the best validation accuracy, and how many cells share that accuracy.

    ``fixed`` restricts the search, e.g. ``head="mlp"`` or ``block=..., timestep=...``.
    Ties go to the first cell in grid order (``np.argmax`` over C order of
    ``(block, timestep, pool, head)``).
    """
    sub = ds.sel({k: [v] for k, v in fixed.items()})
    val = sub["val_accuracy"].transpose("block", "timestep", "pool", "head").values
    usable = np.isfinite(val) & np.isfinite(sub["accuracy"].transpose("block", "timestep", "pool", "head").values)
    if not usable.any():
        raise StoreError("no probe cell has a validation accuracy (val_fraction: 0?); the report picks the "
                         "best cell on validation, never on test: set val_fraction > 0 and re-run the probe")
    scores = np.where(usable, val, -np.inf)
    flat = int(np.argmax(scores))
    b, t, p, h = np.unravel_index(flat, scores.shape)
    n_tied = int((scores == scores.flat[flat]).sum())
    cell = cell_at(ds, sub["block"].values[b], sub["timestep"].values[t], sub["pool"].values[p],
                   sub["head"].values[h])
    return cell, n_tied


def probe_finding(name: str, path: Path) -> ProbeFinding:
    ds = open_probe(path)
    best, n_tied = best_by_validation(ds)
    return ProbeFinding(name, path, best, n_tied, int(np.isfinite(ds["accuracy"].values).sum()))


# ----------------------------------------------------------------- Diffusion Classifier


@dataclass(frozen=True)
class CostPoint:
    """Accuracy of the classifier re-scored on some trials, and what those trials cost per image."""

    label: str
    passes_per_image: float
    accuracy: float
    n_trials: int


@dataclass(frozen=True)
class ClassifierFinding:
    name: str
    path: Path
    accuracy: float
    correct: int
    n_images: int
    n_failed: int
    passes_per_image: float  # what the run spent, mean over scored images
    exhaustive_per_image: int  # every candidate on every trial
    schedule: dict
    n_classes: int
    n_candidates: int  # conditionings scored: one per class, or several prompts per class
    n_trials: int  # (timestep, noise draw) pairs in the schedule's rounds
    loss: str
    confusion: np.ndarray
    class_names: list[str]
    curve: list[CostPoint] = field(default_factory=list)

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n_images, confidence)


def _spread(items: list[int], k: int) -> list[int]:
    """``k`` of ``items`` evenly spread over it (first and last included when k >= 2)."""
    return sorted({items[round(i)] for i in np.linspace(0, len(items) - 1, k)})


def classifier_finding(name: str, path: Path) -> ClassifierFinding:
    """Score a classify store from its errors, plus an accuracy-vs-cost curve.

    The curve re-scores the first elimination round's trials (every candidate was
    evaluated on them, so subsets of them are honest exhaustive classifiers with
    fewer trials) and ends with the run as it was (all trials, adaptive cost).
    """
    from pipeline import store
    from pipeline.dc import rescore

    run = rescore.score_store(path)
    attrs = store.read_attrs(path)
    root = store.open_root(path)
    schedule = attrs.get("schedule", {})
    n_candidates = len(root["candidate_class"][:])
    rounds = schedule.get("round_trials") or [list(range(len(root["timestep"][:])))]
    used = sorted({int(i) for r in rounds for i in r})  # a trial in no round is never evaluated
    first = [int(i) for i in rounds[0]]
    curve = []
    for k in sorted({1, 2, 3, 5, 10, len(first) // 2, len(first)}):
        if 1 <= k <= len(first) and (k < len(first) or len(rounds) > 1):
            part = rescore.score_store(path, trials=_spread(first, k))
            curve.append(CostPoint(f"{len(part['trials'])} trial(s), every candidate",
                                   part["forward_passes_per_sample"], part["accuracy"], len(part["trials"])))
    spent = run["forward_passes_spent"] / max(run["n_samples"], 1)
    kind = schedule.get("kind", "exhaustive")
    curve.append(CostPoint(f"the run: {len(used)} trials, {kind}", spent, run["accuracy"], len(used)))
    curve = list({(p.n_trials, round(p.passes_per_image, 6)): p for p in curve}.values())
    return ClassifierFinding(
        name, path, run["accuracy"], int(np.trace(run["confusion"])), run["n_samples"], run["n_failed"],
        spent, n_candidates * len(used), schedule, len(run["class_names"]), n_candidates, len(used), run["loss"],
        np.asarray(run["confusion"]), run["class_names"], curve,
    )


# ----------------------------------------------------------------- CKA


@dataclass(frozen=True)
class CKAFinding:
    """A CKA stage's matrix and its structure in one sentence.

    ``template`` holds ``{key}`` fields for the ``numbers`` it rests on (CKA values),
    so the page can link each number; ``sentence`` is the plain text.
    """

    name: str
    path: Path
    mode: str
    matrix: object  # the cka (row, col) DataArray
    template: str
    numbers: dict[str, float]
    estimator: str = "linear"

    @property
    def sentence(self) -> str:
        return fill(self.template, {k: f"{v:.2f}" for k, v in self.numbers.items()})


#: CKA means closer than this are reported as "about equal".
SIMILAR = 0.02


def fill(template: str, values: dict[str, str]) -> str:
    """Replace the ``{key}`` fields of a template (literal text elsewhere, braces included)."""
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), template)


def _mean(values: np.ndarray, mask: np.ndarray) -> float:
    picked = values[mask & np.isfinite(values)]
    return float(picked.mean()) if picked.size else float("nan")


def cka_finding(name: str, path: Path) -> CKAFinding:
    """The CKA matrix and its structure in one sentence.

    ``within``: mean CKA between timesteps of one block vs between blocks at one
    timestep. ``across``: the mean over entries matching in block and timestep (a
    model against its twin), else the most similar (row, column) pair.
    """
    from pipeline.cka.results import open_cka
    from pipeline.store import read_attrs

    da = open_cka(path)
    config = read_attrs(path).get("config") or {}
    mode, estimator = config.get("mode", "within"), config.get("estimator", "linear")
    values = da.values
    rb, cb = da["row_block"].values[:, None], da["col_block"].values[None, :]
    rt, ct = da["row_timestep"].values[:, None], da["col_timestep"].values[None, :]
    rs, cs = da["row_stage"].values[:, None], da["col_stage"].values[None, :]
    if mode == "within":
        off_diagonal = ~np.eye(*values.shape, dtype=bool)
        same_block = _mean(values, off_diagonal & (rs == cs) & (rb == cb) & (rt != ct))
        same_t = _mean(values, off_diagonal & (rs == cs) & (rb != cb) & (rt == ct))
        if np.isfinite(same_block) and np.isfinite(same_t):
            if abs(same_block - same_t) < SIMILAR:
                verdict = "block and timestep shape the representation about equally"
            elif same_block > same_t:
                verdict = "the block shapes the representation more than the timestep does"
            else:
                verdict = "the timestep shapes the representation more than the block does"
            template = ("Between timesteps of one block CKA averages {same_block}, between blocks at one timestep "
                        f"{{same_timestep}}: {verdict}.")
            return CKAFinding(name, path, mode, da, template,
                              {"same_block": same_block, "same_timestep": same_t}, estimator)
        return CKAFinding(name, path, mode, da, "CKA between different slices averages {off_diagonal}.",
                          {"off_diagonal": _mean(values, off_diagonal)}, estimator)
    matched = (rb == cb) & (rt == ct) & (rs != cs)
    if matched.any():
        template = (f"At the same block and timestep, {da['row_stage'].values[0]} and {da['col_stage'].values[0]} "
                    "have a mean CKA of {matched}.")
        return CKAFinding(name, path, mode, da, template, {"matched": _mean(values, matched)}, estimator)
    i, j = np.unravel_index(int(np.argmax(np.where(np.isfinite(values), values, -np.inf))), values.shape)
    template = f"The most similar pair is {da['row'].values[i]} and {da['col'].values[j]} (CKA {{best}})."
    return CKAFinding(name, path, mode, da, template, {"best": float(values[i, j])}, estimator)
