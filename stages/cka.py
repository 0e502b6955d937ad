"""cka: centred kernel alignment between slices of extract / pool stores.

Inputs are earlier ``extract`` or ``pool`` stages, named by the selections; each
selection expands to one representation per (block, pool, timestep)
(``pipeline.cka.select``). ``mode: within`` compares every selected representation
with every other (a symmetric matrix, e.g. block x timestep inside one model);
``mode: across`` compares ``rows`` with ``cols`` (e.g. diffusion blocks x the
layers of a reference CNN).

Samples are matched by ``image_id`` in one augmented view (``view``, default 0:
the unflipped image; views are not averaged, so every entry compares the same
images); a sample that failed in any store is dropped from every entry, and stores
that hold different ids are an error that counts them.

Estimators (``pipeline.cka.estimators``), and how the work is cut into dask tasks (each
receives only paths and selectors and reads its slices itself; the sample alignment is
matched once, when the run is planned, and saved beside the output for the tasks to
load; ``memory_limit`` bounds what one task holds). Only what the matrix needs is
computed: an entry of a representation with itself is 1 by definition (no task reads
it), and in ``across`` mode a pair listed both ways is computed once and mirrored:

- ``linear`` (exact). With ``route: gram`` (or ``auto`` when two n x n float64
  arrays fit a task and the Grams take fewer flops than streaming each pair, i.e.
  many features for few samples) every representation's centred Gram is computed
  once from column groups of its slice:

  ``gram``        all Grams fit one task (small n): one task, ``cka_matrix``
                  (each Gram centred once, one inner product per entry);
  ``gram-cache``  otherwise: one task per representation saves its centred,
                  normalised Gram under ``<output>/grams/`` (8 n^2 bytes each,
                  deleted at the end), then one task per row takes inner products
                  of the saved Grams (memory-mapped).

  ``route: stream`` (``auto`` when not even one Gram fits, or when streaming is
  cheaper: pooled features, p << n) computes each
  entry on its own with ``LinearCKAAccumulator``: co-moments (the "feature" route)
  when the features are few, never holding a slice. Each pair then reads both
  slices, so this is for pooled / low-dimensional features.
- ``minibatch``: unbiased HSIC_1 averaged over batches (Nguyen et al. 2021), the
  batches of ``pipeline.cka.estimators.minibatch_cka``; tiles of as many representations as
  fit; ``batch_size``, ``seed``, ``epochs`` and the number of batches are recorded.
- ``rbf``: Gaussian kernel, bandwidth ``sigma_fraction`` x the median distance, via
  the Gram methods; refused above ``rbf_max_samples``.

Finished task results are kept under ``tasks/``: a re-run after a failure redoes
only the missing tasks.

Output ``<name>.cka/``: a consolidated Zarr group holding the Dataset with
``cka (row, col)`` float64 and coordinates ``row``/``col`` (labels
``stage/block/t<t>[/p<size>]``), ``row_stage``, ``row_block``, ``row_timestep``,
``row_pool``, ``row_features`` (and ``col_*``); root attrs ``diffprobe`` hold the
estimator settings, n, the view, the input stores and ``complete``. Beside it:
``cka.csv`` (one line per entry) and ``cka.png`` (the matrix).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline import store
from pipeline.store.location import as_location, remove
from pipeline.cka.results import cka_dataset, write_cka_output
from pipeline.cka.select import Alignment, Representation, align_samples, expand_selections, save_alignment
from pipeline.errors import ConfigError, DiffprobeError
from pipeline.workflow.config import not_hashed
from pipeline.workflow.stage import RunContext, Stage, input_field

#: Share of a task's memory for reading (column groups, row blocks, batch groups).
READ_SHARE = 4
READ_BYTES_MAX = 256 << 20


@dataclass(frozen=True)
class Selection:
    """Representations from one input stage: its blocks x pool sizes x timesteps (each a list or 'all')."""

    input: str
    blocks: tuple[str, ...] | str = "all"
    timesteps: tuple[int, ...] | int | str = "all"
    pool: tuple[int, ...] | int | str = "all"

    def __post_init__(self):
        for name in ("blocks", "timesteps", "pool"):
            value = getattr(self, name)
            if isinstance(value, (int, str)) and value != "all":
                if isinstance(value, str) and name != "blocks":
                    raise ValueError(f"'{name}' must be a list or 'all', got {value!r}")
                object.__setattr__(self, name, (value,))


@dataclass(frozen=True)
class CKAConfig:
    """Parameters of the cka stage (see the module docstring).

    memory_limit: bytes one task may hold (``"2GiB"``), or ``auto``: the cluster's
    per-worker ``memory_limit`` / ``threads_per_worker`` / 2.
    """

    mode: Literal["within", "across"] = "within"
    selections: tuple[Selection, ...] = ()
    rows: tuple[Selection, ...] = ()
    cols: tuple[Selection, ...] = ()
    estimator: Literal["linear", "minibatch", "rbf"] = "linear"
    route: Literal["auto", "gram", "stream"] = "auto"
    memory_limit: str = not_hashed("auto")
    batch_size: int = 256
    seed: int = 0
    epochs: int = 1
    sigma_fraction: float = 1.0
    rbf_max_samples: int = 5000
    view: int = 0
    inputs: tuple[str, ...] = input_field(default=(), init=False)

    def __post_init__(self):
        if self.mode == "within" and (not self.selections or self.rows or self.cols):
            raise ValueError("mode 'within' takes 'selections' (compared with each other), not rows/cols")
        if self.mode == "across" and (self.selections or not self.rows or not self.cols):
            raise ValueError("mode 'across' takes 'rows' and 'cols' (rows x cols), not selections")
        if self.batch_size < 4:
            raise ValueError(f"'batch_size' must be >= 4 (unbiased HSIC), got {self.batch_size}")
        for name in ("epochs", "rbf_max_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"'{name}' must be >= 1, got {getattr(self, name)}")
        if not self.sigma_fraction > 0:
            raise ValueError(f"'sigma_fraction' must be > 0, got {self.sigma_fraction}")
        if self.view < 0:
            raise ValueError(f"'view' must be >= 0, got {self.view}")
        if self.memory_limit != "auto":
            _parse_bytes(self.memory_limit)
        names = [s.input for s in self.selections + self.rows + self.cols]
        object.__setattr__(self, "inputs", tuple(dict.fromkeys(names)))


def _parse_bytes(text: str) -> int:
    from dask.utils import parse_bytes

    try:
        return int(parse_bytes(text))
    except (ValueError, TypeError):
        raise ValueError(f"'memory_limit' must be 'auto' or a size like '2GiB', got {text!r}") from None


@dataclass(frozen=True)
class CKATask:
    """One unit of work; paths and selectors only.

    method: ``gram`` (a tile from Grams held in the task), ``gram-write`` (save one
    normalised Gram to ``scratch``), ``gram-dot`` (a row of inner products of saved
    Grams), ``stream`` (one entry), ``minibatch`` (a tile).
    """

    name: str
    rows: tuple[Representation, ...]
    cols: tuple[Representation, ...]
    symmetric: bool  # rows == cols: the tile is a symmetric diagonal block
    method: str
    stores: tuple[str, ...]  # every store of the matrix: the alignment drops samples failed in any
    view: int
    memory_bytes: int
    read_bytes: int
    estimator: str
    batch_size: int = 256
    seed: int = 0
    epochs: int = 1
    sigma_fraction: float = 1.0
    scratch: Path | str = ""  # a location (a URL's carries its storage options)
    alignment: Path | str = ""  # the planned alignment's .npz (save_alignment); "" = match the stores again


def cka_tile(task: CKATask) -> dict:
    """Run one task (on a worker): ``{"rows", "cols", "values"}`` with labels, plus method details."""
    from pipeline.cka import estimators as cka

    from pipeline.cka import select as cka_select

    out = {"rows": [r.label for r in task.rows], "cols": [c.label for c in task.cols]}
    if task.method == "gram-dot":
        files = [cka_select.gram_file(task.scratch, c) for c in task.cols]
        values = cka_select.gram_inner_products(cka_select.gram_file(task.scratch, task.rows[0]), files,
                                                task.read_bytes)
        return out | {"values": [values]}
    pos = cka_select.load_alignment(task.alignment) if task.alignment else \
        align_samples(task.stores, task.view).positions
    sigma = task.sigma_fraction if task.estimator == "rbf" else None
    if task.method == "gram-write":
        rep = task.rows[0]
        path = cka_select.write_normalised_gram(rep, pos[str(rep.path)], task.read_bytes, task.scratch, sigma)
        return out | {"values": [], "gram": path.name}
    if task.method == "stream":
        rx, ry = task.rows[0], task.cols[0]
        value, route = cka_select.stream_pair_cka(rx, ry, pos[str(rx.path)], pos[str(ry.path)],
                                                  task.memory_bytes - task.read_bytes, task.read_bytes)
        return out | {"values": [[value]], "route": route}
    if task.method == "minibatch":
        union = list(dict.fromkeys(task.rows + task.cols))
        acc = cka_select.minibatch_accumulate(union, [pos[str(r.path)] for r in union], task.batch_size, task.seed,
                                              task.epochs, task.read_bytes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a constant slice gives NaN, kept as NaN
            full = acc.matrix()
        index = {r: i for i, r in enumerate(union)}
        values = [[float(full[index[r], index[c]]) for c in task.cols] for r in task.rows]
        return out | {"values": values, "n_batches": acc.n_batches}

    def grams(reps):
        for rep in reps:
            g = cka_select.representation_gram(rep, pos[str(rep.path)], task.read_bytes)
            yield g if sigma is None else cka.rbf_gram_from_linear(g, sigma)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        values = cka.cka_matrix(grams(task.rows)) if task.symmetric else \
            cka.cka_matrix(grams(task.rows), grams(task.cols))
    return out | {"values": values.tolist()}


# ----------------------------------------------------------------- planning


@dataclass
class CKAWork:
    """What a run computes: ``phases`` of tasks, run one after the other."""

    rows: list[Representation]
    cols: list[Representation]
    align: Alignment
    method: str
    memory_bytes: int
    read_bytes: int
    phases: list[list[CKATask]] = field(default_factory=list)

    @property
    def tasks(self) -> list[CKATask]:
        return [t for phase in self.phases for t in phase]


def _tiles(n_rows: int, n_cols: int, symmetric: bool, capacity: int) -> list[tuple[range, range]]:
    """Tiles of the matrix holding at most ``capacity`` representations each (upper triangle if symmetric)."""
    if symmetric:
        if n_rows <= capacity:
            return [(range(n_rows), range(n_rows))]
        k = max(1, capacity // 2)
        blocks = [range(i, min(n_rows, i + k)) for i in range(0, n_rows, k)]
        return [(a, b) for i, a in enumerate(blocks) for b in blocks[i:]]
    if n_rows + n_cols <= capacity:
        return [(range(n_rows), range(n_cols))]
    kr = max(1, min(n_rows, capacity // 2))
    kc = max(1, min(n_cols, capacity - kr))
    return [(range(i, min(n_rows, i + kr)), range(j, min(n_cols, j + kc)))
            for i in range(0, n_rows, kr) for j in range(0, n_cols, kc)]


def memory_bytes(cfg: CKAConfig, cluster) -> int:
    if cfg.memory_limit != "auto":
        return _parse_bytes(cfg.memory_limit)
    return _parse_bytes(cluster.memory_limit) // max(1, cluster.threads_per_worker) // 2


def _stream_is_cheaper(rows, cols, n: int) -> bool:
    """Whether pair-by-pair streaming takes fewer flops than the Gram methods.

    The Grams cost ``n^2 p`` per representation plus ``n^2`` per entry; a streamed
    pair ``n (p1 + p2)^2`` on the feature route. Pooled features (p << n) stream: at
    n = 10,000 and p = 256 the Grams of 4 representations take ~6x the flops of their 6
    pairs and 800 MB each, where the co-moments take 2 MiB.
    """
    from pipeline.cka.estimate import stream_cost

    needed = needed_pairs(rows, cols)
    union = {r.label: r.n_features for r in rows + cols}
    gram = sum(n * n * p for p in union.values()) + len(needed) * n * n
    stream = sum(stream_cost(n, rows[i].n_features, cols[j].n_features) for i, j in needed)
    return stream < gram


def _choose_method(cfg: CKAConfig, rows, cols, n: int, budget: int, read: int) -> str:
    """gram | gram-cache | stream | minibatch, or a ConfigError saying what to change."""
    from pipeline.cka.estimators import linear_route_bytes

    gram = 8 * n * n
    held = (budget - read) // gram  # (n, n) float64 arrays a task may hold
    n_held = len(rows) if rows is cols else len(rows) + len(cols)  # cka_matrix keeps each side's Grams
    if cfg.estimator == "minibatch":
        if cfg.batch_size > n:
            raise ConfigError(f"cka: batch_size {cfg.batch_size} exceeds the {n} matched samples")
        return "minibatch"
    if cfg.estimator == "rbf" and n > cfg.rbf_max_samples:
        raise ConfigError(f"cka: rbf CKA holds (n, n) kernels of all {n} samples (median over n^2 "
                          f"distances), over rbf_max_samples={cfg.rbf_max_samples}; use estimator linear "
                          f"or minibatch, or raise rbf_max_samples")
    if cfg.estimator == "linear" and (cfg.route == "stream" or (
            cfg.route == "auto" and (held < 2 or _stream_is_cheaper(rows, cols, n)))):
        for r in rows:
            for c in cols:
                need = min(linear_route_bytes(n, r.n_features, c.n_features).values())
                if need > budget - read:
                    raise ConfigError(
                        f"cka: exact linear CKA of {r.label} vs {c.label} (n={n}) holds "
                        f"{need / 2**30:.2f} GiB on its cheaper route, over memory_limit "
                        f"{budget / 2**30:.2f} GiB; raise memory_limit, select pooled features, "
                        f"or use estimator: minibatch")
        return "stream"
    if held >= n_held + 2:  # every Gram, plus a raw and a centred copy in flight
        return "gram"
    if held >= 2:
        return "gram-cache"
    fix = ", or use route: stream" if cfg.estimator == "linear" else ", or use estimator linear"
    raise ConfigError(f"cka: an (n, n) float64 Gram for n={n} needs {2 * gram / 2**30:.2f} GiB with its "
                      f"centred copy, over memory_limit {budget / 2**30:.2f} GiB; raise memory_limit{fix}")


def build_cka_work(cfg: CKAConfig, paths: dict[str, Path], cluster, scratch: Path | None = None,
             alignment_file: Path | None = None) -> CKAWork:
    """Representations, sample alignment, method and tasks; every user error is raised here, up front.

    ``scratch``: folder for the saved Grams of the ``gram-cache`` method.
    ``alignment_file``: where to save the alignment for the tasks to load (else each
    task matches the stores' ids again).
    """

    rows = expand_selections(cfg.selections or cfg.rows, paths)
    cols = rows if cfg.mode == "within" else expand_selections(cfg.cols, paths)
    stores = tuple(dict.fromkeys(r.path for r in rows + cols))
    align = align_samples(stores, cfg.view)
    budget = memory_bytes(cfg, cluster)
    read = min(READ_BYTES_MAX, budget // READ_SHARE)
    method = _choose_method(cfg, rows, cols, align.n, budget, read)
    symmetric = cfg.mode == "within"
    plan = CKAWork(rows, cols, align, method, budget, read)
    if alignment_file is not None:
        save_alignment(align, alignment_file)

    def task(name, r, c, kind, sym=False):
        return CKATask(name, tuple(r), tuple(c), sym, kind, stores, cfg.view, budget, read, cfg.estimator,
                       cfg.batch_size, cfg.seed, cfg.epochs, cfg.sigma_fraction, scratch or "",
                       alignment_file or "")

    if method == "gram":
        plan.phases = [[task("all", rows, cols, "gram", symmetric)]]
    elif method == "gram-cache":
        union = list(dict.fromkeys(rows + cols))
        needed = needed_pairs(rows, cols)
        dots = [(i, [cols[j] for j in range(len(cols)) if (i, j) in needed]) for i in range(len(rows))]
        plan.phases = [[task(f"gram-{k}", [rep], [], "gram-write") for k, rep in enumerate(union)],
                       [task(f"row-{i}", [rows[i]], needs, "gram-dot") for i, needs in dots if needs]]
    elif method == "stream":
        plan.phases = [[task(f"r{i}_c{j}", [rows[i]], [cols[j]], "stream")
                        for i, j in sorted(needed_pairs(rows, cols))]]
    else:
        b = cfg.batch_size
        p_max = max(r.n_features for r in rows + cols)
        item = max(r.itemsize for r in rows + cols)
        # per representation: its U-centred (b, b) Gram, and b rows in the read buffer
        capacity = min((budget - read - 8 * b * p_max - 16 * b * b) // (8 * b * b),
                       read // (b * p_max * item))
        if capacity < 2:
            raise ConfigError(f"cka: a minibatch of {b} samples x {p_max} features does not fit memory_limit "
                              f"{budget / 2**20:.0f} MiB; lower batch_size or raise memory_limit")
        plan.phases = [[task(f"r{ri[0]}-{ri[-1]}_c{ci[0]}-{ci[-1]}", [rows[i] for i in ri],
                             [cols[j] for j in ci], "minibatch", symmetric and ri == ci)
                        for ri, ci in _tiles(len(rows), len(cols), symmetric, capacity)]]
    return plan


def needed_pairs(rows: list[Representation], cols: list[Representation]) -> set[tuple[int, int]]:
    """Entries ``(i, j)`` that need computing: not a representation with itself (CKA = 1), and of
    a pair listed both ways (``within`` mode, or overlapping ``across`` selections) only the first."""
    needed, seen = set(), set()
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            key = frozenset((r.label, c.label))
            if r.label != c.label and key not in seen:
                seen.add(key)
                needed.add((i, j))
    return needed


def fill_implied(matrix: np.ndarray, rows: list[Representation], cols: list[Representation],
                 computed: np.ndarray) -> None:
    """Entries no task computed (``~computed``): 1 on a representation with itself, else the mirrored
    entry where that was computed (CKA is symmetric); left NaN otherwise (a failed task)."""
    where = {(r.label, c.label): (i, j) for i, r in enumerate(rows) for j, c in enumerate(cols)}
    for (row, col), (i, j) in where.items():
        if computed[i, j]:
            continue
        if row == col:
            matrix[i, j] = 1.0
        elif (col, row) in where and computed[where[(col, row)]]:
            matrix[i, j] = matrix[where[(col, row)]]


# ----------------------------------------------------------------- output


def _finished_tasks(cache, tasks: list[CKATask], scratch) -> dict[str, dict]:
    """Results kept by an earlier run of the same config (resume); a saved Gram must still exist."""
    finished = {}
    for task in tasks:
        result = cache.load(task.name)
        if result is None:
            continue
        if result["rows"] != [r.label for r in task.rows] or result["cols"] != [c.label for c in task.cols]:
            continue
        if "gram" in result and not (scratch / Path(str(result["gram"])).name).exists():
            continue
        finished[task.name] = result
    return finished


# ----------------------------------------------------------------- stage


def best_matches(matrix: np.ndarray, plan: CKAWork, mode: str) -> dict:
    """For the report: each row's most similar column (itself excluded in ``within`` mode)."""
    values = matrix.copy()
    if mode == "within":
        np.fill_diagonal(values, np.nan)
    best = {}
    for i, row in enumerate(plan.rows):
        if np.isfinite(values[i]).any():
            j = int(np.nanargmax(values[i]))
            best[row.label] = [plan.cols[j].label, round(float(values[i, j]), 4)]
    return {"n_samples": plan.align.n, "shape": list(matrix.shape), "most_similar_col": best}


#: Said when an input stage cannot tell its shapes before it has run.
NOT_ESTIMATED = "not estimated (an input stage cannot say its shapes before it runs)"


class CKAStage(Stage):
    kind = "cka"
    Config = CKAConfig
    output_suffix = ".cka"

    def _paths(self, cfg: CKAConfig, ctx: RunContext) -> dict[str, Path]:
        return {name: as_location(p) for name, p in zip(cfg.inputs, ctx.inputs["inputs"])}

    def validate(self, cfg: CKAConfig, ctx: RunContext) -> None:
        # The minibatch estimator needs batch_size <= the matched samples; the fewest
        # images of view 0 over the inputs bounds that count from above (failed images
        # can only lower it), so a batch_size above it fails for certain and is refused
        # here, before the inputs are computed.
        if cfg.estimator != "minibatch":
            return
        from pipeline.estimate import input_shape

        sizes = {}
        for name in cfg.inputs:
            shape = input_shape(ctx.workflow, name, ctx.prepared_by_stage)  # the model validate built
            if shape is None:
                return
            sizes[name] = shape.n_images
        name, n = min(sizes.items(), key=lambda kv: kv[1])
        if cfg.batch_size > n:
            raise ConfigError(f"cka: batch_size {cfg.batch_size} exceeds the {n} images of '{name}' "
                              f"(at most that many samples are matched): set batch_size <= {n}")

    def run(self, cfg: CKAConfig, ctx: RunContext) -> None:
        out = ctx.output
        cache = ctx.open_results_output()  # before the alignment file is saved inside it
        plan = build_cka_work(cfg, self._paths(cfg, ctx), ctx.workflow.cluster, scratch=out / "grams",
                        alignment_file=out / "grams" / "alignment.npz")
        finished = _finished_tasks(cache, plan.tasks, out / "grams")
        todo = [[t for t in phase if t.name not in finished] for phase in plan.phases]
        ctx.log(f"{len(plan.rows)} x {len(plan.cols)} {cfg.estimator} CKA over {plan.align.n} samples "
                f"(view {cfg.view}; {plan.align.n_excluded} excluded as failed in a store); {plan.method}: "
                f"{len(plan.tasks)} task(s) of <= {plan.memory_bytes / 2**20:.0f} MiB, "
                f"{sum(map(len, todo))} to do")

        def keep(task, result, attempts):
            cache.save(task.name, result)
            finished[task.name] = result

        failed = []
        if any(todo):
            # each representation's slice once: what the tasks read at least
            nbytes = sum(plan.align.n * r.n_features * r.itemsize for r in dict.fromkeys(plan.rows + plan.cols))
            with ctx.cluster_session() as cluster:
                for phase in todo:
                    if not phase:
                        continue
                    outcomes = cluster.run_tasks(cka_tile, phase, log=ctx.log, on_result=keep, work_bytes=nbytes)
                    failed = [{"task": o.name, "error": o.error} for o in outcomes if not o.ok]
                    if failed:
                        break  # a later phase needs every result of this one
        matrix = np.full((len(plan.rows), len(plan.cols)), np.nan)
        computed = np.zeros(matrix.shape, dtype=bool)
        index_r = {r.label: i for i, r in enumerate(plan.rows)}
        index_c = {c.label: j for j, c in enumerate(plan.cols)}
        for result in finished.values():
            for i, row in enumerate(result["rows"] if result["values"] else []):
                for j, col in enumerate(result["cols"]):
                    matrix[index_r[row], index_c[col]] = result["values"][i][j]
                    computed[index_r[row], index_c[col]] = True
        fill_implied(matrix, plan.rows, plan.cols, computed)
        attrs = self._attrs(cfg, ctx, plan, finished, failed) | {"summary": best_matches(matrix, plan, cfg.mode)}
        ds = cka_dataset(matrix, plan.rows, plan.cols, {store.ATTR_KEY: attrs})
        title = f"{cfg.estimator} CKA, n={plan.align.n}" + (
            f", batch {cfg.batch_size}, seed {cfg.seed}" if cfg.estimator == "minibatch" else "")
        write_cka_output(out, ds, plan.rows, plan.cols, title, complete=not failed)
        if failed:
            first = failed[0]
            raise DiffprobeError(f"cka: {len(failed)} task(s) failed twice ({first['task']}: "
                                 f"{first['error']}); their entries are NaN in {out}; re-run to retry them")
        remove(out / "grams")  # scratch Grams of gram-cache: n^2 x 8 bytes each
        ctx.log(f"CKA matrix in {out} (cka.csv, cka.png)")

    def results_bytes(self, cfg: CKAConfig, ctx: RunContext) -> int:
        from pipeline.store.space import results_bytes

        plan = build_cka_work(cfg, self._paths(cfg, ctx), ctx.workflow.cluster, scratch=ctx.output / "grams")
        n_values = len(plan.rows) * len(plan.cols)
        scratch = len(plan.phases[0]) * 8 * plan.align.n ** 2 if plan.method == "gram-cache" else 0
        # the matrix and its 12 coordinates; the CSV (~120 bytes per entry), the task results, the alignment
        return (results_bytes(13, n_values, len(plan.tasks) + 2, 1) + 120 * n_values + 16 * plan.align.n
                + scratch)

    def _attrs(self, cfg: CKAConfig, ctx: RunContext, plan: CKAWork, finished: dict, failed: list) -> dict:
        estimator = {"estimator": cfg.estimator, "method": plan.method}
        if cfg.estimator == "minibatch":
            batches = {r.get("n_batches") for r in finished.values()}
            estimator |= {"batch_size": cfg.batch_size, "seed": cfg.seed, "epochs": cfg.epochs,
                          "n_batches": batches.pop() if len(batches) == 1 else None,
                          "hsic": "unbiased HSIC_1 (Song et al. 2012), mean over batches"}
        if cfg.estimator == "rbf":
            estimator |= {"sigma_fraction": cfg.sigma_fraction}
        if plan.method == "stream":
            estimator["routes"] = sorted({r.get("route") for r in finished.values() if r.get("route")})
        stores = {}
        for name, path in self._paths(cfg, ctx).items():
            src = store.read_attrs(path) or {}
            stores[name] = {"path": str(path), "stage": src.get("stage"), "stage_hash": src.get("stage_hash")}
        return ctx.base_attrs() | {
            "mode": cfg.mode, "cka": estimator, "n_samples": plan.align.n, "view": cfg.view,
            "n_excluded": plan.align.n_excluded, "stores": stores, "memory_limit_bytes": plan.memory_bytes,
            "failed": failed}

    def plan(self, cfg: CKAConfig, ctx: RunContext) -> list[tuple[str, str]]:
        paths = self._paths(cfg, ctx)
        missing = [str(p) for p in paths.values() if store.read_attrs(p) is None]
        if missing:
            planned = self._planned_work(cfg, ctx)
            if planned is None:
                return [("inputs", f"{missing[0]} (not written yet: plan it after its stage has run)"),
                        ("time (est.)", NOT_ESTIMATED)]
            rows, cols, n, method = planned
            return [("inputs", f"{missing[0]} (not written yet: planned from its stage's shapes)"),
                    ("matrix", f"{len(rows)} x {len(cols)} ({cfg.mode}), {cfg.estimator}, {method}"),
                    ("samples", f"{n} (view {cfg.view}, before failed images are excluded)"),
                    *self._estimate_rows(cfg, ctx, rows, cols, n, method)]
        plan = build_cka_work(cfg, paths, ctx.workflow.cluster, scratch=ctx.output / "grams")
        scratch = f"; scratch Grams {len(plan.phases[0]) * 8 * plan.align.n ** 2 / 2**30:.2f} GiB" \
            if plan.method == "gram-cache" else ""
        return [
            ("matrix", f"{len(plan.rows)} x {len(plan.cols)} ({cfg.mode}), {cfg.estimator}"),
            ("samples", f"{plan.align.n} matched by image_id in view {cfg.view} "
                        f"({plan.align.n_excluded} excluded)"),
            ("tasks", f"{len(plan.tasks)} ({plan.method}), each <= {plan.memory_bytes / 2**20:.0f} MiB"
                      + scratch),
            *self._estimate_rows(cfg, ctx, plan.rows, plan.cols, plan.align.n, plan.method),
        ]

    def estimate(self, cfg: CKAConfig, ctx: RunContext) -> list:
        """The ``pipeline.estimate.Estimate`` list behind plan's time row (written or planned inputs)."""
        paths = self._paths(cfg, ctx)
        if any(store.read_attrs(p) is None for p in paths.values()):
            rows, cols, n, method = self._planned_work(cfg, ctx)
        else:
            plan = build_cka_work(cfg, paths, ctx.workflow.cluster, scratch=ctx.output / "grams")
            rows, cols, n, method = plan.rows, plan.cols, plan.align.n, plan.method
        return self._estimates(cfg, ctx, rows, cols, n, method)[0]

    def _estimates(self, cfg: CKAConfig, ctx: RunContext, rows, cols, n: int, method: str):
        from pipeline.cka.estimate import cka_estimates, n_tasks_hint
        from pipeline.estimate import cluster_workers

        union = list(dict.fromkeys(rows + cols))
        index = {r.label: k for k, r in enumerate(union)}
        pairs = [(index[rows[i].label], index[cols[j].label]) for i, j in sorted(needed_pairs(rows, cols))]
        workers, note = cluster_workers(ctx.workflow.cluster)
        workers = min(workers, n_tasks_hint(method, len(union), len(pairs)))
        return cka_estimates(method, cfg.estimator, [r.n_features for r in union], pairs, n, cfg.batch_size,
                             cfg.epochs, cfg.sigma_fraction, workers), workers, note

    def _estimate_rows(self, cfg: CKAConfig, ctx: RunContext, rows, cols, n: int, method: str):
        from pipeline.estimate import plan_rows

        estimates, workers, note = self._estimates(cfg, ctx, rows, cols, n, method)
        return plan_rows(estimates, workers, note, "random float16 data of the real sizes (scaled by flop "
                         "count above the sample's size); reading the slices is not included")

    def _planned_work(self, cfg: CKAConfig, ctx: RunContext):
        """(rows, cols, n, method) from the planned shapes of inputs not written yet, or None."""
        from pipeline.estimate import input_shape

        paths = self._paths(cfg, ctx)
        shapes = {name: input_shape(ctx.workflow, name, ctx.prepared_by_stage) for name in paths}
        if any(s is None for s in shapes.values()):
            return None

        def expand(selections):
            out = []
            for sel in selections:
                shape = shapes[sel.input]
                item = np.dtype(store.STORAGE_DTYPES[shape.dtype]).itemsize
                blocks = list(dict.fromkeys(b for b, _ in shape.slices))
                blocks = blocks if sel.blocks == "all" else [b for b in blocks if b in sel.blocks]
                ts = shape.timesteps if sel.timesteps == "all" else [t for t in shape.timesteps if t in sel.timesteps]
                for block in blocks:
                    pools = [p for b, p in shape.slices if b == block]
                    for pool in pools if sel.pool == "all" else [p for p in pools if p in sel.pool]:
                        for k, t in enumerate(ts):
                            out.append(Representation(sel.input, paths[sel.input], "", block, pool, int(t), k,
                                                      int(np.prod(shape.slices[(block, pool)])), item,
                                                      shape.pooled))
            return out

        rows = expand(cfg.selections or cfg.rows)
        cols = rows if cfg.mode == "within" else expand(cfg.cols)
        n = min(s.n_images for s in shapes.values())
        budget = memory_bytes(cfg, ctx.workflow.cluster)
        method = _choose_method(cfg, rows, cols, n, budget, min(READ_BYTES_MAX, budget // READ_SHARE))
        return rows, cols, n, method
