"""pool: adaptive average / max pooling of an extraction store's maps to p x p.

Input: an ``extract`` stage's store. Output: a store of the same format family
(``pipeline/store/layout.py``: same root coordinates, ``done`` mask, write protocol),
holding one array per (block, size)::

    blocks/<block>/p<size>/activations   (sample, timestep, channel, p, p)

(``pipeline.store.slices.pooled_key`` spells the name). Root attrs add
``pooled = {mode, sizes, blocks}`` and ``source = {path, stage, stage_hash}``
linking to the extraction store; its model/noise provenance is copied.

Chunks are ``(n, 1, C, p, p)`` with n large (a few MiB per chunk), so a training
read of one (block, size, timestep) slice is a sequential scan of few objects;
a unit is the source's unit, so each task reads whole source shards.

Work: one dask task per unit. The task opens the source itself with xarray,
selects its sample range and the requested timesteps, pools chunk by chunk
(``pipeline.probing.pooling.adaptive_pool`` over each source chunk: one timestep,
the chunk's samples), and writes the unit (``store.write_unit``). Memory per task
is one pooled unit plus a few source chunks, whatever the dataset size. Samples
that failed in the source (``done`` = 2) stay failed, with the same reason;
resume skips units already done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline import faults, store
from pipeline.errors import ConfigError, DiffprobeError, StoreError, select_or_error
from pipeline.store.checks import Integrity
from pipeline.store.location import as_location
from pipeline.probing.pooling import check_pool_sizes
from pipeline.workflow.stage import RunContext, Stage, input_field


#: Said when the input stage cannot tell its shapes before it has run.
NOT_ESTIMATED = "not estimated (the input stage cannot say its shapes before it runs)"


@dataclass(frozen=True)
class PoolConfig:
    """Parameters of the pool stage.

    input: an extract stage. sizes: output sides p (adaptive: any p >= 1, bins
    as torch's ``adaptive_*_pool2d``). mode: avg or max. blocks / timesteps: subsets
    of the source's (default all). dtype: storage dtype of the pooled maps.
    unit_samples: samples per unit (default: the source's unit). compression: codecs
    (``store.Compression``; default no compressor, crc32c kept): pooled maps barely
    compress, and probes decode them every epoch (benchmarks/RESULTS.md, "Probe").
    """

    input: str = input_field()
    sizes: tuple[int, ...] = (1, 2, 4)
    mode: Literal["avg", "max"] = "avg"
    blocks: tuple[str, ...] | str = "all"
    timesteps: tuple[int, ...] | str = "all"
    dtype: Literal["float16", "float32"] = "float16"
    unit_samples: int | None = None
    compression: store.Compression = field(default_factory=store.Compression)

    def __post_init__(self):
        if not self.sizes or any(s < 1 for s in self.sizes) or len(set(self.sizes)) != len(self.sizes):
            raise ValueError(f"'sizes' must list distinct integers >= 1, got {list(self.sizes)}")
        for name in ("blocks", "timesteps"):
            if getattr(self, name) != "all" and isinstance(getattr(self, name), str):
                raise ValueError(f"'{name}' must be a list or 'all', got {getattr(self, name)!r}")
        if self.unit_samples is not None and self.unit_samples < 1:
            raise ValueError(f"'unit_samples' must be >= 1, got {self.unit_samples}")


@dataclass(frozen=True)
class PoolTask:
    """One unit of pooling; only locations (a URL's carry its storage options) and selectors
    travel to the worker, which opens the stores itself."""

    name: str
    source: Path
    output: Path
    unit: int
    blocks: tuple[str, ...]
    timesteps: tuple[int, ...]
    sizes: tuple[int, ...]
    mode: str


def pool_unit(task: PoolTask) -> dict:
    """Pool one unit of the source into the output store (runs on a worker).

    Returns ``{"unit", "samples", "bytes_read"}`` (decoded source bytes).
    """
    from pipeline.store.slices import pooled_key

    faults.unit_delay()
    layout = store.load_layout(task.output)
    start, stop = layout.unit_range(task.unit)
    src_root = store.open_root(task.source)
    checks = Integrity(src_root, task.source)
    done = checks.done()[start:stop]
    if (done == store.PENDING).any():
        raise StoreError(
            f"source {task.source} has unwritten samples in {start}..{stop - 1}; finish its extract stage"
        )
    written = done == store.WRITTEN
    failure = src_root["failure"][start:stop]
    storage = store.STORAGE_DTYPES[layout.dtype]
    data, bytes_read = {}, 0
    stored_t = [int(t) for t in src_root["timestep"][:]]
    t_index = [stored_t.index(int(t)) for t in task.timesteps]
    for block in task.blocks:
        array_path = f"blocks/{block}/activations"
        checks.check_present([array_path], start, stop)  # a lost shard is not NaN maps
        try:
            pooled, nbytes = pool_block(checks.array(array_path), start, stop, t_index, task.sizes, task.mode)
        except DiffprobeError:
            raise
        except Exception as exc:  # noqa: BLE001 -- a codec failure: name the damaged chunk
            raise checks.damage_error(src_root[array_path], (slice(start, stop),), exc) from None
        bytes_read += nbytes
        for size, values in zip(task.sizes, pooled):
            values = values.astype(storage, copy=False)
            if not np.isfinite(values[written]).all():
                raise StoreError(
                    f"pooling block {block!r} to {size}x{size} gave inf/NaN in {layout.dtype} for samples "
                    f"{start}..{stop - 1}; use dtype: float32"
                )
            data[pooled_key(block, size)] = values
    failed = {int(i): str(failure[i]) or "failed in the source store"
              for i in np.flatnonzero(done == store.FAILED)}
    store.write_unit(store.open_root(task.output, mode="r+"), layout, task.unit, data, failed)
    return {"unit": task.unit, "samples": stop - start, "bytes_read": int(bytes_read)}


def pool_block(src, start: int, stop: int, t_index: list[int], sizes, mode: str) -> tuple[list[np.ndarray], int]:
    """Read samples ``start:stop`` at timesteps ``t_index`` of one block's array and pool them.

    ``src``: a zarr array ``(N, T, C, H, W)`` (or any array with ``.chunks``). Returns one
    float32 ``(stop - start, len(t_index), C, p, p)`` array per size, and the bytes decoded.
    Pooled one source chunk (its samples, one timestep) at a time, so the float32
    temporaries stay at a chunk's size; numpy only (an in-process task imports no dask).
    """
    from pipeline.probing.pooling import adaptive_pool

    # The unit's own chunks only: opening the whole block lazily (xr.open_zarr) built a
    # graph of every chunk and decoded every image id, once per unit: O(N) per task.
    # basic slices: zarr 3.1's orthogonal selection of a timestep list is ~40x slower here
    values = src[start:stop] if t_index == list(range(src.shape[1])) else \
        np.stack([src[start:stop, i] for i in t_index], axis=1)
    rows = src.chunks[0]
    pooled = []
    for size in sizes:
        out = np.empty(values.shape[:3] + (size, size), dtype=np.float32)
        for a in range(0, len(values), rows):
            for t in range(values.shape[1]):
                out[a:a + rows, t:t + 1] = adaptive_pool(values[a:a + rows, t:t + 1], size, mode)
        pooled.append(out)
    return pooled, int(values.nbytes)


def _select(requested, available: list, what: str, source: Path) -> list:
    return select_or_error(requested, available, what, str(source), "pool")


class PoolStage(Stage):
    kind = "pool"
    Config = PoolConfig
    output_suffix = ".zarr"

    def _plan(self, cfg: PoolConfig, ctx: RunContext):
        source = as_location(ctx.inputs["input"])
        attrs = store.read_attrs(source) or {}
        if attrs.get("pooled"):
            raise ConfigError(f"pool: input {source} is already pooled; pool an extract stage's store")
        src_layout = store.load_layout(source)
        blocks = _select(cfg.blocks, list(src_layout.blocks), "block", source)
        timesteps = _select(cfg.timesteps, list(src_layout.timesteps), "timestep", source)
        check_pool_sizes("pool: size", cfg.sizes, {b: src_layout.blocks[b] for b in blocks})
        from pipeline.store.slices import pooled_key

        out_blocks = {pooled_key(b, s): (src_layout.blocks[b][0], s, s) for b in blocks for s in cfg.sizes}
        layout = store.make_layout(src_layout.n_samples, out_blocks, timesteps, cfg.dtype,
                                   unit_samples=cfg.unit_samples or src_layout.unit_samples)
        return source, attrs, src_layout, blocks, timesteps, layout

    def validate(self, cfg: PoolConfig, ctx: RunContext) -> None:
        source = as_location(ctx.inputs["input"])
        if store.read_attrs(source) is not None:
            self._plan(cfg, ctx)
            return
        # Not written yet: the shapes the input stage will store (extract: from its model on the CPU).
        upstream = ctx.workflow.stage(ctx.entry.inputs["input"])
        # the input's prepared share: its validate built the model these shapes come from
        shapes = upstream.stage_class().stored_shapes(upstream.config, ctx.prepared_for(upstream.name))
        if shapes is not None:
            blocks = _select(cfg.blocks, list(shapes), "block", source)
            check_pool_sizes("pool: size", cfg.sizes, {b: shapes[b] for b in blocks})

    def prepare(self, cfg: PoolConfig, ctx: RunContext) -> list[PoolTask]:
        """Create the output store (once) and return a task per unit not yet done."""

        source, src_attrs, src_layout, blocks, timesteps, layout = self._plan(cfg, ctx)
        if store.read_attrs(ctx.output) is None:
            root = store.open_root(source)
            samples = store.read_sample_table(root)
            attrs = ctx.base_attrs() | {
                "source": {"path": str(source), "stage": src_attrs.get("stage_name"),
                           "stage_hash": src_attrs.get("stage_hash")},
                "pooled": {"mode": cfg.mode, "sizes": sorted(cfg.sizes), "blocks": blocks},
                "provenance": src_attrs.get("provenance"),
            }
            store.create_store(ctx.output, layout, samples, [str(c) for c in root["class_name"][:]], attrs,
                               cfg.compression)
        ctx.check_same_config()
        done = store.unit_status(ctx.output)
        return [
            PoolTask(f"unit-{u}", source, ctx.output, u, tuple(blocks), tuple(timesteps),
                     tuple(cfg.sizes), cfg.mode)
            for u in range(layout.n_units) if not done[u]
        ]

    def run(self, cfg: PoolConfig, ctx: RunContext) -> None:
        _, _, src_layout, blocks, timesteps, layout = self._plan(cfg, ctx)
        tasks = self.prepare(cfg, ctx)
        ctx.log(f"{len(blocks)} block(s) x {len(timesteps)} timestep(s) -> {cfg.mode} pool to "
                f"{', '.join(f'{s}x{s}' for s in cfg.sizes)}; "
                f"{layout.n_units} units of {layout.unit_samples}; "
                f"{len(tasks)} to do")
        if tasks:
            item = np.dtype(store.STORAGE_DTYPES[src_layout.dtype]).itemsize
            per_sample = len(timesteps) * sum(int(np.prod(src_layout.blocks[b])) for b in blocks) * item
            with ctx.cluster_session() as cluster:
                outcomes = cluster.run_tasks(pool_unit, tasks, log=ctx.log,
                                             work_bytes=per_sample * layout.unit_samples * len(tasks))
            failed = [o for o in outcomes if not o.ok]
            read = sum(o.result["bytes_read"] for o in outcomes if o.ok)
            ctx.log(f"read {read / 2**20:.1f} MiB of maps in {len(outcomes) - len(failed)} unit(s)")
            if failed:
                raise StoreError(
                    f"pool: {len(failed)} unit(s) failed twice ({failed[0].name}: {failed[0].error}); "
                    f"finished units are kept: re-run to resume"
                )
        store.finalize(ctx.output)

    def planned_shape(self, cfg: PoolConfig, entry, workflow, prepared_by_stage=None):
        from dataclasses import replace

        from pipeline.estimate import input_shape

        source = input_shape(workflow, entry.inputs["input"], prepared_by_stage)
        if source is None:
            return None
        blocks = list(dict.fromkeys(b for b, _ in source.slices))
        if cfg.blocks != "all":
            blocks = [b for b in blocks if b in cfg.blocks]
        timesteps = source.timesteps if cfg.timesteps == "all" else tuple(cfg.timesteps)
        channels = {b: shape[0] for (b, _), shape in source.slices.items()}
        return replace(source, unit_samples=cfg.unit_samples or source.unit_samples, timesteps=timesteps,
                       slices={(b, p): (channels[b], p, p) for b in blocks for p in sorted(cfg.sizes)},
                       dtype=cfg.dtype, pooled=True, planned=True)

    def plan(self, cfg: PoolConfig, ctx: RunContext) -> list[tuple[str, str]]:
        source = as_location(ctx.inputs["input"])
        if store.read_attrs(source) is None:
            self.validate(cfg, ctx)
        work = self._work(cfg, ctx)
        if work is None:
            return [("input", f"{source} (not written yet: plan it after its stage has run)"),
                    ("time (est.)", NOT_ESTIMATED)]
        written, block_shapes, timesteps, layout, dtype = work
        read = layout.n_samples * len(timesteps) * sum(int(np.prod(s)) for s in block_shapes.values()) \
            * np.dtype(store.STORAGE_DTYPES[dtype]).itemsize
        from pipeline.estimate import cluster_workers, plan_rows

        workers, note = cluster_workers(ctx.workflow.cluster)
        rests = ("decode + pool of the input's first finished unit here; writes not included" if written
                 else "pooling compute on synthetic maps of the planned shapes; reads and writes not included")
        return [
            ("input", str(source) if written else f"{source} (not written yet: planned from its stage's shapes)"),
            *self._rows(cfg, list(block_shapes), timesteps, layout, read),
            *plan_rows(self.estimate(cfg, ctx), min(workers, layout.n_units), note, rests),
        ]

    def _work(self, cfg: PoolConfig, ctx: RunContext):
        """(input written?, {block: (C, H, W)}, timesteps, output layout, input dtype), from the
        input store or, before it exists, from its stage's planned shapes (None: unknown)."""
        source = as_location(ctx.inputs["input"])
        if store.read_attrs(source) is not None:
            _, _, src_layout, blocks, timesteps, layout = self._plan(cfg, ctx)
            return True, {b: src_layout.blocks[b] for b in blocks}, timesteps, layout, src_layout.dtype
        from pipeline.estimate import input_shape

        shape = input_shape(ctx.workflow, ctx.entry.inputs["input"], ctx.prepared_by_stage)
        if shape is None:
            return None
        blocks = list(dict.fromkeys(b for b, _ in shape.slices))
        blocks = blocks if cfg.blocks == "all" else [b for b in blocks if b in cfg.blocks]
        block_shapes = {b: s for (b, _), s in shape.slices.items() if b in blocks}
        timesteps = list(shape.timesteps if cfg.timesteps == "all" else cfg.timesteps)
        layout = store.make_layout(shape.n_samples, {b: (block_shapes[b][0], p, p) for b in blocks for p in cfg.sizes},
                                   timesteps, cfg.dtype, unit_samples=cfg.unit_samples or shape.unit_samples)
        return False, block_shapes, timesteps, layout, shape.dtype

    def _rows(self, cfg: PoolConfig, blocks, timesteps, layout, read: int) -> list[tuple[str, str]]:
        return [
            ("samples", str(layout.n_samples)),
            ("pooled", f"{len(blocks)} block(s) x {len(timesteps)} timestep(s), "
                       f"{cfg.mode} to sizes {list(cfg.sizes)}"),
            ("units", f"{layout.n_units} x {layout.unit_samples} samples (one task each)"),
            ("bytes read", f"{read / 2**20:.1f} MiB"),
            ("bytes written (raw)", f"{layout.bytes_per_sample() * layout.n_samples / 2**20:.1f} MiB"),
        ]

    def estimate(self, cfg: PoolConfig, ctx: RunContext) -> list:
        """One ``pipeline.estimate.Estimate``: a measured (part of a) unit, times the units.

        With the input written the sample reads and pools samples of its first finished
        unit; before (the input is only planned), a synthetic unit of random values with
        the planned shapes. Up to ``SAMPLE_BYTES`` of maps are timed; ``scale`` is the
        unit's samples over the sample's (pooling is linear in them).
        """
        from pipeline.estimate import Estimate, cluster_workers, measure

        written, block_shapes, timesteps, layout, dtype = self._work(cfg, ctx)
        source = as_location(ctx.inputs["input"]) if written else None
        storage = store.STORAGE_DTYPES[dtype]
        item = np.dtype(storage).itemsize
        per_sample = len(timesteps) * sum(int(np.prod(s)) for s in block_shapes.values()) * item
        unit = layout.unit_samples
        m = max(1, min(unit, layout.n_samples, SAMPLE_BYTES // max(1, per_sample)))
        if source is not None:
            root = store.open_root(source)
            src_layout = store.load_layout(source)
            stored_t = list(src_layout.timesteps)
            t_index = [stored_t.index(int(t)) for t in timesteps]
            done = store.unit_status(source)
            first = int(np.argmax(done)) if done.any() else 0
            a = src_layout.unit_range(first)[0]
            arrays = {b: root[f"blocks/{b}/activations"] for b in block_shapes}
            what = f"read + pool of {m} stored sample(s)"
        else:
            rng = np.random.default_rng(0)
            t_index, a = list(range(len(timesteps))), 0
            arrays = {b: _InMemory(rng.standard_normal((m, len(timesteps), *s), dtype=np.float32).astype(storage),
                                   min(m, 64)) for b, s in block_shapes.items()}
            what = f"pool of {m} synthetic sample(s)"

        def one():
            for src in arrays.values():
                pool_block(src, a, a + m, t_index, cfg.sizes, cfg.mode)

        workers, _ = cluster_workers(ctx.workflow.cluster)
        sample = measure(one, warmup=1, repeats=5, budget_s=5.0, threads=1)
        return [Estimate(what, sample, layout.n_units, scale=unit / m, workers=min(workers, layout.n_units))]


#: Bytes of maps a plan's pool sample reads (a part of a unit; pooling is linear in samples).
SAMPLE_BYTES = 64 << 20


class _InMemory:
    """A numpy array with zarr's ``chunks`` attribute: the synthetic unit ``pool_block`` reads."""

    def __init__(self, values: np.ndarray, chunk_samples: int):
        self.values, self.shape = values, values.shape
        self.chunks = (chunk_samples, *values.shape[1:])

    def __getitem__(self, key):
        return self.values[key]
