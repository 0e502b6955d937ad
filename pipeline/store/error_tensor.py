"""The Diffusion Classifier's error store: schema, unit writes, and scoring from it.

A classify store holds, per loss, the denoising error of every (sample, candidate,
trial) cell, NaN where adaptive elimination never evaluated the candidate at that
trial. A candidate is one conditioning: a class label, or one prompt (a prompt set may
give a class several); a trial is one (timestep, noise draw) pair::

    error_l2, error_l1, error_huber   (sample, candidate, trial) float32
    prediction                        (sample,) int64, the run's predicted class (-1: failed image)
    forward_passes                    (sample,) int64, denoiser forwards spent on the sample
    done, failure                     (sample,) as in every diffprobe store (one chunk per unit)
    coords: sample, image_id, label (sample); candidate, candidate_class, candidate_prompt
            (candidate); class, class_name (class); trial, timestep, draw (trial)

The trial plan (``TrialPlan.to_dict()``: grid, noise draws, seed, eps scheme), the
schedule, every class's prompts and the provenance are in the root attrs under
``diffprobe``. It is written by the
one write protocol of ``pipeline/store/layout.py`` (whose ``unit_status`` and ``finalize``
it reuses): schema created once, atomically; each unit's cells written whole, by one
writer, into its own shards; then its ``done`` cells; ``finalize`` once at the end.

Everything below the writing part is numpy + zarr only: ``diffprobe score`` re-scores
a store (other trials, losses, weightings) without importing torch or loading a model.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import pipeline
from pipeline.store import layout as store
from pipeline.store.checks import Integrity
from pipeline.store.location import as_location
from pipeline.dc import scoring
from pipeline.errors import ConfigError, StoreError, did_you_mean

LOSSES = ("l2", "l1", "huber")
DIMS = ("sample", "candidate", "trial")
COORDINATES = "image_id label candidate_class candidate_prompt class_name timestep draw"


def error_array(loss: str) -> str:
    """Name of the array holding ``loss`` errors."""
    return f"error_{loss}"


@dataclass(frozen=True)
class ErrorLayout(store.UnitRanges):
    """Shapes and units of a classify store; what its writers agree on.

    A unit is ``unit_samples`` consecutive samples: one shard of every error array,
    one chunk of ``done``; inner chunks hold ``chunk_samples`` samples.
    """

    n_samples: int
    n_candidates: int
    n_trials: int
    unit_samples: int
    chunk_samples: int


def plan_error_layout(n_samples: int, n_candidates: int, n_trials: int, unit_samples: int | None = None,
                      unit_bytes: int = 64 << 20, chunk_bytes: int = 4 << 20, max_unit_samples: int = 64
                      ) -> ErrorLayout:
    """Units of a power of two samples, at most ``max_unit_samples`` and ~``unit_bytes``
    of float64 host buffers (3 losses); chunks of ~``chunk_bytes`` float32 that divide the unit.

    The unit is also the batch over which a stage's requests are pooled to fill the
    device, so it stays large for small (candidate x trial) grids and shrinks for ImageNet-size ones.
    """
    if n_samples < 1:
        raise StoreError("the dataset selection has no samples to classify")
    cell = n_candidates * n_trials
    if unit_samples is None:
        unit = min(store.pow2_floor(unit_bytes / (cell * 8 * len(LOSSES))), max_unit_samples,
                   1 << math.ceil(math.log2(n_samples)))
    elif unit_samples < 1:
        raise ConfigError(f"unit_samples must be >= 1, got {unit_samples}")
    else:
        unit = unit_samples
    chunk = math.gcd(min(store.pow2_floor(chunk_bytes / (cell * 4)), unit), unit)
    return ErrorLayout(n_samples, n_candidates, n_trials, unit, chunk)


# ----------------------------------------------------------------- writing


def create_error_store(path: str | Path, layout: ErrorLayout, image_ids: Sequence[str], labels: Sequence[int],
                       class_names: Sequence[str], candidate_class: Sequence[int],
                       candidate_prompt: Sequence[str], trial_timesteps: Sequence[int],
                       trial_draws: Sequence[int], attrs: Mapping,
                       compression: store.Compression = store.Compression(cname="zstd")) -> None:
    """Write the whole schema (arrays, coords, attrs) atomically; error arrays stay NaN.

    candidate_class, candidate_prompt : (n_candidates,) each candidate's class and prompt
        (``""`` for a class label). trial_timesteps, trial_draws : (n_trials,).
    Built in a temporary folder and renamed into place; a losing racer keeps the
    winner's store (the caller compares the stage hash). Compressed by default, unlike
    activations: eliminated classes leave most of an adaptive run's errors NaN.
    """
    n, k, t = layout.n_samples, layout.n_candidates, layout.n_trials
    if not (len(image_ids) == len(labels) == n and len(candidate_class) == len(candidate_prompt) == k
            and len(trial_timesteps) == len(trial_draws) == t):
        raise ValueError("image_ids/labels, candidates and trials must match the layout")
    with store.new_group(path) as root:
        compressors, _ = store.codecs_for(compression)
        store.write_1d(root, "sample", np.arange(n, dtype=np.int64), "sample")
        store.write_1d(root, "image_id", list(image_ids), "sample", dtype=str)
        store.write_1d(root, "label", np.asarray(labels, dtype=np.int64), "sample")
        store.write_1d(root, "candidate", np.arange(k, dtype=np.int64), "candidate")
        store.write_1d(root, "candidate_class", np.asarray(candidate_class, dtype=np.int64), "candidate")
        store.write_1d(root, "candidate_prompt", list(candidate_prompt), "candidate", dtype=str)
        store.write_1d(root, "class", np.arange(len(class_names), dtype=np.int64), "class")
        store.write_1d(root, "class_name", list(class_names), "class", dtype=str)
        store.write_1d(root, "trial", np.arange(t, dtype=np.int64), "trial")
        store.write_1d(root, "timestep", np.asarray(trial_timesteps, dtype=np.int64), "trial")
        store.write_1d(root, "draw", np.asarray(trial_draws, dtype=np.int64), "trial")
        for loss in LOSSES:
            root.create_array(
                error_array(loss), shape=(n, k, t), dtype="float32",
                chunks=(layout.chunk_samples, k, t), shards=(layout.unit_samples, k, t),
                compressors=compressors, fill_value=float("nan"), dimension_names=DIMS,
                attributes={"coordinates": COORDINATES, "loss": loss,
                            "long_name": f"{loss} denoising error, NaN where not evaluated"},
            )
        per_unit = {"chunks": (layout.unit_samples,), "dimension_names": ("sample",)}
        root.create_array("prediction", shape=(n,), dtype="int64", fill_value=-1, **per_unit,
                          attributes={"coordinates": "image_id label"})
        root.create_array("forward_passes", shape=(n,), dtype="int64", fill_value=0, **per_unit,
                          attributes={"coordinates": "image_id label"})
        store.create_status_arrays(root, n, layout.unit_samples)
        meta = dict(attrs)
        meta.update({
            "format_version": pipeline.FORMAT_VERSION,
            "diffprobe_version": pipeline.__version__,
            "layout": {"n_samples": n, "n_candidates": k, "n_trials": t, "unit_samples": layout.unit_samples,
                       "n_units": layout.n_units, "chunk_samples": layout.chunk_samples},
            "complete": False,
        })
        root.attrs.update({store.ATTR_KEY: store.jsonable(meta), "coordinates": COORDINATES})


@dataclass
class UnitResult:
    """One unit's cells, in unit order.

    errors : loss -> (U, K, T) float32, NaN where not evaluated.
    prediction, forward_passes : (U,) int64.
    failed : position within the unit -> why its image could not be read.
    """

    errors: dict[str, np.ndarray]
    prediction: np.ndarray
    forward_passes: np.ndarray
    failed: dict[int, str]


def write_error_unit(root, layout: ErrorLayout, unit: int, result: UnitResult) -> None:
    """Write one unit as whole shards, then its ``done`` cells (the one write protocol)."""
    start, stop = layout.unit_range(unit)
    expected = (stop - start, layout.n_candidates, layout.n_trials)
    for loss in LOSSES:
        values = result.errors[loss]
        if values.shape != expected:
            raise StoreError(f"unit {unit} {error_array(loss)}: shape {values.shape} != {expected}")
        root[error_array(loss)][start:stop] = values.astype(np.float32)
    root["prediction"][start:stop] = result.prediction
    root["forward_passes"][start:stop] = result.forward_passes
    written = [root[error_array(loss)] for loss in LOSSES] + [root["prediction"], root["forward_passes"]]
    store.mark_done(root, start, stop, result.failed, written)


# ----------------------------------------------------------------- reading and scoring


def open_error_store(path: str | Path):
    """The zarr root of a classify store; StoreError if it is not one."""
    path = as_location(path)
    if not path.exists():
        raise StoreError(f"store {str(path)!r} does not exist")
    attrs = store.read_attrs(path)
    if attrs is None or attrs.get("stage") != "classify" or "plan" not in attrs:
        what = "not a diffprobe store" if attrs is None else f"a {attrs.get('stage')!r} store"
        raise StoreError(f"{str(path)!r} is {what}, not a classify store; "
                         "give the output of a classify stage")
    root = store.open_root(path)
    if "candidate_class" not in root:
        raise StoreError(f"{str(path)!r} was written by an older diffprobe (no candidate axis); "
                         "re-run its classify stage with --force")
    return root


def parse_trials(text: str, n_trials: int) -> list[int]:
    """``"0:10"``, ``"0:20:2"``, ``"3,7,9"`` or a mix (``"0:5,12"``) -> sorted distinct trial indices."""
    picked: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if not re.fullmatch(r"-?\d*(:-?\d*){0,2}", part):
            raise ConfigError(f"--trials {text!r}: {part!r} is neither an index nor a slice like 0:10")
        if ":" in part:
            bounds = [int(b) if b else None for b in part.split(":")]
            picked.extend(range(n_trials)[slice(*bounds)])
        else:
            index = int(part)
            if not -n_trials <= index < n_trials:
                raise ConfigError(f"--trials: trial {index} is outside 0..{n_trials - 1}")
            picked.append(index % n_trials)
    if not picked:
        raise ConfigError(f"--trials {text!r} selects no trial of the {n_trials}")
    return sorted(set(picked))


def parse_ints(text: str) -> list[int]:
    """``"25,75,125"`` -> [25, 75, 125], ConfigError naming a bad entry."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{text!r} must be comma-separated integers, e.g. 25,75,125") from None


