"""probe: train classifier heads over a (block, timestep, pool size, head) grid.

Input: a pool stage's store (or an extract store with small maps: its pool size
is the stored map side). Every cell trains one head (``pipeline.probing.heads``: linear,
MLP, CNN, attention) with one recipe (``pipeline.probing.training.TrainSpec``) on frozen
features of one (block, timestep, pool) and scores it on the test split.

Splits are by image, never by view: the test split is either a second store
(``test_input``, e.g. the dataset's official test split; sharing an image with the
input is an error) or a seeded ``test_fraction`` of the input's images. The
validation split (early stopping, best epoch) is carved from train by
``image_id`` too; standardisation statistics come from the fitting part only.
Failed samples (``done`` = 2) are never used. ``train_views`` / ``test_views``
then keep only those views on each side (the paper's protocol with an augmented
store: train on the random views 1..k-1, test on the centre view 0); the split by
image comes first, so every view of a test image stays out of training whichever
views are kept.

One read, many heads: the cells sharing a (block, pool) slice form one *group*,
trained in one ``train_heads`` call on one ``ZarrSource`` whose keys are the
timesteps; every minibatch read feeds all timesteps' heads, recipes included.
A group is one dask task: only paths and selectors travel through the scheduler;
the worker opens the store(s) itself and streams minibatches (shuffled chunk
order + in-buffer shuffle), so the data need not fit in memory. A failed task is
retried once and reported (``pipeline.cluster.client.run_tasks``); finished groups are
saved in ``tasks/`` so a re-run resumes.

Output: ``<name>.probe/`` (see ``pipeline/probing/results.py``): the Dataset
``accuracy(block, timestep, pool, head)`` (+ top-5, validation, train time,
epochs) as Zarr, ``results.csv``, one heatmap PNG per head; the best cell per head
is printed at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import store
from pipeline.store.location import as_location
from pipeline.workflow.config import Where, build_dataclass, config_dict, not_hashed
from pipeline.errors import ConfigError, DiffprobeError, select_or_error
from pipeline.probing.heads import HeadSpec
from pipeline.probing.splits import split_groups
from pipeline.workflow.stage import RunContext, Stage, input_field
from pipeline.probing.training import TrainSpec


@dataclass(frozen=True)
class ProbeHead:
    """One head of the grid.

    name: its coordinate in the results (unique). head: the architecture
    (``HeadSpec``: kind, hidden, depth, heads, width, mlp_ratio, dropout). train:
    overrides of the stage's ``train`` recipe for this head (e.g. ``{lr: 0.01}``);
    two heads differing only in ``train`` make a learning-rate sweep in one read.
    pools: pool sizes this head runs at (default: every pool of the grid).
    """

    name: str
    head: HeadSpec = field(default_factory=HeadSpec)
    train: dict = field(default_factory=dict)
    pools: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ProbeConfig:
    """Parameters of the probe stage (see the module docstring)."""

    input: str = input_field()
    test_input: str | None = input_field(default=None)
    heads: tuple[ProbeHead, ...] = (ProbeHead("linear"),)
    train: TrainSpec = field(default_factory=TrainSpec)
    blocks: tuple[str, ...] | str = "all"
    timesteps: tuple[int, ...] | str = "all"
    pools: tuple[int, ...] | str = "all"
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    batch_size: int = 32
    eval_batch_size: int = not_hashed(512)
    seed: int = 0
    buffer_mib: float = not_hashed(64)
    torch_threads: int = not_hashed(1)
    train_views: tuple[int, ...] | str = "all"
    test_views: tuple[int, ...] | str = "all"

    def __post_init__(self):
        for name in ("train_views", "test_views"):
            value = getattr(self, name)
            if isinstance(value, str) and value != "all" or not isinstance(value, str) and (
                    not value or min(value) < 0):
                raise ValueError(f"'{name}' must be 'all' or a list of view indices >= 0, got {value!r}")
        names = [h.name for h in self.heads]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"'heads' must list heads with distinct names, got {names}")
        for name in ("blocks", "timesteps", "pools"):
            if isinstance(getattr(self, name), str) and getattr(self, name) != "all":
                raise ValueError(f"'{name}' must be a list or 'all', got {getattr(self, name)!r}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"'test_fraction' must be in (0, 1), got {self.test_fraction}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"'val_fraction' must be in [0, 1), got {self.val_fraction}")
        for name in ("batch_size", "eval_batch_size", "torch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"'{name}' must be >= 1, got {getattr(self, name)}")
        if not self.buffer_mib > 0:
            raise ValueError(
                f"'buffer_mib' must be > 0 (MiB of features a task may hold), got {self.buffer_mib}")
        for head in self.heads:
            self.recipe(head)

    def recipe(self, head: ProbeHead) -> TrainSpec:
        """The stage's ``train`` with the head's overrides applied (validated)."""
        if not head.train:
            return self.train
        return build_dataclass(TrainSpec, {**config_dict(self.train), **head.train},
                               Where(None, None, f"heads.{head.name}.train"))


@dataclass(frozen=True)
class GroupTask:
    """The cells sharing one (block, pool) read; only paths and selectors, no arrays."""

    name: str
    block: str
    pool: int
    parts: tuple[tuple[Path, str], ...]  # (store location, array path): the input [, the test input]
    timesteps: tuple[int, ...]
    heads: tuple[tuple[str, HeadSpec, TrainSpec], ...]
    num_classes: int
    test_fraction: float
    val_fraction: float
    batch_size: int
    eval_batch_size: int
    seed: int
    buffer_bytes: int
    torch_threads: int
    train_views: tuple[int, ...] | None = None  # None: every view
    test_views: tuple[int, ...] | None = None


def split_by_image(image_ids: np.ndarray, usable: np.ndarray, test_fraction: float,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test split of *images*: every view of an image lands on one side.

    Parameters
    ----------
    image_ids : (n,) str
    usable : (n,) bool
        Samples that may be used (``done == 1``); the others are in neither split.
    test_fraction : float in (0, 1)
        Share of images in the test split (at least one image each side).

    Returns
    -------
    train_idx, test_idx : sorted int64 sample positions.
    """
    usable = np.asarray(usable, dtype=bool)
    in_test = np.zeros(len(usable), dtype=bool)
    in_test[usable] = split_groups(np.asarray(image_ids)[usable], test_fraction, seed, 0x7E57, "train/test")
    return np.flatnonzero(usable & ~in_test), np.flatnonzero(usable & in_test)


