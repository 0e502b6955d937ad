"""classify: the Diffusion Classifier (Li et al. 2023) with a cached error tensor.

For every image x and candidate c (a class label, or one prompt of a prompt set) the
stage measures the denoising error ``loss(eps_i, eps_theta(x_{t_i}, t_i, c))`` on the
trials ``(t_i, eps_i)`` of one ``TrialPlan`` -- a grid of ``n_timesteps`` timesteps with
``noise_draws`` draws each -- the same trials for every candidate of an image
(``pipeline.dc.classifier``), and stores the (sample, candidate, trial) errors of all
three losses (``pipeline.store.error_tensor``). An adaptive schedule evaluates every
candidate on the first round's trials and only the survivors on later ones; the cells
it skips stay NaN. Predictions and forward passes are stored too, but any scoring is
redone from the errors with no model (``diffprobe score``).

Device batches mix samples, trials and candidates: one round of elimination for every
image of a unit is one list of (sample, trial, candidate) triples, ordered so that the
candidates of one (sample, trial) sit together and share one x_t; it runs in batches
of ``batch_size`` forwards, with losses kept on the device until the round ends.
Conditioning: class labels for class-conditional models (UNet2D, DiT); for Stable
Diffusion the prompts of a prompt set (``pipeline.dc.prompts``), each encoded once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pipeline import faults, store

from pipeline.store import error_tensor as errorstore
from pipeline.datasets import DatasetConfig, open_dataset
from pipeline.datasets.torch_data import load_images
from pipeline.dc import prompts as prompt_sets
from pipeline.dc.classifier import (EPS_SCHEME, LOSSES, PUBLISHED_SCHEDULES, AdaptiveResult, RoundRequest,
                                    Schedule, TrialPlan, adaptive_classify_batch, denoising_losses, make_plan,
                                    passes_per_sample, round_trials)
from pipeline.errors import ConfigError, DatasetError, ModelError, did_you_mean
from pipeline.store.describe import human_bytes
from pipeline.models.fingerprint import model_fingerprint
from pipeline.models import (TORCH_DTYPES, Condition, ModelAdapter, ModelConfig, planning_device, prepared_model,
                             resolve_device)
from pipeline.noise import q_sample
from pipeline.workflow.config import device_field, not_hashed
from pipeline.workflow.stage import RunContext, Stage, prepared_value, without_listing



@dataclass(frozen=True)
class ScheduleConfig:
    """Which candidates are evaluated on which trials.

    Empty (the default): exhaustive, every candidate on every trial. Adaptive: either
    ``timesteps_per_round`` (grid timesteps each round's scores rest on) with
    ``keep_per_round`` (candidates that survive each round), e.g.
    ``{timesteps_per_round: [50, 500], keep_per_round: [5, 1]}`` (the reference code's
    ``--n_samples 50 500 --to_keep 5 1``); or ``preset``, a published schedule
    (``cifar10``, ``pets``, ``stl10``, ``food``, ``aircraft``, ``flowers``, ``imagenet``).
    An adaptive schedule sets the grid: ``max(timesteps_per_round)`` evenly spaced timesteps.
    A preset is the schedule only; the published commands also used ``loss: l1`` for
    cifar10, pets, flowers and stl10.
    """

    timesteps_per_round: tuple[int, ...] | None = None
    keep_per_round: tuple[int, ...] | None = None
    preset: str | None = None

    def __post_init__(self):
        if self.preset is not None:
            if self.timesteps_per_round is not None or self.keep_per_round is not None:
                raise ValueError("give schedule.preset or schedule.timesteps_per_round/keep_per_round, "
                                 "not both")
            if self.preset not in PUBLISHED_SCHEDULES:
                raise ValueError(f"unknown schedule preset {self.preset!r}"
                                 f"{did_you_mean(self.preset, PUBLISHED_SCHEDULES)}; "
                                 f"valid: {', '.join(PUBLISHED_SCHEDULES)}")
        elif (self.timesteps_per_round is None) != (self.keep_per_round is None):
            raise ValueError("schedule.timesteps_per_round and schedule.keep_per_round go together (one "
                             "entry per round), e.g. timesteps_per_round: [50, 500], keep_per_round: [5, 1]")

    @property
    def adaptive(self) -> bool:
        return self.preset is not None or self.timesteps_per_round is not None

    def resolve(self, n_timesteps: int) -> Schedule:
        if self.preset is not None:
            return PUBLISHED_SCHEDULES[self.preset]
        if self.timesteps_per_round is not None:
            return Schedule(self.timesteps_per_round, self.keep_per_round)
        return Schedule.exhaustive(n_timesteps)


@dataclass(frozen=True)
class ClassifyConfig:
    """Parameters of the classify stage.

    n_timesteps / timesteps: the grid: ``n_timesteps`` timesteps placed by ``spacing``
        (``even``: the paper's ``T // n // 2 + k * (T // n)``; ``random``: drawn with
        ``seed``), or explicit ascending ``timesteps``. An adaptive schedule sets the
        grid itself (``max(timesteps_per_round)`` even timesteps); a different
        ``n_timesteps`` would change which timesteps every round evaluates, so it is
        refused, as are explicit timesteps or random spacing with a published preset.
    noise_draws: noise draws per timestep (the reference code's ``n_trials``); each
        (timestep, draw) pair is one trial with its own eps.
    seed: noise seed; trial eps = ``sample_noise(seed, image_id, draw, t)`` (= extract's view ``draw``).
    loss: the loss that drives elimination (l2, l1 and huber are all stored).
    batch_size: denoiser forwards per batch, mixing samples, trials and candidates.
    prompt: text-conditional models only (required for them): a shipped published
        prompt set (``cifar10``, ``pets``, ``flowers``, ... see ``pipeline.dc.prompts``),
        a shipped template name, or a template string with ``{}`` for the class name.
    prompt_file: instead of ``prompt``, a CSV with columns ``prompt,classname,classidx``
        (one row per prompt; several rows may share a class).
    class_labels: class-conditional models only: the model's label for each dataset
        class (default: the dataset's class index).
    unit_samples: samples per unit (resume and ``--shard`` granularity); default chosen
        from the (candidate x trial) grid size.
    """

    model: ModelConfig
    dataset: DatasetConfig
    n_timesteps: int | None = None
    timesteps: tuple[int, ...] | None = None
    spacing: Literal["even", "random"] = "even"
    noise_draws: int = 1
    seed: int = 0
    schedule: ScheduleConfig = ScheduleConfig()
    loss: Literal["l2", "l1", "huber"] = "l2"
    batch_size: int = not_hashed(64)
    device: str = device_field("cpu")
    compute_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    prompt: str | None = None
    prompt_file: str | None = field(default=None, metadata={"path": "path"})
    class_labels: tuple[int, ...] | None = None
    unit_samples: int | None = None
    num_workers: int = not_hashed(0)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"'batch_size' must be >= 1, got {self.batch_size}")
        if self.noise_draws < 1:
            raise ValueError(f"'noise_draws' must be >= 1, got {self.noise_draws}")
        if self.n_timesteps is not None and self.timesteps is not None:
            raise ValueError("give 'n_timesteps' (with 'spacing') or explicit 'timesteps', not both")
        if self.prompt is not None and self.prompt_file is not None:
            raise ValueError("give 'prompt' or 'prompt_file', not both")
        sched = self.schedule
        if not sched.adaptive:
            if self.n_timesteps is None and self.timesteps is None:
                raise ValueError("an exhaustive classify needs 'n_timesteps' (e.g. 20) or 'timesteps'")
            return
        resolved = sched.resolve(0)
        grid = resolved.grid_size
        what = (f"preset {sched.preset!r}" if sched.preset
                else f"timesteps_per_round {list(resolved.timesteps_per_round)}")
        if self.n_timesteps is not None and self.n_timesteps != grid:
            raise ValueError(f"n_timesteps: {self.n_timesteps} changes the grid of schedule {what}, whose "
                             f"rounds choose from {grid} timesteps (the reference's max(n_samples)); "
                             "drop n_timesteps")
        if sched.preset is not None and (self.timesteps is not None or self.spacing != "even"):
            raise ValueError(f"schedule preset {sched.preset!r} runs on the published grid of {grid} even "
                             "timesteps; drop 'timesteps'/'spacing', or give timesteps_per_round and "
                             "keep_per_round")
        if self.timesteps is not None and len(self.timesteps) != grid:
            raise ValueError(f"'timesteps' lists {len(self.timesteps)} timesteps but schedule {what} needs "
                             f"a grid of {grid}, its last round")

    @property
    def grid_size(self) -> int:
        """Timesteps in the grid."""
        if self.timesteps is not None:
            return len(self.timesteps)
        return self.n_timesteps if self.n_timesteps is not None else self.schedule.resolve(0).grid_size


# ----------------------------------------------------------------- compute


class Classifier:
    """Model, dataset, plan and candidates; computes one unit at a time."""

    def __init__(self, cfg: ClassifyConfig, device: str | None = None, encode_prompts: bool = True,
                 prepared: dict | None = None):
        # ``device`` overrides cfg.device (validate and plan build the model on the CPU,
        # in float32, where the configured device is absent).
        # ``encode_prompts=False`` (validate) skips the text encoder's pass over every prompt.
        # ``prepared``: the run's ``RunContext.prepared``, whose dataset and model are reused.
        self.cfg = cfg
        self.encode_prompts = encode_prompts
        compute_dtype = cfg.compute_dtype if device is None else "float32"
        self.adapter: ModelAdapter = prepared_model(cfg.model, device or cfg.device, compute_dtype, prepared)
        self.device = self.adapter.device
        self.dtype = TORCH_DTYPES[compute_dtype]
        self.reader = prepared_value(prepared, "reader", lambda: open_dataset(cfg.dataset))
        self.prep = self.adapter.preprocessing.with_resize(cfg.dataset.resize)
        self.class_names = [str(c) for c in self.reader.class_names]
        self.n_classes = len(self.class_names)
        self.plan = self._make_plan()
        self.conditioning = self._conditioning()  # sets candidate_class / candidate_prompt
        self.n_candidates = len(self.candidate_class)
        self.schedule = cfg.schedule.resolve(self.plan.n_timesteps)
        self.schedule.validate(self.n_candidates, self.plan.n_timesteps)
        self.alphas = self.adapter.alphas_cumprod.to(self.device, torch.float64)  # moved once
        self.layout = errorstore.make_error_layout(len(self.reader.records), self.n_candidates,
                                                   self.plan.n_trials, cfg.unit_samples)
        self.forward_passes = 0

    def _make_plan(self) -> TrialPlan:
        cfg, big_t = self.cfg, self.adapter.num_train_timesteps
        if cfg.timesteps is not None:
            return TrialPlan(tuple(cfg.timesteps), cfg.seed, big_t, "explicit", cfg.noise_draws)
        return make_plan(cfg.grid_size, big_t, cfg.spacing, cfg.seed, cfg.noise_draws)

    def _conditioning(self) -> dict:
        """The candidates and how each conditions the model (labels or prompt embeddings, built once)."""
        a, cfg = self.adapter, self.cfg
        if a.text_conditional:
            if cfg.class_labels is not None:
                raise ConfigError("class_labels is for class-conditional models; "
                                  "Stable Diffusion uses 'prompt' or 'prompt_file'")
            prompt_set = prompt_sets.load_prompt_set(cfg.prompt, cfg.prompt_file, self.class_names)
            self.candidate_class = list(prompt_set.class_index)
            self.candidate_prompt = list(prompt_set.prompts)
            self.text = (a.encode_text(self.candidate_prompt).to(self.dtype)  # (P, L, D), once per prompt
                         if self.encode_prompts else None)
            self.name_mismatches = prompt_set.check(self.class_names)
            return {"kind": "text", "prompt_source": prompt_set.source, "prompt_sha256": prompt_set.sha256,
                    "class_prompts": prompt_set.by_class(self.n_classes),
                    "classname_mismatches": self.name_mismatches[:20],
                    "n_classname_mismatches": len(self.name_mismatches)}
        if cfg.prompt is not None or cfg.prompt_file is not None:
            raise ConfigError(f"'prompt' is for text-conditional models (kind: sd); this {a.kind} model "
                              "takes class labels: drop 'prompt'/'prompt_file'")
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
        self.candidate_class = list(range(self.n_classes))
        self.candidate_prompt = [""] * self.n_classes
        self.name_mismatches = []
        self.labels = torch.tensor(labels, dtype=torch.long, device=self.device)
        return {"kind": "label", "class_labels": labels}

    def condition(self, candidates: torch.Tensor) -> Condition:
        """Condition for a batch of (B,) candidate indices on the device."""
        if self.conditioning["kind"] == "text":
            return Condition("text", text=self.text[candidates])
        return Condition("label", labels=self.labels[candidates])

    @torch.inference_mode()
    def encode(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """(n, C, H, W) float32 model-space x_0 on the device (the VAE runs once per image)."""
        out = []
        for start in range(0, len(arrays), self.cfg.batch_size):
            pixels = torch.from_numpy(np.stack(arrays[start:start + self.cfg.batch_size])).to(self.device)
            out.append(self.adapter.encode(pixels.to(self.adapter.precision.input_dtype)).float())
        return torch.cat(out)

    def compute_unit(self, unit: int, strict: bool = False) -> errorstore.UnitResult:
        """Classify the unit's samples; failed images keep NaN errors and prediction -1."""
        start, stop = self.layout.unit_range(unit)
        arrays, failures = load_images(self.reader, self.prep, range(start, stop),
                                       self.cfg.num_workers, use_bbox=self.cfg.dataset.crop == "bbox")
        if failures and strict:
            index, reason = next(iter(failures.items()))
            image_id = str(self.reader.records.ids[index])
            raise DatasetError(f"cannot read image {image_id!r}: {reason} (--strict)")
        ok = [s for s in range(start, stop) if s not in failures]
        n, k, t = stop - start, self.n_candidates, self.plan.n_trials
        result = errorstore.UnitResult(
            errors={loss: np.full((n, k, t), np.nan, dtype=np.float32) for loss in LOSSES},
            prediction=np.full(n, -1, dtype=np.int64), forward_passes=np.zeros(n, dtype=np.int64),
            failed={s - start: failures[s] for s in failures})
        if not ok:
            return result
        for s, res in zip(ok, self.classify(ok, self.encode([arrays[s] for s in ok]))):
            for loss in LOSSES:
                result.errors[loss][s - start] = res.errors[loss]
            result.prediction[s - start] = self.candidate_class[res.winner]
            result.forward_passes[s - start] = res.forward_passes
        return result

    def classify(self, samples: Sequence[int], x0: torch.Tensor) -> list[AdaptiveResult]:
        """Elimination in rounds for ``samples`` (indices into the dataset) with x_0 (n, C, H, W)."""
        keys = self.reader.records.ids[list(samples)].tolist()
        return adaptive_classify_batch(lambda requests: self.errors(requests, keys, x0), len(samples),
                                       self.n_candidates, self.plan, self.schedule, loss=self.cfg.loss)

    @torch.inference_mode()
    def errors(self, requests: Sequence[RoundRequest], keys: Sequence[str], x0: torch.Tensor
               ) -> list[dict[str, np.ndarray]]:
        """Every request's (candidate x trial) errors, all requests pooled into device batches.

        Triples (request, trial, candidate) run pair-major, so a (sample, trial)'s x_t and
        eps are built once per batch and shared by its candidates; eps is drawn on the CPU
        (``TrialPlan.eps``, independent of batching) into pinned memory when on CUDA.
        """
        pairs = [(r, ti) for r, req in enumerate(requests) for ti in range(len(req.trial_ids))]
        pair_of, candidate_of = [], []
        for p, (r, _) in enumerate(pairs):
            pair_of += [p] * len(requests[r].candidate_ids)
            candidate_of += requests[r].candidate_ids
        losses: dict[str, list[torch.Tensor]] = {loss: [] for loss in LOSSES}
        shape = tuple(x0.shape[1:])
        trial_t = self.plan.trial_timesteps
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
                trial = req.trial_ids[ti]
                eps[j] = self.plan.eps(keys[req.item], trial, shape)
                items.append(req.item)
                ts.append(trial_t[trial])
            ints = torch.tensor(items + ts + [p - first for p in rows] + candidate_of[b0:b0 + len(rows)])
            ints = (ints.pin_memory() if pin else ints).to(self.device, non_blocking=pin)
            item_ids, t_pairs, local, candidates = ints.split([len(items), len(ts), len(rows), len(rows)])
            eps = eps.to(self.device, non_blocking=pin)
            x_t = q_sample(x0[item_ids], eps, self.alphas, t_pairs)
            pred = self.adapter.run(x_t[local], t_pairs[local], self.condition(candidates))
            for loss, values in denoising_losses(eps[local], pred).items():
                losses[loss].append(values)
        self.forward_passes += len(pair_of)
        flat = {loss: torch.cat(v).cpu().double().numpy() for loss, v in losses.items()}  # one sync per round
        grids, offset = [], 0
        for req in requests:
            size = len(req.candidate_ids) * len(req.trial_ids)
            # rows ran trial-major within a request: reshape (trial, candidate), return (candidate, trial)
            grids.append({loss: flat[loss][offset:offset + size].reshape(len(req.trial_ids), -1).T
                          for loss in LOSSES})
            offset += size
        return grids

    def provenance(self) -> dict:
        a, cfg = self.adapter, self.cfg
        return {
            "model": a.provenance(),
            "alphas_cumprod": a.alphas_cumprod.tolist(),
            "noise": {"seed": self.plan.seed, "eps_scheme": EPS_SCHEME, "sample_key": "image_id",
                      "x_t": "pipeline.noise.q_sample(x0, eps, alphas_cumprod, t)"},
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
                "preset": self.cfg.schedule.preset, "timesteps_per_round": list(sched.timesteps_per_round),
                "keep_per_round": list(sched.keep_per_round), "loss": self.cfg.loss,
                "round_trials": round_trials(self.plan, sched),
                "forward_passes_per_sample": passes_per_sample(self.plan, sched, self.n_candidates)}


def classify_units(clf: Classifier, output: Path, units: list[int], desc: str = "classify",
                   progress: bool = True, strict: bool = False, claims=None) -> int:
    """Compute ``units`` while a background thread writes the previous one (the write protocol).

    With ``claims`` (a ``UnitClaims``) each unit is taken under a lease first and skipped
    if another process holds it; returns the number of units computed.
    """
    from tqdm.auto import tqdm

    root = store.open_root(output, mode="r+")

    def write(unit, result):
        if claims is None:
            errorstore.write_error_unit(root, clf.layout, unit, result)
            return
        if claims.still_holds(unit):  # fenced twice: before the data, and before done
            errorstore.write_error_unit(root, clf.layout, unit, result, fence=lambda: claims.still_holds(unit))
        claims.finish(unit)

    writer = store.UnitWriter(write, name="diffprobe-classify-writer")
    taken = units if claims is None else claims.take(units, lambda u: store.unit_status(output)[u])
    computed = 0
    try:
        with tqdm(total=len(units), unit="unit", desc=desc, disable=not progress) as bar:
            for unit in taken:
                faults.unit_delay()
                writer.put(unit, clf.compute_unit(unit, strict))
                computed += 1
                bar.update(1)
    finally:
        writer.close()
    return computed


# ----------------------------------------------------------------- stage


class ClassifyStage(Stage):
    kind = "classify"
    shardable = True
    Config = ClassifyConfig
    output_suffix = ".zarr"

    def fingerprint(self, cfg: ClassifyConfig, base_dir: Path) -> dict:
        out = model_fingerprint(cfg.model)
        digest = prompt_sets.source_digest(cfg.prompt, cfg.prompt_file)
        if digest is not None:
            out = out | {"prompts_sha256": digest}  # an edited prompt file is a new configuration
        return out

    def dataset_records(self, cfg: ClassifyConfig, prepared: dict | None = None) -> Records:
        return prepared_value(prepared, "reader", lambda: open_dataset(cfg.dataset)).records

    def validate(self, cfg: ClassifyConfig, ctx: RunContext) -> None:
        resolve_device(cfg.device)  # first, as run meets it first
        Classifier(cfg, device="cpu", encode_prompts=False, prepared=ctx.prepared)  # run reuses dataset, model

    def run(self, cfg: ClassifyConfig, ctx: RunContext) -> None:
        clf = Classifier(cfg, prepared=without_listing(ctx.prepared))  # listed again, as extract does
        lay = clf.layout
        if clf.name_mismatches:
            ctx.log(f"prompt set names {len(clf.name_mismatches)} classes differently from the dataset "
                    f"(matched by class index), e.g. {clf.name_mismatches[0]}")
        if store.read_attrs(ctx.output) is None:
            attrs = ctx.base_attrs() | {"plan": clf.plan.to_dict(), "schedule": clf.schedule_attrs(),
                                        "provenance": clf.provenance()}
            records = clf.reader.records
            errorstore.create_error_store(ctx.output, lay, records.ids, records.labels, clf.class_names, clf.candidate_class,
                                          clf.candidate_prompt, clf.plan.trial_timesteps,
                                          clf.plan.trial_draws, attrs)
        ctx.check_same_samples(clf.reader.records.ids)
        todo = ctx.pending_units(lay.n_units)
        sched = clf.schedule_attrs()
        ctx.log(f"{lay.n_samples} samples x {clf.n_candidates} candidates x {clf.plan.n_trials} trials "
                f"({clf.plan.n_timesteps} timesteps x {clf.plan.noise_draws} draws; {sched['kind']}, "
                f"{sched['forward_passes_per_sample']} forwards per sample); "
                f"{lay.n_units} units of {lay.unit_samples}; {len(todo)} to do"
                + ctx.shard_note())
        start = time.perf_counter()
        units = ctx.unit_claims()
        computed = classify_units(clf, ctx.output, todo, desc=ctx.entry.name, progress=ctx.progress,
                                  strict=ctx.strict, claims=units)
        ctx.report_skipped(computed, units)
        if computed:
            elapsed = time.perf_counter() - start
            ctx.log(f"{clf.forward_passes} forward passes in {elapsed:.1f} s "
                    f"({clf.forward_passes / max(elapsed, 1e-9):.0f}/s)")
        ctx.finalize_store()

    def plan(self, cfg: ClassifyConfig, ctx: RunContext) -> list[tuple[str, str]]:
        device, absent = planning_device(cfg.device)  # a login node plans a GPU workflow on the CPU
        clf = Classifier(cfg, device=device)
        sched = clf.schedule_attrs()
        per_sample = sched["forward_passes_per_sample"]
        n = clf.layout.n_samples
        # Time one real device batch of this size on the first readable image.
        arrays, _ = load_images(clf.reader, clf.prep, range(min(n, 8)), cfg.num_workers)
        probe = min(arrays, default=None)
        x0 = clf.encode([arrays[probe]]) if probe is not None else None
        plan = clf.plan
        rows = [
            ("images", f"{n} ({cfg.dataset.reader}/{cfg.dataset.split})"),
            ("classes", f"{clf.n_classes} ({clf.conditioning['kind']} conditioning)"),
            ("candidates", f"{clf.n_candidates} "
                           f"({'prompts' if clf.conditioning['kind'] == 'text' else 'labels'})"),
            ("trials", f"{plan.n_trials} = {plan.n_timesteps} timesteps ({plan.spacing}; "
                       f"{plan.timesteps[0]} .. {plan.timesteps[-1]}) x {plan.noise_draws} noise draws"),
            ("schedule", f"{sched['kind']}: timesteps_per_round {sched['timesteps_per_round']}, "
                         f"keep_per_round {sched['keep_per_round']}"),
            ("forward passes", f"{per_sample * n} ({per_sample} per sample; exhaustive would be "
                               f"{clf.n_candidates * plan.n_trials})"),
            ("units", f"{clf.layout.n_units} x {clf.layout.unit_samples} samples"),
            ("bytes written (raw)", human_bytes(n * clf.n_candidates * plan.n_trials * 4 * len(LOSSES))
             + " (float32 errors, every candidate x trial cell)"),
        ]
        if absent:
            rows.append(("time (est.)", f"not measured: {absent}; run plan on a {cfg.device} machine for the time"))
        elif x0 is not None:
            candidates = min(clf.n_candidates, cfg.batch_size)
            trials = list(range(min(plan.n_trials, math.ceil(cfg.batch_size / candidates))))
            request = RoundRequest(0, tuple(range(candidates)), tuple(trials))
            key = [str(clf.reader.records.ids[probe])]
            clf.errors([request], key, x0)  # warm-up
            begin = time.perf_counter()
            clf.errors([request], key, x0)
            rate = candidates * len(trials) / (time.perf_counter() - begin)
            rows.append(("time (est.)",
                         f"{per_sample * n / rate:.1f} s at {rate:.0f} forwards/s on {cfg.device}"))
        return rows
