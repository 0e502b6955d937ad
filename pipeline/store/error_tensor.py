"""The Diffusion Classifier's error store: schema and unit writes (scoring it: ``pipeline.dc.rescore``).

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

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import pipeline
from pipeline.store import layout as store
from pipeline.store.location import as_location
from pipeline.errors import ConfigError, StoreError

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


def make_error_layout(n_samples: int, n_candidates: int, n_trials: int, unit_samples: int | None = None,
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
        store.write_1d(root, "image_id", image_ids, "sample", dtype=str)
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


def write_error_unit(root, layout: ErrorLayout, unit: int, result: UnitResult, fence=None) -> bool:
    """Write one unit as whole shards, then its ``done`` cells (the one write protocol);
    ``fence`` as in ``pipeline.store.layout.mark_done``. Returns whether ``done`` was set."""
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
    return store.mark_done(root, start, stop, result.failed, written, fence)


# ----------------------------------------------------------------- reading


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