def score_store(path: str | Path, loss: str | None = None, trials: Sequence[int] | None = None,
                timesteps: Sequence[int] | None = None, weighting: str = "uniform",
                draws: Sequence[int] | None = None) -> dict:
    """Score a complete classify store from its cached errors (no model, no torch).

    Parameters
    ----------
    loss : which error array ranks the classes; default the loss the run eliminated with.
    trials : trial indices to use; ``timesteps`` selects them by timestep instead (every
        draw at those timesteps); all if neither.
    weighting : ``uniform``, ``snr``, ``x0`` or ``elbo`` (``pipeline.dc.scoring.timestep_weights``).
    draws : keep only these noise draws (e.g. ``[0]``: what a run with ``noise_draws: 1``
        computes), combined with ``trials`` or ``timesteps``.

    Returns
    -------
    ``pipeline.dc.scoring.score``'s dict over the samples whose image was read, plus
    ``forward_passes_spent`` (what the run spent on them, all trials), ``n_samples``,
    ``n_failed``, ``class_names``, ``trials``, ``timesteps``, ``draws``, ``loss``, ``weighting``.
    Samples are scored one unit-aligned block at a time, so memory stays bounded.
    """
    root = open_error_store(path)
    attrs = root.attrs[store.ATTR_KEY]
    if not attrs.get("complete"):
        done = store.unit_status(path)
        raise StoreError(f"classify store {str(path)!r} is incomplete ({int(done.sum())}/{len(done)} units); "
                         "finish it first (re-run its workflow: it resumes)")
    loss = loss or attrs.get("schedule", {}).get("loss", "l2")
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}{did_you_mean(loss, LOSSES)}; valid: {', '.join(LOSSES)}")
    plan_timesteps = [int(t) for t in root["timestep"][:]]  # per trial
    plan_draws = [int(d) for d in root["draw"][:]]
    if trials is not None and timesteps is not None:
        raise ConfigError("give --trials or --timesteps, not both")
    if timesteps is not None or draws is not None:
        chosen = scoring.select_trials(plan_timesteps, timesteps, plan_draws, draws).tolist()
        trials = chosen if trials is None else sorted(set(chosen) & {int(i) for i in trials})
        if not trials:
            raise ConfigError("the selected trials and draws have no trial in common")
    selected = list(range(len(plan_timesteps))) if trials is None else sorted({int(i) for i in trials})
    if any(not 0 <= i < len(plan_timesteps) for i in selected):
        raise ConfigError(f"trial indices must lie in [0, {len(plan_timesteps)}); got {selected}")
    if weighting == "uniform":
        weights: str | np.ndarray = "uniform"
    else:
        alphas = attrs.get("provenance", {}).get("alphas_cumprod")
        weights = scoring.timestep_weights(plan_timesteps, weighting, alphas)

    checks = Integrity(root, path)
    done, labels = checks.done(), root["label"][:]
    # A lost shard reads as NaN, which scoring would take for "eliminated": refuse instead.
    checks.check_present()
    class_names = [str(c) for c in root["class_name"][:]]
    candidate_class = root["candidate_class"][:]
    n_classes, n_candidates = len(class_names), len(candidate_class)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    predictions = np.full(len(done), -1, dtype=np.int64)
    passes = 0
    unit = attrs["layout"]["unit_samples"]
    # whole units per read, ~256 MiB of float64 cells at most
    block = unit * max(1, (256 << 20) // (unit * n_candidates * len(plan_timesteps) * 8))
    errors = checks.array(error_array(loss))
    for start in range(0, len(done), block):
        stop = min(start + block, len(done))
        ok = np.flatnonzero(done[start:stop] == store.WRITTEN)
        if not len(ok):
            continue
        cells = errors[start:stop][ok]
        empty = np.flatnonzero(np.isnan(cells).all(axis=(1, 2)))
        if len(empty):  # every class is evaluated on the first trials: an all-NaN row is lost data
            first = start + int(ok[empty[0]])
            raise StoreError(f"store {path}: {error_array(loss)} has no finite error for {len(empty)} written "
                             f"sample(s) (first: sample {first}, {root['image_id'][first]!r}); its data is "
                             f"lost, not eliminated; 'diffprobe verify {path}' lists the damage")
        part = scoring.score(cells, labels[start:stop][ok], selected, weights, candidate_class)
        confusion += part["confusion"]
        predictions[start + ok] = part["predictions"]
        passes += part["forward_passes"]
    scored = done == store.WRITTEN
    n_scored = int(scored.sum())
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)
    return {
        "accuracy": float(np.trace(confusion) / n_scored) if n_scored else float("nan"),
        "per_class_accuracy": per_class,
        "confusion": confusion,
        "predictions": predictions,
        "forward_passes": passes,
        "forward_passes_per_sample": passes / n_scored if n_scored else float("nan"),
        "forward_passes_spent": int(checks.array("forward_passes")[:][scored].sum()),
        "n_samples": n_scored,
        "n_failed": int((done == store.FAILED).sum()),
        "class_names": class_names,
        "trials": selected,
        "timesteps": [plan_timesteps[i] for i in selected],
        "draws": [plan_draws[i] for i in selected],
        "loss": loss,
        "weighting": weighting,
    }


