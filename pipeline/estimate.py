"""Time estimates for ``diffprobe plan``: a small measured sample of a stage's real work,
extrapolated by counting how many such pieces the run does.

:func:`measure` times a piece of work the way a run would meet it: ``warmup`` calls
first (they pay one-time costs: allocator growth, oneDNN kernel selection, lazy
imports), then the **median** of several timed calls (a shared machine's neighbours
make single timings swing: one timed call moved 3.5x between two plans of the same
architecture), with torch's intra-op threads fixed at what the run uses, all inside a
time box (``budget_s``: a slow piece is timed fewer times, never less than once after
one warm-up).

An :class:`Estimate` is ``sample.seconds x scale x count / workers``: the measured
piece, how much bigger the real piece is (1 when measured at the real size; a
complexity ratio such as ``n^2 d / (n_s^2 d_s)`` when the real piece is too big to
time on a login node), how many pieces the stage computes, and over how many workers
they spread. Every plan row built from one says what it rests on.

:class:`StoreShape` is what a later stage needs to know about its input to estimate
before that input exists (plan before extract): sample count, units, timesteps and
the (C, H, W) of each (block, pool) slice, from the store when it is written or from
the input stage's ``planned_shape`` (``pipeline.workflow.stage.Stage``) otherwise.

:func:`gpu_projection` turns a counted FLOP total into GPU hours at a stated share of
an H100's dense fp16 peak: a projection for planning on a machine without the GPU,
never a measurement.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: NVIDIA H100 SXM5 datasheet: 989.4 TFLOP/s dense FP16/BF16 tensor-core throughput
#: (1,979 with 2:4 sparsity, which a U-Net forward does not use).
H100_FP16_DENSE_FLOPS = 989.4e12
#: Share of that peak assumed for a convolutional U-Net forward in fp16 at batch >= 32:
#: a planning assumption, stated wherever it is used (benchmarks/gpu/run.sh measures it).
ASSUMED_GPU_UTILISATION = 0.4


@dataclass(frozen=True)
class Sample:
    """A measured piece of work.

    seconds: median time per call (CPU time with one thread, else wall time; see
    :func:`measure`). timed / warmup: how many timings and warm-up calls. threads: torch intra-op threads during the calls. spread: slowest / fastest
    timed call (1.0 with one timed call).
    """

    seconds: float
    timed: int
    warmup: int
    threads: int
    spread: float = 1.0
    clock: str = "wall"

    def describe(self) -> str:
        clock = "CPU time" if self.clock == "cpu" else "wall time"
        return (f"{clock}, median of {self.timed} after {self.warmup} warm-up, {self.threads} torch thread(s)"
                + (f", spread {self.spread:.2f}x" if self.timed > 1 else ""))


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """torch's intra-op threads set to ``n`` (None: as they are) and BLAS pools limited to
    ``n`` too (dask workers run with ``OMP_NUM_THREADS=1``), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    limits = contextlib.nullcontext()
    if n is not None:
        torch.set_num_threads(n)
        try:
            from threadpoolctl import threadpool_limits

            limits = threadpool_limits(limits=n)
        except ImportError:  # numpy's BLAS then keeps its own threads
            pass
    try:
        with limits:
            yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def measure(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5, budget_s: float = 5.0,
            threads: int | None = None, min_timing_s: float = 0.02) -> Sample:
    """Time ``fn()``: ``warmup`` untimed calls, then up to ``repeats`` timings; median per call.

    A timing runs ``fn`` as many times as last ``min_timing_s`` (from the last warm-up
    call; once for anything slower), since a sub-millisecond call timed alone is mostly
    timer and scheduler noise. The time box: timings stop once ``budget_s`` seconds
    (warm-up included) are spent, after at least one; a warm-up call that alone exceeds
    the budget ends the warm-up there.

    A piece run with ``threads=1`` is timed by the process's CPU time: what it costs on
    a core of its own (as on a worker's core), whatever else the machine runs; the wall
    clock would count the time other processes hold the core (and several threads
    spin-waiting for each other inflate CPU time too, so CPU time is only taken on one).
    Anything else (several threads, a GPU, whose work is not CPU time) by the wall clock.
    """
    kind = "cpu" if threads == 1 else "wall"
    timer = time.process_time if kind == "cpu" else time.perf_counter
    start = time.perf_counter()
    with torch_threads(threads) as used:
        done_warm, last = 0, None
        for _ in range(warmup):
            t0 = time.perf_counter()
            fn()
            last = time.perf_counter() - t0
            done_warm += 1
            if time.perf_counter() - start > budget_s:
                break
        calls = 1 if not last or last >= min_timing_s else min(1000, math.ceil(min_timing_s / last))
        times: list[float] = []
        while len(times) < max(1, repeats):
            t0 = timer()
            for _ in range(calls):
                fn()
            times.append((timer() - t0) / calls)
            if time.perf_counter() - start > budget_s:
                break
    return Sample(statistics.median(times), len(times), done_warm, used,
                  max(times) / min(times) if min(times) > 0 else 1.0, kind)


@dataclass(frozen=True)
class Estimate:
    """``seconds = sample.seconds x scale x count / workers`` (see the module docstring).

    what: the measured piece in words (``"a training step of 'linear' on (16, 4, 4) x 32"``).
    """

    what: str
    sample: Sample
    count: float
    scale: float = 1.0
    workers: int = 1

    @property
    def seconds(self) -> float:
        return self.sample.seconds * self.scale * self.count / max(1, self.workers)

    def describe(self) -> str:
        scaled = f" x {self.scale:.3g} (size ratio)" if self.scale != 1 else ""
        return f"{self.count:,.0f} x {self.what} ({format_seconds(self.sample.seconds)}{scaled})"


