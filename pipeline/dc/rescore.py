"""Re-scoring a classify store from its cached errors: no model, no torch, no GPU.

``diffprobe score`` and the report call :func:`score_store` on a store written by the
classify stage (:mod:`pipeline.store.error_tensor` holds its schema): other trial
subsets, timesteps, noise draws, losses and weightings, each equal to a run over that
subset because every trial's eps depends on (seed, image, timestep, draw) only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pipeline.dc import scoring
from pipeline.errors import ConfigError, StoreError, did_you_mean
from pipeline.store import layout as store
from pipeline.store.checks import Integrity
from pipeline.store.error_tensor import LOSSES, error_array, open_error_store
from pipeline.store.location import as_location


def parse_trials(text: str, n_trials: int, what: str = "--trials", item: str = "trial") -> list[int]:
    """``"0:10"``, ``"0:20:2"``, ``"3,7,9"`` or a mix (``"0:5,12"``) -> sorted distinct indices
    below ``n_trials``; ``what`` / ``item`` name the option and its items in errors."""
    picked: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if not re.fullmatch(r"-?\d*(:-?\d*){0,2}", part):
            raise ConfigError(f"{what} {text!r}: {part!r} is neither an index nor a slice like 0:10")
        if ":" in part:
            bounds = [int(b) if b else None for b in part.split(":")]
            picked.extend(range(n_trials)[slice(*bounds)])
        else:
            index = int(part)
            if not -n_trials <= index < n_trials:
                raise ConfigError(f"{what}: {item} {index} is outside 0..{n_trials - 1}")
            picked.append(index % n_trials)
    if not picked:
        raise ConfigError(f"{what} {text!r} selects no {item} of the {n_trials}")
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