def keep_views(indices: np.ndarray, views: np.ndarray, keep: tuple[int, ...] | None) -> np.ndarray:
    """The positions of ``indices`` whose view is in ``keep`` (all of them for None)."""
    return indices if keep is None else indices[np.isin(views[indices], keep)]


def group_splits(source, task: GroupTask) -> tuple[np.ndarray, np.ndarray]:
    """Train and test positions of a task's source: the second store, or a split by image,
    then the task's ``train_views`` / ``test_views`` on each side."""
    if len(task.parts) == 1:
        train_idx, test_idx = split_by_image(source.image_ids, source.usable, task.test_fraction, task.seed)
    else:
        positions = np.arange(len(source))
        (a, b), (c, d) = source.part_range(0), source.part_range(1)
        train_idx, test_idx = positions[a:b][source.usable[a:b]], positions[c:d][source.usable[c:d]]
    if task.train_views is None and task.test_views is None:
        return train_idx, test_idx
    views = np.concatenate([store_views(path) for path, _ in task.parts])
    return keep_views(train_idx, views, task.train_views), keep_views(test_idx, views, task.test_views)


def store_views(path: str | Path) -> np.ndarray:
    """(n,) int: the ``view`` coordinate of a store."""
    return np.asarray(store.open_root(path)["view"][:], dtype=np.int64)


def train_group(task: GroupTask) -> list[dict]:
    """Train every (timestep, head) cell of one group from one stream of reads (runs on a worker).

    Returns one row per cell: block, timestep, pool, head and ``train_heads``' metrics,
    plus the group's ``read_bytes`` and ``peak_buffer_bytes``.
    """
    import torch

    threads = torch.get_num_threads()  # restored after: in-process tasks share the run's process
    torch.set_num_threads(task.torch_threads)  # same arithmetic on every kind of worker
    try:
        return _train_group(task)
    finally:
        torch.set_num_threads(threads)