def merged(estimates: Iterable[Estimate]) -> list[Estimate]:
    """Estimates of the same piece (same measured sample, scale and workers) as one, counts summed."""
    groups: dict[tuple, list[Estimate]] = {}
    for e in estimates:
        groups.setdefault((e.what, id(e.sample), e.scale, e.workers), []).append(e)
    return [Estimate(es[0].what, es[0].sample, sum(e.count for e in es), es[0].scale, es[0].workers)
            for es in groups.values()]


def total_seconds(estimates: Iterable[Estimate]) -> float:
    return sum(e.seconds for e in estimates)


def plan_rows(estimates: list[Estimate], workers: int, workers_note: str, rests_on: str) -> list[tuple[str, str]]:
    """The plan's ``time (est.)`` row and the rows that say what it rests on.

    ``workers``: tasks that run side by side (the estimates are already divided by it);
    ``rests_on``: what the measurement leaves out or assumes, in words.
    """
    largest = sorted(merged(estimates), key=lambda e: -e.seconds)
    pieces = "; ".join(e.describe() for e in largest[:3]) + (
        f"; and {len(largest) - 3} smaller" if len(largest) > 3 else "")
    sample = largest[0].sample if estimates else None
    return [
        ("time (est.)", f"{format_seconds(total_seconds(estimates))} on {workers} worker(s) ({workers_note})"),
        ("time from", pieces),
        ("measured as", (f"largest piece: {sample.describe()}; " if sample else "") + rests_on),
    ]


def cluster_workers(cluster) -> tuple[int, str]:
    """Tasks a workflow's cluster runs side by side, and how that was read from its config."""
    kind = getattr(cluster, "kind", "local")
    if kind == "address":
        return 1, "an existing scheduler: divide by its worker threads"
    n = max(1, int(cluster.n_workers)) * max(1, int(getattr(cluster, "threads_per_worker", 1)))
    return n, f"cluster {kind}: {cluster.n_workers} x {getattr(cluster, 'threads_per_worker', 1)} thread(s)"


def format_seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# ----------------------------------------------------------------- GPU projection


def gpu_projection(flops: float, utilisation: float = ASSUMED_GPU_UTILISATION) -> str:
    """``flops`` as hours on one H100 at ``utilisation`` of its dense fp16 peak, in words."""
    seconds = flops / (H100_FP16_DENSE_FLOPS * utilisation)
    return (f"{seconds / 3600:.3g} GPU h = {format_seconds(seconds)} on one H100 (projection: {flops:.3g} FLOP "
            f"counted, at {utilisation:.0%} of its {H100_FP16_DENSE_FLOPS / 1e12:.0f} TFLOP/s fp16 dense peak; "
            "run plan on the GPU node to measure)")


# ----------------------------------------------------------------- shapes of inputs


@dataclass(frozen=True)
class StoreShape:
    """What a stage's estimate needs to know about an input store, written or planned.

    slices: {(block, pool): (C, H, W)} in forward order (pool = the map side for an
    unpooled store). n_images: samples of view 0 (what CKA compares).
    """

    n_samples: int
    unit_samples: int
    timesteps: tuple[int, ...]
    slices: dict[tuple[str, int], tuple[int, int, int]]
    dtype: str
    n_classes: int
    n_images: int
    views: int = 1
    pooled: bool = False
    planned: bool = True  # False: read from a written store

    @property
    def n_units(self) -> int:
        return math.ceil(self.n_samples / self.unit_samples)

    @classmethod
    def from_store(cls, path: str | Path) -> "StoreShape":
        import numpy as np

        from pipeline import store
        from pipeline.store.slices import feature_slices

        layout = store.load_layout(path)
        root = store.open_root(path)
        views = np.asarray(root["view"][:])
        pooled = bool((store.read_attrs(path) or {}).get("pooled"))
        slices = {key: tuple(fs.shape) for key, fs in feature_slices(path).items()}
        return cls(layout.n_samples, layout.unit_samples, tuple(layout.timesteps), slices, layout.dtype,
                   len(root["class_name"][:]), int((views == 0).sum()), int(views.max()) + 1 if len(views) else 1,
                   pooled, planned=False)


#: planned shapes already computed in this process: {(workflow file, stage name): StoreShape}
_PLANNED: dict[tuple[str, str], StoreShape | None] = {}


def input_shape(workflow, name: str, prepared_by_stage: dict | None = None) -> StoreShape | None:
    """The shape of stage ``name``'s output: read from its store when written, else planned
    by its stage (an extract builds its model on the CPU and lists its dataset, or reuses
    those its ``validate`` put in ``prepared_by_stage``, a run's
    ``RunContext.prepared_by_stage``); None when the stage cannot say. Planned shapes are
    kept for the process (plan asks per stage)."""
    from pipeline import store

    entry = workflow.stage(name)
    if store.read_attrs(entry.output) is not None:
        return StoreShape.from_store(entry.output)
    key = (str(workflow.file), name)
    if key not in _PLANNED:
        _PLANNED[key] = entry.stage_class().planned_shape(entry.config, entry, workflow, prepared_by_stage)
    return _PLANNED[key]


def remember_shape(workflow, name: str, shape: StoreShape) -> None:
    """Keep the planned shape a stage's own plan found, so later stages need not rebuild it."""
    _PLANNED[(str(workflow.file), name)] = shape