def format_score(result: Mapping) -> str:
    """A short human-readable report of ``score_store``'s result."""
    ts, grid = result["timesteps"], sorted(set(result["timesteps"]))
    shown = ", ".join(map(str, grid[:8])) + (f" ... ({len(grid)} in all)" if len(grid) > 8 else "")
    lines = [
        f"accuracy        {result['accuracy']:.4f}  ({result['n_samples']} samples"
        + (f"; {result['n_failed']} unreadable images excluded" if result["n_failed"] else "") + ")",
        f"loss/weighting  {result['loss']} / {result['weighting']}",
        f"trials          {len(ts)} (timesteps {shown}; draws {sorted(set(result['draws']))})",
        f"forward passes  {result['forward_passes']} on these trials "
        f"({result['forward_passes_per_sample']:.1f} per sample); "
        f"the run spent {result['forward_passes_spent']}",
        "per class       " + "  ".join(f"{name}:{acc:.2f}" for name, acc in
                                       zip(result["class_names"][:20], result["per_class_accuracy"][:20]))
        + (" ..." if len(result["class_names"]) > 20 else ""),
    ]
    return "\n".join(lines)


def write_score(result: Mapping, out_dir: str | Path, title: str | None = None) -> dict[str, Path]:
    """Write ``score.json``, ``per_class.csv`` and ``confusion.png`` into ``out_dir``."""
    out = as_location(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: result[k] for k in ("accuracy", "forward_passes", "forward_passes_per_sample",
                                      "forward_passes_spent", "n_samples", "n_failed", "trials", "timesteps",
                                      "draws", "loss", "weighting")}
    summary["per_class_accuracy"] = {name: None if np.isnan(a) else float(a)
                                     for name, a in zip(result["class_names"], result["per_class_accuracy"])}
    summary["confusion"] = np.asarray(result["confusion"]).tolist()
    paths = {"json": out / "score.json", "csv": out / "per_class.csv", "png": out / "confusion.png"}
    paths["json"].write_text(json.dumps(summary, indent=1) + "\n")
    support = np.asarray(result["confusion"]).sum(axis=1)
    rows = ["class,class_name,support,accuracy"] + [
        f"{i},{json.dumps(name)},{int(n)},{'' if np.isnan(a) else f'{a:.6f}'}"
        for i, (name, n, a) in enumerate(zip(result["class_names"], support, result["per_class_accuracy"]))]
    paths["csv"].write_text("\n".join(rows) + "\n")
    title = title or f"accuracy {result['accuracy']:.3f} ({result['loss']}, {len(result['trials'])} trials)"
    scoring.confusion_png(result["confusion"], result["class_names"], paths["png"], title)
    return paths