def _train_group(task: GroupTask) -> list[dict]:
    from pipeline.store.slices import timestep_key
    from pipeline.probing.training import HeadJob, train_heads
    from pipeline.store.source import ZarrSource

    with ZarrSource(task.parts, task.timesteps, buffer_bytes=task.buffer_bytes) as source:
        train_idx, test_idx = group_splits(source, task)
        groups = np.unique(source.image_ids.astype(str), return_inverse=True)[1]  # str: C-speed sort
        cells = [(t, name, head, recipe) for t in task.timesteps for name, head, recipe in task.heads]
        jobs = [HeadJob(head, recipe, timestep_key(t)) for t, _, head, recipe in cells]
        results = train_heads(source, train_idx, test_idx, jobs, batch_size=task.batch_size,
                              eval_batch_size=task.eval_batch_size, val_fraction=task.val_fraction,
                              groups=groups, num_classes=task.num_classes, seed=task.seed)
    rows = []
    for (t, name, _, _), result in zip(cells, results):
        rows.append({"block": task.block, "timestep": int(t), "pool": task.pool, "head": name, **result,
                     "read_bytes": source.bytes_read, "peak_buffer_bytes": source.peak_buffer_bytes})
    return rows


def _select(requested, available: list, what: str, where: str) -> list:
    return select_or_error(requested, available, what, where, "probe")


@dataclass(frozen=True)
class Grid:
    tasks: list[GroupTask]
    blocks: list[str]
    timesteps: list[int]
    pools: list[int]
    head_kinds: dict[str, str]


def build_grid(cfg: ProbeConfig, source: Path, test_source: Path | None) -> Grid:
    """Validate the grid against the store(s) and group its cells by (block, pool) read."""
    from pipeline.store.slices import feature_slices, store_timesteps

    slices = feature_slices(source)
    blocks = _select(cfg.blocks, list(dict.fromkeys(b for b, _ in slices)), "block", str(source))
    pools = sorted(_select(cfg.pools, sorted({p for _, p in slices}), "pool size", str(source)))
    timesteps = _select(cfg.timesteps, store_timesteps(source), "timestep", str(source))
    for head in cfg.heads:
        for p in head.pools or ():
            if p not in pools:
                raise ConfigError(
                    f"probe: head {head.name!r} asks for pool {p}, not in the grid's pools {pools}"
                )
    root = store.open_root(source)
    classes = [str(c) for c in root["class_name"][:]]
    if test_source is not None:
        test_slices = feature_slices(test_source)
        test_root = store.open_root(test_source)
        if [str(c) for c in test_root["class_name"][:]] != classes:
            raise ConfigError(f"probe: {test_source} and {source} have different class lists")
        shared = np.intersect1d(np.asarray(root["image_id"][:], dtype=object).astype(str),
                                np.asarray(test_root["image_id"][:], dtype=object).astype(str))
        if len(shared):
            raise ConfigError(
                f"probe: test_input shares {len(shared)} image(s) with input (e.g. {str(shared[0])!r}); views of "
                "one image must not straddle train and test: use another split, or drop test_input"
            )
        _select(timesteps, store_timesteps(test_source), "timestep", str(test_source))
    train_views = _check_views(cfg.train_views, source, "train_views")
    test_views = _check_views(cfg.test_views, test_source or source, "test_views")
    tasks = []
    for block in blocks:
        for pool in pools:
            if (block, pool) not in slices:
                continue  # an extract store: this block's maps have another side
            heads = tuple((h.name, h.head, cfg.recipe(h))
                          for h in cfg.heads if not h.pools or pool in h.pools)
            if not heads:
                continue
            parts = [(source, slices[(block, pool)].array_path)]
            if test_source is not None:
                if (block, pool) not in test_slices:
                    raise ConfigError(
                        f"probe: test_input {test_source} has no block {block!r} at pool {pool}"
                    )
                parts.append((test_source, test_slices[(block, pool)].array_path))
            name = f"{block}/p{pool}"
            tasks.append(GroupTask(
                name, block, pool, tuple(parts), tuple(timesteps), heads, len(classes), cfg.test_fraction,
                cfg.val_fraction, cfg.batch_size, cfg.eval_batch_size, cfg.seed, int(cfg.buffer_mib * 2**20),
                cfg.torch_threads, train_views, test_views,
            ))
    if not tasks:
        raise ConfigError("probe: the grid is empty (no head runs at any of the selected pools)")
    return Grid(tasks, blocks, timesteps, pools, {h.name: h.head.kind for h in cfg.heads})


