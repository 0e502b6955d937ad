"""extract: run a dataset through a diffusion model once and store block activations.

For every (image, view) sample and every requested timestep: x_0 = preprocess(image)
(flipped for odd views when ``flip``; with ``augment``, views 1..k-1 are random crops
and flips drawn from (seed, image_id, view), ``pipeline.datasets.augment``), eps =
``pipeline.noise.sample_noise(seed, image_id, view, t)``, x_t = q(x_t | x_0), one
forward with hooks on the requested blocks that stops after the last of them,
optional pooling on the device, cast to the storage dtype with an inf/NaN check,
copy to (pinned) host memory, and a background thread writes each finished unit
(with the crops its views drew) while the device computes the next.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pipeline import faults, store
from pipeline.datasets import DatasetConfig, open_dataset
from pipeline.datasets.augment import AugmentedImages, AugmentSpec, view_flipped
from pipeline.datasets.torch_data import DecodeAhead, Decoded, PreprocessedImages, load_images
from pipeline.errors import ConfigError, DatasetError, DiffprobeError
from pipeline.hooks import capture, run_truncated
from pipeline.store.describe import human_bytes
from pipeline.store.location import free_bytes
from pipeline.models.fingerprint import model_fingerprint
from pipeline.models import (TORCH_DTYPES, Condition, ModelAdapter, ModelConfig, planning_device, prepared_model,
                             resolve_device)
from pipeline.noise import NOISE_SCHEME, batch_noise
from pipeline.workflow.config import device_field, not_hashed
from pipeline.workflow.stage import RunContext, Stage, prepared_value, without_listing


class NonFiniteError(DiffprobeError):
    """A block produced inf/NaN in the storage dtype."""


@dataclass(frozen=True)
class PoolSpec:
    """On-device adaptive pooling of each block's map to size x size."""

    size: int
    mode: Literal["avg", "max"] = "avg"

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"pool.size must be >= 1, got {self.size}")


