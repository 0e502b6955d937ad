"""classify: the Diffusion Classifier (Li et al. 2023) with a cached error tensor.

For every image x and candidate class c the stage measures the denoising error
``loss(eps_i, eps_theta(x_{t_i}, t_i, c))`` on the trials ``(t_i, eps_i)`` of one
``TrialPlan``, the same trials for every class of an image (``pipeline.dc.classifier``), and
stores the (sample, class, trial) errors of all three losses (``pipeline.store.error_tensor``).
An adaptive schedule evaluates every class on the first stage's trials and only the
survivors on later ones; the cells it skips stay NaN. Predictions and forward passes
are stored too, but any scoring is redone from the errors with no model
(``diffprobe score``).

Device batches mix samples, trials and classes: one stage of elimination for every
image of a unit is one list of (sample, trial, class) triples, ordered so that the
classes of one (sample, trial) sit together and share one x_t; it runs in batches of
``batch_size`` forwards, with losses kept on the device until the stage ends.
Conditioning: class labels for class-conditional models (UNet2D, DiT); for Stable
Diffusion one prompt per class from a template (``data/prompts``), encoded once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pipeline import store

from pipeline.store import error_tensor as errorstore
from pipeline.datasets import DatasetConfig, open_dataset
from pipeline.datasets.torch_data import load_images
from pipeline.dc.classifier import (EPS_SCHEME, LOSSES, PUBLISHED_SCHEDULES, AdaptiveResult, Schedule, StageRequest,
                         TrialPlan, adaptive_classify_batch, denoising_losses, make_plan, sample_eps,
                         stage_trials)
from pipeline.errors import ConfigError, DatasetError, ModelError, did_you_mean
from pipeline.models.fingerprint import model_fingerprint
from pipeline.models import TORCH_DTYPES, Condition, ModelAdapter, ModelConfig, load_model
from pipeline.noise import q_sample
from pipeline.workflow.stage import RunContext, Stage



@dataclass(frozen=True)
class ScheduleConfig:
    """Which classes are evaluated on which trials.

    Empty (the default): exhaustive, every class on every trial. Adaptive: either
    ``n_samples`` (trials each stage's scores rest on) with ``to_keep`` (classes that
    survive each stage), as in the paper's code, e.g. ``{n_samples: [50, 500],
    to_keep: [5, 1]}``; or ``preset``, a published schedule (``cifar10``, ``pets``,
    ``stl10``, ``food``, ``aircraft``, ``flowers``, ``imagenet``).
    """

    n_samples: tuple[int, ...] | None = None
    to_keep: tuple[int, ...] | None = None
    preset: str | None = None

    def __post_init__(self):
        if self.preset is not None:
            if self.n_samples is not None or self.to_keep is not None:
                raise ValueError("give schedule.preset or schedule.n_samples/to_keep, not both")
            if self.preset not in PUBLISHED_SCHEDULES:
                raise ValueError(f"unknown schedule preset {self.preset!r}"
                                 f"{did_you_mean(self.preset, PUBLISHED_SCHEDULES)}; "
                                 f"valid: {', '.join(PUBLISHED_SCHEDULES)}")
        elif (self.n_samples is None) != (self.to_keep is None):
            raise ValueError("schedule.n_samples and schedule.to_keep go together (one entry per stage), "
                             "e.g. n_samples: [50, 500], to_keep: [5, 1]")

    @property
    def adaptive(self) -> bool:
        return self.preset is not None or self.n_samples is not None

    def resolve(self, n_trials: int) -> Schedule:
        if self.preset is not None:
            return PUBLISHED_SCHEDULES[self.preset]
        if self.n_samples is not None:
            return Schedule(self.n_samples, self.to_keep)
        return Schedule.exhaustive(n_trials)


@dataclass(frozen=True)
class ClassifyConfig:
    """Parameters of the classify stage.

    n_trials / timesteps: the plan's trials: ``n_trials`` timesteps chosen by ``plan``
        (``even``: the paper's spacing; ``random``: drawn with ``seed``), or explicit
        ascending ``timesteps``. Adaptive schedules default to ``max(n_samples)`` trials.
    seed: noise seed; trial eps = ``sample_noise(seed, image_id, 0, t)`` (= extract's view 0).
    loss: the loss that drives elimination (l2, l1 and huber are all stored).
    batch_size: denoiser forwards per batch, mixing samples, trials and classes.
    prompt: Stable Diffusion only: a template name in ``data/prompts`` or a string with
        ``{}`` for the class name; default ``default`` ("a photo of a {}.").
    class_labels: class-conditional models only: the model's label for each dataset
        class (default: the dataset's class index).
    unit_samples: samples per unit (resume and ``--shard`` granularity); default chosen
        from the (class x trial) grid size.
    """

    model: ModelConfig
    dataset: DatasetConfig
    n_trials: int | None = None
    timesteps: tuple[int, ...] | None = None
    plan: Literal["even", "random"] = "even"
    seed: int = 0
    schedule: ScheduleConfig = ScheduleConfig()
    loss: Literal["l2", "l1", "huber"] = "l2"
    batch_size: int = 64
    device: str = "cpu"
    compute_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    prompt: str | None = None
    class_labels: tuple[int, ...] | None = None
    unit_samples: int | None = None
    num_workers: int = 0

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"'batch_size' must be >= 1, got {self.batch_size}")
        if self.n_trials is not None and self.timesteps is not None:
            raise ValueError("give 'n_trials' (with 'plan') or explicit 'timesteps', not both")
        if self.n_trials is None and self.timesteps is None and not self.schedule.adaptive:
            raise ValueError("an exhaustive classify needs 'n_trials' (e.g. 20) or 'timesteps'")


def passes_per_sample(schedule: Schedule, n_classes: int, n_trials: int) -> int:
    """Denoiser forwards one sample costs under ``schedule``."""
    alive, total = n_classes, 0
    for new, keep in zip(stage_trials(n_trials, schedule.n_samples), schedule.to_keep):
        total += alive * len(new)
        alive = keep
    return total


# ----------------------------------------------------------------- compute


class Classifier:
    """Model, dataset, plan and conditioning; computes one unit at a time."""

    def __init__(self, cfg: ClassifyConfig):
        self.cfg = cfg
        self.adapter: ModelAdapter = load_model(cfg.model, cfg.device, cfg.compute_dtype)
        self.device = self.adapter.device
        self.dtype = TORCH_DTYPES[cfg.compute_dtype]
        self.reader = open_dataset(cfg.dataset)
        self.prep = self.adapter.preprocessing.with_resize(cfg.dataset.resize)
        self.class_names = [str(c) for c in self.reader.class_names]
        self.n_classes = len(self.class_names)
        self.plan = self._make_plan()
        self.schedule = cfg.schedule.resolve(self.plan.n_trials)
        self.schedule.validate(self.n_classes, self.plan.n_trials)
        self.conditioning = self._conditioning()
        self.alphas = self.adapter.alphas_cumprod.to(self.device, torch.float64)  # moved once
        self.layout = errorstore.plan_error_layout(len(self.reader.records), self.n_classes,
                                                   self.plan.n_trials, cfg.unit_samples)
        self.forward_passes = 0

    def _make_plan(self) -> TrialPlan:
        cfg, big_t = self.cfg, self.adapter.num_train_timesteps
        if cfg.timesteps is not None:
            return TrialPlan(tuple(cfg.timesteps), cfg.seed, big_t, "explicit")
        # adaptive without n_trials: the grid is max(n_samples), as in the reference code
        n = cfg.n_trials if cfg.n_trials is not None else max(cfg.schedule.resolve(0).n_samples)
        return make_plan(n, big_t, cfg.plan, cfg.seed)

    def _conditioning(self) -> dict:
        """How class c conditions the model: label tensor or prompt embeddings, built once."""
        a, cfg = self.adapter, self.cfg
        if a.text_conditional:
            if cfg.class_labels is not None:
                raise ConfigError("class_labels is for class-conditional models; "
                                  "Stable Diffusion uses 'prompt'")
            from pipeline.models.sd import prompts_for

            prompts = prompts_for(self.class_names, cfg.prompt or "default")
            self.text = a.encode_text(prompts).to(self.dtype)  # (K, L, D), once per class
            return {"kind": "text", "template": cfg.prompt or "default", "prompts": prompts}
        if cfg.prompt is not None:
            raise ConfigError(f"'prompt' is for text-conditional models (kind: sd); this {a.kind} model "
                              "takes class labels: drop 'prompt'")
        if not a.num_classes:
            raise ModelError(f"classify needs a class- or text-conditional model; this {a.kind} model is "
                             "unconditional")
        labels = list(cfg.class_labels) if cfg.class_labels is not None else list(range(self.n_classes))
        if len(labels) != self.n_classes:
            raise ConfigError(f"class_labels has {len(labels)} entries; give one model label per dataset "
                              f"class ({self.n_classes})")
        bad = [v for v in labels if not 0 <= v < a.num_classes or v == a.null_class]
        if bad:
            raise ConfigError(
                f"model labels {bad[:5]} are outside the model's {a.num_classes} classes "
                "(or are its null class); "
                + ("set class_labels to map the dataset's classes to model labels"
                   if cfg.class_labels is None else "fix class_labels"))
        self.labels = torch.tensor(labels, dtype=torch.long, device=self.device)
        return {"kind": "label", "class_labels": labels}

    def condition(self, class_ids: torch.Tensor) -> Condition:
        """Condition for a batch of (B,) dataset class indices on the device."""
        if self.conditioning["kind"] == "text":
            return Condition("text", text=self.text[class_ids])
        return Condition("label", labels=self.labels[class_ids])

    @torch.inference_mode()
    def encode(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """(n, C, H, W) float32 model-space x_0 on the device (the VAE runs once per image)."""
        out = []
        for start in range(0, len(arrays), self.cfg.batch_size):
            pixels = torch.from_numpy(np.stack(arrays[start:start + self.cfg.batch_size])).to(self.device)
            out.append(self.adapter.encode(pixels.to(self.dtype)).float())
        return torch.cat(out)

    def compute_unit(self, unit: int, strict: bool = False) -> errorstore.UnitResult:
        """Classify the unit's samples; failed images keep NaN errors and prediction -1."""
        start, stop = self.layout.unit_range(unit)
        arrays, failures = load_images(self.reader, self.prep, range(start, stop),
                                       self.cfg.num_workers, use_bbox=self.cfg.dataset.crop == "bbox")
        if failures and strict:
            index, reason = next(iter(failures.items()))
            image_id = self.reader.records[index].image_id
            raise DatasetError(f"cannot read image {image_id!r}: {reason} (--strict)")
        ok = [s for s in range(start, stop) if s not in failures]
        n, k, t = stop - start, self.n_classes, self.plan.n_trials
        result = errorstore.UnitResult(
            errors={loss: np.full((n, k, t), np.nan, dtype=np.float32) for loss in LOSSES},
            prediction=np.full(n, -1, dtype=np.int64), forward_passes=np.zeros(n, dtype=np.int64),
            failed={s - start: failures[s] for s in failures})
        if not ok:
            return result
        for s, res in zip(ok, self.classify(ok, self.encode([arrays[s] for s in ok]))):
            for loss in LOSSES:
                result.errors[loss][s - start] = res.errors[loss]
            result.prediction[s - start] = res.prediction
            result.forward_passes[s - start] = res.forward_passes
        return result

    def classify(self, samples: Sequence[int], x0: torch.Tensor) -> list[AdaptiveResult]:
        """Staged elimination for ``samples`` (indices into the dataset) with x_0 (n, C, H, W)."""
        keys = [self.reader.records[s].image_id for s in samples]
        return adaptive_classify_batch(lambda requests: self.errors(requests, keys, x0), len(samples),
                                       self.n_classes, self.schedule.n_samples, self.schedule.to_keep,
                                       n_trials=self.plan.n_trials, loss=self.cfg.loss)

    @torch.inference_mode()
    def errors(self, requests: Sequence[StageRequest], keys: Sequence[str], x0: torch.Tensor
               ) -> list[dict[str, np.ndarray]]:
        """Every request's (class x trial) errors, all requests pooled into device batches.

        Triples (request, trial, class) run pair-major, so a (sample, trial)'s x_t and eps
        are built once per batch and shared by its classes; eps is drawn on the CPU
        (``sample_eps``, independent of batching) into pinned memory when on CUDA.
        """
        pairs = [(r, ti) for r, req in enumerate(requests) for ti in range(len(req.trial_ids))]
        pair_of, class_of = [], []
        for p, (r, _) in enumerate(pairs):
            pair_of += [p] * len(requests[r].class_ids)
            class_of += requests[r].class_ids
        losses: dict[str, list[torch.Tensor]] = {loss: [] for loss in LOSSES}
        shape = tuple(x0.shape[1:])
        # On CUDA every host->device copy is from pinned memory and non-blocking, so the
        # host prepares the next batch while the device runs this one.
        pin = self.device.type == "cuda"
        for b0 in range(0, len(pair_of), self.cfg.batch_size):
            rows = pair_of[b0:b0 + self.cfg.batch_size]
            first, batch_pairs = rows[0], pairs[rows[0]:rows[-1] + 1]
            eps = torch.empty((len(batch_pairs), *shape), dtype=torch.float32, pin_memory=pin)
            items, ts = [], []
            for j, (r, ti) in enumerate(batch_pairs):
                req = requests[r]
                t = self.plan.timesteps[req.trial_ids[ti]]
                eps[j] = sample_eps(self.plan.seed, keys[req.item], t, shape)
                items.append(req.item)
                ts.append(t)
            ints = torch.tensor(items + ts + [p - first for p in rows] + class_of[b0:b0 + len(rows)])
            ints = (ints.pin_memory() if pin else ints).to(self.device, non_blocking=pin)
            item_ids, t_pairs, local, classes = ints.split([len(items), len(ts), len(rows), len(rows)])
            eps = eps.to(self.device, non_blocking=pin)
            x_t = q_sample(x0[item_ids], eps, self.alphas, t_pairs)
            pred = self.adapter.forward(x_t[local].to(self.dtype), t_pairs[local], self.condition(classes))
            for loss, values in denoising_losses(eps[local], pred).items():
                losses[loss].append(values)
        self.forward_passes += len(pair_of)
        flat = {loss: torch.cat(v).cpu().double().numpy() for loss, v in losses.items()}  # one sync per stage
        grids, offset = [], 0
        for req in requests:
            size = len(req.class_ids) * len(req.trial_ids)
            # rows ran trial-major within a request: reshape (trial, class), return (class, trial)
            grids.append({loss: flat[loss][offset:offset + size].reshape(len(req.trial_ids), -1).T
                          for loss in LOSSES})
            offset += size
        return grids

    def provenance(self) -> dict:
        a, cfg = self.adapter, self.cfg
        return {
            "model": a.provenance(),
            "alphas_cumprod": a.alphas_cumprod.tolist(),
            "noise": {"seed": self.plan.seed, "eps_scheme": EPS_SCHEME,
                      "sample_key": "image_id", "x_t": "pipeline.noise.q_sample(x0, eps, alphas_cumprod, t)"},
            "conditioning": self.conditioning,
            "preprocessing": self.prep.to_attrs() | {"crop": cfg.dataset.crop},
            "dataset": {"reader": cfg.dataset.reader, "root": cfg.dataset.root, "split": cfg.dataset.split,
                        "n_images": len(self.reader.records)},
            "compute_dtype": cfg.compute_dtype,
            "device": (f"{self.device} ({torch.cuda.get_device_name(self.device)})"
                       if self.device.type == "cuda" else str(self.device)),
            "batch_size": cfg.batch_size,
        }

    def schedule_attrs(self) -> dict:
        sched = self.schedule
        return {"kind": "adaptive" if self.cfg.schedule.adaptive else "exhaustive",
                "preset": self.cfg.schedule.preset, "n_samples": list(sched.n_samples),
                "to_keep": list(sched.to_keep), "loss": self.cfg.loss,
                "stage_trials": stage_trials(self.plan.n_trials, sched.n_samples),
                "forward_passes_per_sample": passes_per_sample(sched, self.n_classes, self.plan.n_trials)}


def classify_units(clf: Classifier, output: Path, units: list[int], desc: str = "classify",
                   progress: bool = True, strict: bool = False) -> None:
    """Compute ``units`` while a background thread writes the previous one (the write protocol)."""
    from tqdm.auto import tqdm

    root = store.open_root(output, mode="r+")
    writer = store.UnitWriter(lambda unit, result: errorstore.write_error_unit(root, clf.layout, unit, result),
                              name="diffprobe-classify-writer")
    try:
        with tqdm(total=len(units), unit="unit", desc=desc, disable=not progress) as bar:
            for unit in units:
                writer.put(unit, clf.compute_unit(unit, strict))
                bar.update(1)
    finally:
        writer.close()


# ----------------------------------------------------------------- stage


class ClassifyStage(Stage):
    kind = "classify"
    shardable = True
    Config = ClassifyConfig
    output_suffix = ".zarr"

    def fingerprint(self, cfg: ClassifyConfig, base_dir: Path) -> dict:
        return model_fingerprint(cfg.model)

    def run(self, cfg: ClassifyConfig, ctx: RunContext) -> None:
        clf = Classifier(cfg)
        lay = clf.layout
        if not ctx.output.exists():
            attrs = ctx.base_attrs() | {"plan": clf.plan.to_dict(), "schedule": clf.schedule_attrs(),
                                        "provenance": clf.provenance()}
            records = clf.reader.records
            errorstore.create_error_store(ctx.output, lay, [r.image_id for r in records],
                                          [r.label for r in records], clf.class_names, clf.plan.timesteps,
                                          attrs)
        todo = ctx.pending_units(lay.n_units)
        sched = clf.schedule_attrs()
        ctx.log(f"{lay.n_samples} samples x {clf.n_classes} classes x {clf.plan.n_trials} trials "
                f"({sched['kind']}, {sched['forward_passes_per_sample']} forwards per sample); "
                f"{lay.n_units} units of {lay.unit_samples}; {len(todo)} to do"
                + ctx.shard_note())
        start = time.perf_counter()
        classify_units(clf, ctx.output, todo, desc=ctx.entry.name, progress=ctx.progress, strict=ctx.strict)
        if todo:
            elapsed = time.perf_counter() - start
            ctx.log(f"{clf.forward_passes} forward passes in {elapsed:.1f} s "
                    f"({clf.forward_passes / max(elapsed, 1e-9):.0f}/s)")
        ctx.finalize_store()

    def plan(self, cfg: ClassifyConfig, ctx: RunContext) -> list[tuple[str, str]]:
        clf = Classifier(cfg)
        sched = clf.schedule_attrs()
        per_sample = sched["forward_passes_per_sample"]
        n = clf.layout.n_samples
        # Time one real device batch of this size on the first readable image.
        arrays, _ = load_images(clf.reader, clf.prep, range(min(n, 8)), cfg.num_workers)
        probe = min(arrays, default=None)
        x0 = clf.encode([arrays[probe]]) if probe is not None else None
        rows = [
            ("images", f"{n} ({cfg.dataset.reader}/{cfg.dataset.split})"),
            ("classes", f"{clf.n_classes} ({clf.conditioning['kind']} conditioning)"),
            ("trials", f"{clf.plan.n_trials} ({clf.plan.mode}; timesteps {clf.plan.timesteps[0]} .. "
                       f"{clf.plan.timesteps[-1]})"),
            ("schedule", f"{sched['kind']}: n_samples {sched['n_samples']}, to_keep {sched['to_keep']}"),
            ("forward passes", f"{per_sample * n} ({per_sample} per sample; exhaustive would be "
                               f"{clf.n_classes * clf.plan.n_trials})"),
            ("units", f"{clf.layout.n_units} x {clf.layout.unit_samples} samples"),
        ]
        if x0 is not None:
            classes = min(clf.n_classes, cfg.batch_size)
            trials = list(range(min(clf.plan.n_trials, math.ceil(cfg.batch_size / classes))))
            request = StageRequest(0, tuple(range(classes)), tuple(trials))
            key = [clf.reader.records[probe].image_id]
            clf.errors([request], key, x0)  # warm-up
            begin = time.perf_counter()
            clf.errors([request], key, x0)
            rate = classes * len(trials) / (time.perf_counter() - begin)
            rows.append(("time (est.)",
                         f"{per_sample * n / rate:.1f} s at {rate:.0f} forwards/s on {cfg.device}"))
        return rows