def _check_views(requested, source: Path, what: str) -> tuple[int, ...] | None:
    """``requested`` as a tuple (None for 'all') once every view in it is in ``source``."""
    if requested == "all":
        return None
    stored = sorted(int(v) for v in np.unique(store_views(source)))
    missing = [v for v in requested if v not in stored]
    if missing:
        raise ConfigError(
            f"probe: {what} asks for view(s) {missing}, but {source} stores views {stored} "
            "(extract with more views, e.g. views: 4 with augment)"
        )
    return tuple(int(v) for v in requested)


class ProbeStage(Stage):
    kind = "probe"
    Config = ProbeConfig
    output_suffix = ".probe"

    def run(self, cfg: ProbeConfig, ctx: RunContext) -> None:
        from pipeline.probing.results import best_cells, describe_best, results_dataset, write_results

        test_source = ctx.inputs.get("test_input")
        grid = build_grid(cfg, as_location(ctx.inputs["input"]), as_location(test_source) if test_source else None)
        out = ctx.output
        cache = ctx.open_results_output()
        finished = {t.name: rows for t in grid.tasks if (rows := cache.load(t.name)) is not None}
        todo = [t for t in grid.tasks if t.name not in finished]
        n_cells = sum(len(t.timesteps) * len(t.heads) for t in grid.tasks)
        ctx.log(f"{n_cells} cells in {len(grid.tasks)} read group(s) (block x pool); "
                f"{len(todo)} group(s) to do")

        def keep(task, rows, attempts):
            rows = [dict(r, attempts=attempts) for r in rows]
            cache.save(task.name, rows)
            finished[task.name] = rows

        outcomes = []
        if todo:
            # work_bytes unknown: a task's cost is training its heads, not reading its slice
            with ctx.cluster_session() as cluster:
                outcomes = cluster.run_tasks(train_group, todo, log=ctx.log, on_result=keep)
        retried = [{"group": o.name, "error": o.first_error} for o in outcomes if o.ok and o.first_error]
        failed = [{"group": o.name, "error": o.error} for o in outcomes if not o.ok]
        first_errors = {g["group"]: g["error"] for g in retried}
        rows = [dict(r, status="retried" if t.name in first_errors else "ok",
                     error=first_errors.get(t.name, ""))
                for t in grid.tasks for r in finished.get(t.name, [])]
        for f in failed:
            task = next(t for t in grid.tasks if t.name == f["group"])
            rows += [{"block": task.block, "timestep": t, "pool": task.pool, "head": h, "status": "failed",
                      "error": f["error"]} for t in task.timesteps for h, _, _ in task.heads]
        attrs = {store.ATTR_KEY: ctx.base_attrs() | {"failed": failed, "retried": retried,
                                                     "source": str(ctx.inputs["input"])}}
        ds = results_dataset(rows, grid.blocks, grid.timesteps, grid.pools, grid.head_kinds, attrs)
        write_results(out, ds, rows, complete=not failed)
        read = sum(rows_[0]["read_bytes"] for rows_ in finished.values() if rows_)
        ctx.log(f"read {read / 2**20:.1f} MiB of features for {n_cells} cells; results in {out}")
        for cell in best_cells(ds):
            ctx.log(f"best {describe_best(cell)}")
        if failed:
            raise DiffprobeError(
                f"probe: {len(failed)} group(s) failed twice ({failed[0]['group']}: {failed[0]['error']}); "
                f"their cells are NaN in {out}; re-run to retry just those"
            )

    def results_bytes(self, cfg: ProbeConfig, ctx: RunContext) -> int:
        from pipeline.probing.results import METRICS
        from pipeline.store.space import results_bytes

        test_source = ctx.inputs.get("test_input")
        grid = build_grid(cfg, as_location(ctx.inputs["input"]), as_location(test_source) if test_source else None)
        n_values = len(grid.blocks) * len(grid.timesteps) * len(grid.pools) * len(grid.head_kinds)
        # every metric and the 5 coordinates; results.csv and one task file per group; a heatmap per head
        return results_bytes(len(METRICS) + 5, n_values, len(grid.tasks) + 1, len(grid.head_kinds))

    def plan(self, cfg: ProbeConfig, ctx: RunContext) -> list[tuple[str, str]]:
        source = as_location(ctx.inputs["input"])
        test_source = ctx.inputs.get("test_input")
        if store.read_attrs(source) is None or (test_source and store.read_attrs(test_source) is None):
            planned = self._planned_groups(cfg, ctx)
            if planned is None:
                return [("input", f"{source} (not written yet: plan it after its stage has run)"),
                        ("time (est.)", NOT_ESTIMATED)]
            groups, sizes, num_classes = planned
            return [("input", f"{source} (not written yet: planned from its stage's shapes)"),
                    ("cells", f"{sum(g.n_timesteps * len(g.heads) for g in groups)} in {len(groups)} task(s)"),
                    *self._estimate_rows(cfg, ctx, groups, sizes, num_classes)]
        grid = build_grid(cfg, source, as_location(test_source) if test_source else None)
        n_cells = sum(len(t.timesteps) * len(t.heads) for t in grid.tasks)
        return [
            ("grid", f"{len(grid.blocks)} block(s) x {len(grid.timesteps)} timestep(s) x pools {grid.pools} "
                     f"x {len(grid.head_kinds)} head(s)"),
            ("cells", f"{n_cells} in {len(grid.tasks)} task(s), one store read stream each"),
            ("split", (f"test from {test_source}" if test_source
                       else f"{cfg.test_fraction:.0%} of images (seed {cfg.seed})")
             + f"; train views {_views_text(cfg.train_views)}, test views {_views_text(cfg.test_views)}"),
            ("memory", _memory_plan(grid.tasks, cfg.buffer_mib)),
            *self._estimate_rows(cfg, ctx, *self._written_groups(cfg, grid, source, test_source)),
        ]

    def estimate(self, cfg: ProbeConfig, ctx: RunContext) -> list:
        """The ``pipeline.estimate.Estimate`` list behind plan's time row (written or planned input)."""
        from pipeline.estimate import cluster_workers
        from pipeline.probing.estimate import probe_estimates

        source = as_location(ctx.inputs["input"])
        test_source = ctx.inputs.get("test_input")
        if store.read_attrs(source) is None or (test_source and store.read_attrs(test_source) is None):
            groups, sizes, num_classes = self._planned_groups(cfg, ctx)
        else:
            grid = build_grid(cfg, source, as_location(test_source) if test_source else None)
            groups, sizes, num_classes = self._written_groups(cfg, grid, source, test_source)
        workers, _ = cluster_workers(ctx.workflow.cluster)
        return probe_estimates(groups, sizes, num_classes, cfg.batch_size, cfg.eval_batch_size,
                               cfg.torch_threads, min(workers, len(groups)))

    def _estimate_rows(self, cfg: ProbeConfig, ctx: RunContext, groups, sizes, num_classes):
        from pipeline.estimate import cluster_workers, plan_rows
        from pipeline.probing.estimate import probe_estimates

        workers, note = cluster_workers(ctx.workflow.cluster)
        workers = min(workers, len(groups))
        estimates = probe_estimates(groups, sizes, num_classes, cfg.batch_size, cfg.eval_batch_size,
                                    cfg.torch_threads, workers)
        return [("samples", f"fit {sizes.n_fit}, validation {sizes.n_val}, test {sizes.n_test} per cell"),
                *plan_rows(estimates, workers, note,
                           "every head runs all its epochs (patience may stop it sooner); "
                           "reading the features is not included")]

    def _written_groups(self, cfg: ProbeConfig, grid: Grid, source, test_source):
        from pipeline.probing.estimate import CellGroup, split_sizes
        from pipeline.store.slices import feature_slices

        slices = feature_slices(source)
        groups = [CellGroup(t.block, t.pool, tuple(slices[(t.block, t.pool)].shape), len(t.timesteps),
                            tuple((n, h, r) for n, h, r in t.heads)) for t in grid.tasks]
        usable = _usable(source)
        views = len(np.unique(store_views(source)))
        if test_source:
            n_test, n_train = _usable(test_source), usable
        else:
            n_test = round(usable * cfg.test_fraction)
            n_train = usable - n_test
        return groups, split_sizes(n_train, n_test, cfg.val_fraction, _share(cfg.train_views, views),
                                   _share(cfg.test_views, views)), grid.tasks[0].num_classes

    def _planned_groups(self, cfg: ProbeConfig, ctx: RunContext):
        """Cell groups and split sizes from the planned shapes of inputs not written yet, or None."""
        from pipeline.estimate import input_shape
        from pipeline.probing.estimate import CellGroup, split_sizes

        shape = input_shape(ctx.workflow, ctx.entry.inputs["input"], ctx.prepared_by_stage)
        test_name = ctx.entry.inputs.get("test_input")
        test_shape = input_shape(ctx.workflow, test_name, ctx.prepared_by_stage) if test_name else None
        if shape is None or (test_name and test_shape is None):
            return None
        blocks = _select(cfg.blocks, list(dict.fromkeys(b for b, _ in shape.slices)), "block", "the planned input")
        pools = _select(cfg.pools, sorted({p for _, p in shape.slices}), "pool size", "the planned input")
        timesteps = _select(cfg.timesteps, list(shape.timesteps), "timestep", "the planned input")
        groups = []
        for block in blocks:
            for pool in sorted(pools):
                heads = tuple((h.name, h.head, cfg.recipe(h)) for h in cfg.heads if not h.pools or pool in h.pools)
                if (block, pool) in shape.slices and heads:
                    groups.append(CellGroup(block, pool, shape.slices[(block, pool)], len(timesteps), heads))
        if test_shape is not None:
            n_train, n_test = shape.n_samples, test_shape.n_samples
        else:
            n_test = round(shape.n_samples * cfg.test_fraction)
            n_train = shape.n_samples - n_test
        sizes = split_sizes(n_train, n_test, cfg.val_fraction, _share(cfg.train_views, shape.views),
                            _share(cfg.test_views, shape.views))
        return groups, sizes, shape.n_classes