@dataclass(frozen=True)
class ExtractConfig:
    """Parameters of the extract stage (see README, "extract")."""

    model: ModelConfig
    dataset: DatasetConfig
    blocks: tuple[str | int, ...] | str = "all"
    timesteps: tuple[int, ...] = (100,)
    seed: int = 0
    batch_size: int = not_hashed(32)
    device: str = device_field("cpu")
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    compute_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    pool: PoolSpec | None = None
    # YAML's bare `null` means the null class too (it is what people type).
    conditioning: Literal["none", "class", "null", "null_class"] | None = "none"
    views: int = 1
    flip: bool = False
    augment: AugmentSpec | None = None
    unit_samples: int | None = None
    num_workers: int = not_hashed(0)
    decode_threads: int | None = not_hashed(None)
    torch_threads: int | None = not_hashed(None)
    compression: store.Compression = field(default_factory=store.Compression)

    def __post_init__(self):
        if self.conditioning in (None, "null_class"):
            object.__setattr__(self, "conditioning", "null")
        if isinstance(self.blocks, str) and self.blocks != "all":
            object.__setattr__(self, "blocks", (self.blocks,))
        for name in ("batch_size", "views", "torch_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"'{name}' must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "decode_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"'{name}' must be >= 0, got {getattr(self, name)}")
        if not self.timesteps:
            raise ValueError("'timesteps' must list at least one timestep")
        if self.augment is not None:
            if self.views < 2:
                raise ValueError(f"'augment' draws views 1..views-1 (view 0 is the centre crop): set views >= 2, "
                                 f"got {self.views}")
            if self.flip:
                raise ValueError("'flip' (odd views flipped) and 'augment' (random flips) exclude each other: "
                                 "drop flip, or set augment.flip")


    def cpu_settings(self, device_type: str, cores: int | None = None) -> tuple[int, int]:
        """``(torch threads, decode threads)``: the configured values, or defaults from the cores.

        The forward takes all cores but one when there are two or more (the writer
        thread compresses and fsyncs on the one left: on 2 cores, two torch threads
        ran at 0.86-0.88 of a bare forward, one at 0.95-0.99, see
        benchmarks/RESULTS.md). One thread decodes the next unit on a CPU device
        (small next to the forward's cost); on a GPU the CPU decodes for the device,
        so up to half the cores (at most 8) decode. ``cores`` defaults to the cores
        this process may run on (``os.sched_getaffinity``).
        """
        cores = available_cores() if cores is None else cores
        spare = max(1, cores - 1)
        torch_threads = self.torch_threads or spare
        if self.decode_threads is not None:
            return torch_threads, self.decode_threads
        return torch_threads, 1 if device_type == "cpu" else max(1, min(8, cores // 2))


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stored_shape(shape: tuple[int, int, int], pool: PoolSpec | None) -> tuple[int, int, int]:
    """(C, H, W) of a block's map as stored: ``pool.size`` per side when pooled (a map
    smaller than that is upsampled, see ``unpooled_note``)."""
    c, h, w = shape
    return (c, pool.size, pool.size) if pool else (c, h, w)


def unpooled_note(shapes: dict[str, tuple[int, int, int]], pool: PoolSpec | None) -> str | None:
    """The warning line naming blocks whose (C, H, W) map is smaller than ``pool.size``, or None.

    One ``pool.size`` serves every block of the stage, and the templates' attention
    heads read such blocks at that size, so it is a warning, not a refusal (the pool
    stage, whose sizes are per store, refuses)."""
    small = [f"{name} ({s[1]}x{s[2]}, {pool.size ** 2 / (s[1] * s[2]):g}x the bytes)"
             for name, s in shapes.items() if pool and min(s[1:]) < pool.size]
    if not small:
        return None
    return (f"warning: pool.size {pool.size} upsamples {', '.join(small)}: repeated values, no new "
            "information; extract such blocks in a stage of their own with a smaller pool.size if that is not "
            "what you want")


# ----------------------------------------------------------------- samples & units


def sample_table(reader, views: int, flip: bool, augment: AugmentSpec | None = None,
                 seed: int = 0) -> store.SampleTable:
    """Samples in store order, ``views`` per image; with ``augment`` the flips are drawn
    per (seed, image_id, view) and crop coordinates await the units (-1 until written)."""
    records = reader.records
    n = len(records) * views
    if augment:
        flips = np.fromiter((view_flipped(augment, seed, image_id, v) for image_id, _ in records.pairs()
                             for v in range(views)), dtype=bool, count=n)
    else:
        flips = np.tile(np.arange(views) % 2 == 1, len(records)) & bool(flip)
    crops = None if augment is None else np.full((n, len(store.CROP_COORDS)), -1, dtype=np.int32)
    return store.SampleTable(np.repeat(records.ids, views), np.tile(np.arange(views, dtype=np.int32), len(records)),
                             flips, np.repeat(records.labels, views), crops)


# ----------------------------------------------------------------- compute


class Extractor:
    """Holds the model, dataset and settings; computes one unit at a time."""

    def __init__(self, cfg: ExtractConfig, device: str | None = None, prepared: dict | None = None):
        # ``device`` overrides cfg.device (validate and plan build the model on the CPU,
        # in float32, where the configured device is absent). ``prepared``: the run's
        # ``RunContext.prepared``, whose dataset and model are reused where they match.
        self.cfg = cfg
        self.adapter: ModelAdapter = prepared_model(cfg.model, device or cfg.device,
                                                    cfg.compute_dtype if device is None else "float32", prepared)
        self.device = self.adapter.device
        self.blocks = self.adapter.resolve_blocks(cfg.blocks)
        self.timesteps = self.adapter.check_timesteps(list(cfg.timesteps))
        self.timestep_free = not self.adapter.takes_timestep
        if cfg.conditioning == "none" and self.adapter.label_conditional:
            raise ConfigError(
                "the model is class-conditional: set conditioning: class (image labels) or null (null class)"
            )
        if cfg.conditioning in ("class", "null") and not self.adapter.label_conditional:
            raise ConfigError(f"conditioning {cfg.conditioning!r} needs a class-conditional model; "
                              "this one takes no class labels: set conditioning: none")
        if cfg.conditioning == "null" and self.adapter.null_class is None:
            raise ConfigError("conditioning 'null' needs model.null_class (the null class embedding index), "
                              "e.g. model: {..., null_class: 10}")
        self.reader = prepared_value(prepared, "reader", lambda: open_dataset(cfg.dataset))
        self.prep = self.adapter.preprocessing.with_resize(cfg.dataset.resize)
        self.samples = sample_table(self.reader, cfg.views, cfg.flip, cfg.augment, cfg.seed)
        self.block_shapes = {b.name: self._stored_shape(b.shape) for b in self.blocks}
        self.layout = store.make_layout(len(self.samples.image_id), self.block_shapes, self.timesteps,
                                        cfg.dtype, cfg.unit_samples)
        self.storage_dtype = TORCH_DTYPES[cfg.dtype]
        self.pinned = self.device.type == "cuda"
        self.strict = False

    def _stored_shape(self, shape):
        return stored_shape(shape, self.cfg.pool)

    def unpooled_note(self) -> str | None:
        """One warning line naming the blocks ``pool.size`` upsamples, or None."""
        return unpooled_note({b.name: b.shape for b in self.blocks}, self.cfg.pool)

    def _transform(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        fmap = self.adapter.feature_map(name, tensor)
        if self.cfg.pool:
            pool = torch.nn.functional.adaptive_avg_pool2d if self.cfg.pool.mode == "avg" \
                else torch.nn.functional.adaptive_max_pool2d
            fmap = pool(fmap.float(), self.cfg.pool.size)
        return fmap.to(self.storage_dtype)

    def condition(self, labels: list[int]) -> Condition:
        kind = self.cfg.conditioning
        if kind == "class":
            return Condition("class", labels=torch.tensor(labels, dtype=torch.long, device=self.device))
        if kind == "null":
            return Condition("null", labels=torch.full((len(labels),), self.adapter.null_class or 0,
                                                       dtype=torch.long, device=self.device))
        return Condition("none")

    def image_dataset(self) -> PreprocessedImages:
        """The dataset's images as the model takes them (all views of an image, with ``augment``)."""
        use_bbox = self.cfg.dataset.crop == "bbox"
        if self.cfg.augment is None:
            return PreprocessedImages(self.reader, self.prep, use_bbox)
        return AugmentedImages(self.reader, self.prep, self.cfg.augment, self.cfg.seed, self.cfg.views, use_bbox)

    def unit_images(self, unit: int) -> list[int]:
        """Dataset positions of the images whose views fill ``unit``."""
        start, stop = self.layout.unit_range(unit)
        return sorted({s // self.cfg.views for s in range(start, stop)})

    def decode_ahead(self, units: list[int]) -> DecodeAhead:
        """The images of ``units``, in that order, decoded one unit ahead of the forward."""
        _, threads = self.cfg.cpu_settings(self.device.type)
        return DecodeAhead(self.image_dataset(), [self.unit_images(u) for u in units], threads=threads,
                           workers=self.cfg.num_workers)

    @torch.no_grad()
    def compute_unit(self, unit: int, images: Decoded | None = None
                     ) -> tuple[dict[str, np.ndarray], dict[int, str], dict[str, np.ndarray]]:
        """All blocks x timesteps for one unit.

        ``images``: the unit's decoded images (:meth:`decode_ahead`); None decodes them here.
        Returns {block: (U, T, C, H, W)}, failures {position in unit: reason}, and the
        crops the unit's views drew ({``store.CROP_COORDS`` name: (U,) int32}; empty
        without ``augment``).
        """
        cfg, lay = self.cfg, self.layout
        start, stop = lay.unit_range(unit)
        views = cfg.views
        if images is None:
            images = load_images(self.reader, self.prep, self.unit_images(unit), cfg.num_workers,
                                 dataset=self.image_dataset())
        arrays, read_failures = images
        coords = {}
        if cfg.augment is not None:
            boxes = np.full((stop - start, len(store.CROP_COORDS)), -1, dtype=np.int32)
            for s in range(start, stop):
                if s // views in arrays:
                    boxes[s - start] = arrays[s // views][1][s % views]
            coords = dict(zip(store.CROP_COORDS, boxes.T))
        if read_failures and self.strict:
            index, reason = next(iter(read_failures.items()))
            raise DatasetError(f"cannot read image {str(self.reader.records.ids[index])!r}: {reason} (--strict)")
        n_t = len(self.timesteps)
        np_dtype = store.STORAGE_DTYPES[cfg.dtype]
        out = {b.name: np.full((stop - start, n_t, *self.block_shapes[b.name]), np.nan, dtype=np_dtype)
               for b in self.blocks}
        failed = {s - start: read_failures[s // views] for s in range(start, stop) if s // views in read_failures}
        pairs = [(s, ti) for s in range(start, stop) if (s - start) not in failed for ti in range(n_t)]
        names = [b.name for b in self.blocks]
        last = names[-1]
        x0_cache: dict[int, torch.Tensor] = {}
        for b0 in range(0, len(pairs), cfg.batch_size):
            batch = pairs[b0 : b0 + cfg.batch_size]
            x0 = torch.stack([self._x0(s, arrays, x0_cache) for s, _ in batch]).to(self.device)
            ts = [self.timesteps[ti] for _, ti in batch]
            t = torch.tensor(ts, dtype=torch.long, device=self.device)
            if self.timestep_free:
                x_t = x0
            else:
                eps = batch_noise(cfg.seed, [self.samples.image_id[s] for s, _ in batch],
                                  [self.samples.view[s] for s, _ in batch], ts, x0.shape[1:])
                x_t = self.adapter.add_noise(x0, eps.to(self.device), t)
            cond = self.condition([self.samples.label[s] for s, _ in batch])
            with capture(self.adapter.module, names, stop_after=last, transform=self._transform) as got:
                run_truncated(lambda: self.adapter.run(x_t, t, cond))  # casts x_t for the model's precision
            self._check_finite(got, batch)
            host = {name: self._to_host(got[name]) for name in names}
            if self.pinned:
                torch.cuda.current_stream(self.device).synchronize()
            for name in names:
                values = host[name].float().numpy() if host[name].dtype == torch.bfloat16 else host[name].numpy()
                for row, (s, ti) in enumerate(batch):
                    out[name][s - start, ti] = values[row]
        return out, failed, coords

    def _x0(self, s: int, arrays, cache) -> torch.Tensor:
        if s not in cache:
            image = arrays[s // self.cfg.views]
            # with augment an image's entry holds all its views (and their crop boxes)
            x = torch.from_numpy(image[0][s % self.cfg.views] if self.cfg.augment else image)
            if self.samples.flipped[s]:
                x = torch.flip(x, dims=[-1])
            cache[s] = self.adapter.encode(x[None].to(self.device))[0].float()
        return cache[s]

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.pinned:
            return tensor.cpu()
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return host

    def _check_finite(self, got: dict[str, torch.Tensor], batch) -> None:
        for name, tensor in got.items():
            bad = ~torch.isfinite(tensor.float()).flatten(1).all(dim=1)
            if bool(bad.any()):
                rows = bad.nonzero().flatten().tolist()
                ids = sorted({self.samples.image_id[batch[r][0]] for r in rows})
                ts = sorted({self.timesteps[batch[r][1]] for r in rows})
                raise NonFiniteError(
                    f"block {name!r} produced inf/NaN in {self.cfg.dtype} at timestep(s) {ts} for sample(s) "
                    f"{', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''} ({len(ids)} in all); "
                    f"store with dtype: float32 (or bfloat16), nothing was written for this unit"
                )

    def provenance(self) -> dict:
        a = self.adapter
        return {
            "model": a.provenance(),
            "alphas_cumprod": a.alphas_cumprod.tolist(),
            "noise": {"scheme": NOISE_SCHEME, "seed": self.cfg.seed,
                      "function": "pipeline.noise.sample_noise(seed, image_id, view, timestep, shape)",
                      "applied": not self.timestep_free},
            "preprocessing": self.prep.to_attrs() | {"crop": self.cfg.dataset.crop},
            "conditioning": self.cfg.conditioning,
            "dtype": self.cfg.dtype,
            "compute_dtype": self.cfg.compute_dtype,
            "device": _device_name(self.device),
            "pool": None if self.cfg.pool is None else {"size": self.cfg.pool.size, "mode": self.cfg.pool.mode},
            "views": self.cfg.views,
            "flip": self.cfg.flip,
            "augment": None if self.cfg.augment is None else self.cfg.augment.to_attrs(self.prep.size),
            "dataset": {"reader": self.cfg.dataset.reader, "root": self.cfg.dataset.root,
                        "split": self.cfg.dataset.split, "n_images": len(self.reader.records)},
            "block_info": [{"name": b.name, "position": b.position, "shape": list(b.shape),
                            "paper_number": b.paper_number} for b in self.blocks],
        }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"


# ----------------------------------------------------------------- writing


def extract_units(ex: Extractor, output: Path, units: list[int], desc: str = "extract", progress: bool = True,
                  claims=None) -> int:
    """Compute ``units`` on the device while a background thread writes the previous one.

    With ``claims`` (a ``UnitClaims``) each unit is taken under a lease first and
    skipped if another process holds it; returns the number of units computed.
    """
    from tqdm.auto import tqdm

    lay = ex.layout
    root = store.open_root(output, mode="r+")

    def write(unit, payload):
        if claims is None:
            store.write_unit(root, lay, unit, *payload)
            return
        if claims.still_holds(unit):  # fenced twice: before the data, and before done
            store.write_unit(root, lay, unit, *payload, fence=lambda: claims.still_holds(unit))
        claims.finish(unit)

    writer = store.UnitWriter(write)
    total = sum(lay.unit_range(u)[1] - lay.unit_range(u)[0] for u in units)
    taken = units if claims is None else claims.take(units, lambda u: store.unit_status(output)[u])
    computed = 0
    n_threads, _ = ex.cfg.cpu_settings(ex.device.type)
    # Images decode one unit ahead in the order of ``units``; a unit another process took
    # is skipped (its images were decoded for nothing, the rare case).
    decoder = ex.decode_ahead(units)
    decoded = iter(decoder)
    position = 0
    try:
        with torch_threads(n_threads), tqdm(total=total, unit="sample", desc=desc, disable=not progress) as bar:
            for unit in taken:
                while units[position] != unit:
                    next(decoded)
                    position += 1
                images = next(decoded)
                position += 1
                faults.unit_delay()
                writer.put(unit, ex.compute_unit(unit, images))
                computed += 1
                start, stop = lay.unit_range(unit)
                bar.update(stop - start)
    finally:
        decoded.close()
        decoder.close()
        writer.close()
    return computed


# ----------------------------------------------------------------- stage


class ExtractStage(Stage):
    kind = "extract"
    shardable = True
    Config = ExtractConfig
    output_suffix = ".zarr"

    def fingerprint(self, cfg: ExtractConfig, base_dir: Path) -> dict:
        return model_fingerprint(cfg.model)

    def dataset_records(self, cfg: ExtractConfig, prepared: dict | None = None) -> Records:
        return prepared_value(prepared, "reader", lambda: open_dataset(cfg.dataset)).records

    def validate(self, cfg: ExtractConfig, ctx: RunContext) -> None:
        # The device first, as run meets it first (load_model resolves it before building).
        resolve_device(cfg.device)
        Extractor(cfg, device="cpu", prepared=ctx.prepared)  # run reuses its dataset (and a CPU float32 model)

    def stored_shapes(self, cfg: ExtractConfig, prepared: dict | None = None) -> dict[str, tuple[int, int, int]]:
        """{block: (C, H, W) as stored} that ``cfg`` will write, from the model built on the CPU."""
        adapter = prepared_model(cfg.model, "cpu", "float32", prepared)
        blocks = adapter.resolve_blocks(cfg.blocks)
        return {b.name: stored_shape(b.shape, cfg.pool) for b in blocks}

    def run(self, cfg: ExtractConfig, ctx: RunContext) -> None:
        # every check that can fail on the config runs before the store exists; the dataset
        # is listed again (rows are positions in the listing: a change since the run began
        # must be refused before a row is written), validate's CPU model is reused
        ex = Extractor(cfg, prepared=without_listing(ctx.prepared))
        ex.strict = ctx.strict
        lay = ex.layout
        if store.read_attrs(ctx.output) is None:
            attrs = ctx.base_attrs() | {"provenance": ex.provenance()}
            store.create_store(ctx.output, lay, ex.samples, ex.reader.class_names, attrs, cfg.compression)
        ctx.check_same_samples(ex.samples.image_id)
        todo = ctx.pending_units(lay.n_units)
        if ex.unpooled_note():
            ctx.log(ex.unpooled_note())
        ctx.log(
            f"{lay.n_samples} samples x {len(ex.timesteps)} timesteps x {len(ex.blocks)} blocks; "
            f"{lay.n_units} units of {lay.unit_samples}; {len(todo)} to do"
            + ctx.shard_note()
        )
        units = ctx.unit_claims()
        computed = extract_units(ex, ctx.output, todo, desc=ctx.entry.name, progress=ctx.progress, claims=units)
        ctx.report_skipped(computed, units)
        ctx.finalize_store()

    def planned_shape(self, cfg: ExtractConfig, entry, workflow, prepared_by_stage=None):
        # validate's CPU model and listing when this run has them; a copy, so that a model
        # built here for a stage that will not run (--only) is not held for the whole run
        prepared = dict(prepared_by_stage.get(entry.name, {})) if prepared_by_stage is not None else None
        return _store_shape(Extractor(cfg, device="cpu", prepared=prepared))

    def plan(self, cfg: ExtractConfig, ctx: RunContext) -> list[tuple[str, str]]:
        from pipeline.estimate import gpu_projection, measure, remember_shape

        device, absent = planning_device(cfg.device)  # a login node plans a GPU workflow on the CPU
        ex = Extractor(cfg, device=device)
        remember_shape(ctx.workflow, ctx.entry.name, _store_shape(ex))  # later stages plan from it
        lay = ex.layout
        n_t = len(ex.timesteps)
        pairs = lay.n_samples * n_t
        passes = sum(math.ceil((lay.unit_range(u)[1] - lay.unit_range(u)[0]) * n_t / cfg.batch_size)
                     for u in range(lay.n_units))
        # Measure real batches (load, noise, forward, host copy) at this batch size: codec
        # ratio and throughput, warm-up first and the median of several. Without the
        # device: one cold sample-timestep on the CPU (a login node's CPU time says little
        # about the GPU), and the GPU projection from the forward's FLOPs, counted on meta.
        timesteps = list(ex.timesteps)
        if absent:
            ex.timesteps = ex.timesteps[:1]
        probe_unit_samples = 1 if absent else min(lay.n_samples, max(1, cfg.batch_size // n_t))
        probe_layout = store.make_layout(probe_unit_samples, ex.block_shapes, ex.timesteps, cfg.dtype,
                                         unit_samples=probe_unit_samples)
        ex.layout = probe_layout
        batch: dict = {}

        def one_batch():
            batch["data"] = ex.compute_unit(0)[0]

        if absent:
            sample = measure(one_batch, warmup=0, repeats=1, budget_s=0.0)
            per_pair = sample.seconds
            flops = ex.adapter.forward_flops(ex.blocks[-1].name)
        elif ex.device.type == "cpu":
            # CPU time on one thread, over the run's threads (linear scaling): the wall clock
            # moved 5x between plans of two identical models on a shared machine
            run_threads = cfg.cpu_settings(ex.device.type)[0]
            sample = measure(one_batch, warmup=1, repeats=5, budget_s=10.0, threads=1)
            per_pair = sample.seconds / run_threads / max(1, probe_unit_samples * n_t)
        else:
            sample = measure(one_batch, warmup=1, repeats=5, budget_s=10.0)
            per_pair = sample.seconds / max(1, probe_unit_samples * n_t)
        compressed = 0
        for name, arr in batch["data"].items():
            one = store.Layout(lay.n_samples, lay.unit_samples, lay.timesteps, {name: lay.blocks[name]}, lay.dtype)
            compressed += store.estimate_compressed_bytes(one, arr.reshape(-1, *arr.shape[2:]), cfg.compression)
        raw = lay.bytes_per_sample() * lay.n_samples
        free = free_bytes(ctx.output)
        space = (f"unknown on object storage ({ctx.output}); check the bucket's quota" if free is None else
                 f"{human_bytes(free)} at {ctx.output.parent}" + ("  ** NOT ENOUGH **" if compressed > free else ""))
        measured = f"{1 / per_pair:.3g} sample-timesteps/s ({sample.describe()}" + (
            f", over the run's {torch.get_num_threads()} threads)" if ex.device.type == "cpu" and not absent else ")")
        rows = [
            ("images", f"{len(ex.reader.records)} ({cfg.dataset.reader}/{cfg.dataset.split})"),
            ("samples", f"{lay.n_samples} (views={cfg.views}"
                        + (f"; 1..{cfg.views - 1} {cfg.augment.kind}" if cfg.augment else "") + ")"),
            ("timesteps", ", ".join(map(str, timesteps))),
            ("blocks", "; ".join(f"{n} {tuple(s)}" for n, s in ex.block_shapes.items())),
            *([("note", ex.unpooled_note())] if ex.unpooled_note() else []),
            ("units", f"{lay.n_units} x {lay.unit_samples} samples"),
            ("forward passes", f"{passes} (batch {cfg.batch_size}; {pairs} sample-timesteps)"),
            ("bytes raw", human_bytes(raw)),
            ("bytes on disk (est.)", f"{human_bytes(compressed)} (ratio {raw / max(1, compressed):.2f} measured on one batch)"),
            ("free space", space),
            ("time (est.)", f"not measured: {absent}; the CPU here: {_duration(per_pair * pairs)} at {measured}"
                            if absent else f"{_duration(per_pair * pairs)} at {measured} on {cfg.device}"),
        ]
        if absent:
            rows.append(("GPU time (proj.)", gpu_projection(flops * pairs)))
        return rows


def _store_shape(ex: Extractor):
    """The ``pipeline.estimate.StoreShape`` the extractor's store will have."""
    from pipeline.estimate import StoreShape

    lay = ex.layout
    return StoreShape(lay.n_samples, lay.unit_samples, tuple(ex.timesteps),
                      {(name, shape[1]): tuple(shape) for name, shape in ex.block_shapes.items()},
                      ex.cfg.dtype, len(ex.reader.class_names), len(ex.reader.records), ex.cfg.views)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