def _usable(path) -> int:
    from pipeline.store.checks import Integrity

    return int((Integrity(store.open_root(path), path).done() == store.WRITTEN).sum())


def _share(views, n_views: int) -> float:
    """Share of the stored views a ``train_views`` / ``test_views`` setting keeps."""
    return 1.0 if views == "all" else min(1.0, len(views) / max(1, n_views))


#: Said when the input stage cannot tell its shapes before it has run.
NOT_ESTIMATED = "not estimated (the input stage cannot say its shapes before it runs)"


def _views_text(views) -> str:
    return "all" if views == "all" else ", ".join(map(str, views))


def _memory_plan(tasks, buffer_mib: float) -> str:
    """How each task's slice compares with ``buffer_mib``: decoded once, or streamed every pass."""
    from pipeline.store.describe import human_bytes

    roots = {str(path): store.open_root(path) for task in tasks for path, _ in task.parts}  # each store once
    sizes = []
    for task in tasks:
        nbytes = 0
        for path, array_path in task.parts:
            array = roots[str(path)][array_path]
            nbytes += int(np.prod(array.shape[:1] + array.shape[2:])) * array.dtype.itemsize
        sizes.append(nbytes * len(task.timesteps))
    streamed = sum(size > buffer_mib * 2**20 for size in sizes)
    largest = f"largest slice {human_bytes(max(sizes))} vs buffer_mib {buffer_mib:g}"
    if not streamed:
        return f"{largest}: every task decodes its slice once and trains from memory"
    need = math.ceil(max(sizes) / 2**20 * 100) / 100
    return (f"{largest}: {streamed} of {len(sizes)} task(s) stream, re-reading the slice on every pass "
            f"(buffer_mib: {need:g} or more decodes every slice once, if the workers have the memory)")

