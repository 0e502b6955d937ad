"""Adaptive average / max pooling of feature maps, in numpy, over the last two axes.

The result equals torch's ``adaptive_avg_pool2d`` / ``adaptive_max_pool2d``: output
bin ``i`` of ``p`` along an axis of length ``H`` covers input rows
``[floor(i * H / p), ceil((i + 1) * H / p))``. Bins overlap when ``H`` is not a
multiple of ``p`` (7 -> 3 gives ``[0, 3), [2, 5), [4, 7)``), and when ``p > H`` some
input rows are repeated, exactly as torch does.

Being plain numpy, :func:`adaptive_pool` runs inside ``dask.array.map_blocks`` on a
chunk of a store. A chunk must hold whole feature maps along ``y`` and ``x`` (the
store's ``(n, 1, C, H, W)`` chunks do); leading axes may be chunked freely.

Dtypes: inputs may be float16 (the store default), bfloat16-as-float32 or float32.
Averages are accumulated in float32 and every result is float32 — a float16 sum over
a 64x64 map would lose digits and can overflow; maxima are exact in any dtype and
are only converted.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from pipeline.errors import ConfigError

PoolMode = Literal["avg", "max"]
POOL_MODES = ("avg", "max")


def pool_bins(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Start (inclusive) and end (exclusive) input index of each of ``n_out`` bins.

    Parameters
    ----------
    n_in : int
        Input length along one axis (>= 1).
    n_out : int
        Number of output bins (>= 1); may exceed ``n_in``.

    Returns
    -------
    starts, ends : (n_out,) int64
        ``starts[i] = floor(i * n_in / n_out)``, ``ends[i] = ceil((i + 1) * n_in / n_out)``.
    """
    i = np.arange(n_out, dtype=np.int64)
    starts = (i * n_in) // n_out
    ends = -((-(i + 1) * n_in) // n_out)
    return starts, ends


def pooled_shape(shape: tuple[int, ...], size: int) -> tuple[int, ...]:
    """Shape of :func:`adaptive_pool`'s result for an input of ``shape``.

    ``(..., H, W) -> (..., size, size)``; e.g. ``(n, T, C, H, W) -> (n, T, C, p, p)``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ConfigError(f"pooling needs at least 2 axes (y, x); got shape {shape}")
    _check_size(size)
    return shape[:-2] + (int(size), int(size))


def adaptive_pool(x: np.ndarray, size: int, mode: PoolMode = "avg") -> np.ndarray:
    """Adaptive average or max pooling of the last two axes to ``size x size``.

    Parameters
    ----------
    x : (..., H, W) array
        Feature maps with any leading axes, e.g. ``(n, T, C, H, W)``. Must hold whole
        maps along the last two axes (pooling a partial map gives wrong bins).
    size : int
        Output side ``p`` (>= 1). ``p > H`` is allowed and repeats input rows, as
        torch does.
    mode : {"avg", "max"}
        Reduction within each bin.

    Returns
    -------
    (..., size, size) float32
    """
    _check_size(size)
    if mode not in POOL_MODES:
        raise ConfigError(f"unknown pooling mode {mode!r}; valid: {', '.join(POOL_MODES)}")
    x = np.asarray(x)
    if x.ndim < 2 or x.shape[-1] == 0 or x.shape[-2] == 0:
        raise ConfigError(f"pooling needs maps with y, x >= 1 in the last two axes; got shape {x.shape}")
    if mode == "avg":
        return _pool_avg(x, size)
    return _pool_max(x, size)


def _pool_avg(x: np.ndarray, size: int) -> np.ndarray:
    # Bins are rectangles with uniform weight, so the 2-D mean separates into a
    # row-sum pass then a column-sum pass, divided once by the bin area.
    h_starts, h_ends = pool_bins(x.shape[-2], size)
    w_starts, w_ends = pool_bins(x.shape[-1], size)
    rows = np.stack(
        [x[..., s:e, :].sum(axis=-2, dtype=np.float32) for s, e in zip(h_starts, h_ends)], axis=-2
    )
    sums = np.stack(
        [rows[..., s:e].sum(axis=-1, dtype=np.float32) for s, e in zip(w_starts, w_ends)], axis=-1
    )
    area = np.outer(h_ends - h_starts, w_ends - w_starts).astype(np.float32)
    return sums / area


def _pool_max(x: np.ndarray, size: int) -> np.ndarray:
    h_starts, h_ends = pool_bins(x.shape[-2], size)
    w_starts, w_ends = pool_bins(x.shape[-1], size)
    rows = np.stack([x[..., s:e, :].max(axis=-2) for s, e in zip(h_starts, h_ends)], axis=-2)
    out = np.stack([rows[..., s:e].max(axis=-1) for s, e in zip(w_starts, w_ends)], axis=-1)
    return out.astype(np.float32, copy=False)


def pool_dask(arr, size: int, mode: PoolMode = "avg"):
    """:func:`adaptive_pool` applied chunk by chunk to a dask array.

    Parameters
    ----------
    arr : dask.array.Array, shape (..., H, W)
        Each chunk must span the whole of the last two axes (one chunk along y and
        x); leading axes may be chunked in any way. Memory per task is one input
        chunk plus its float32 result.
    size, mode
        As for :func:`adaptive_pool`.

    Returns
    -------
    dask.array.Array, shape (..., size, size), float32, same chunks on leading axes.
    """
    _check_size(size)
    if mode not in POOL_MODES:
        raise ConfigError(f"unknown pooling mode {mode!r}; valid: {', '.join(POOL_MODES)}")
    if arr.ndim < 2:
        raise ConfigError(f"pooling needs at least 2 axes (y, x); got shape {arr.shape}")
    if arr.numblocks[-2] != 1 or arr.numblocks[-1] != 1:
        raise ConfigError(
            f"pooling needs whole maps per chunk, but y/x are split into chunks {arr.chunks[-2:]}; "
            "rechunk with arr.rechunk({-2: -1, -1: -1}) first"
        )
    return arr.map_blocks(
        adaptive_pool,
        size=int(size),
        mode=mode,
        chunks=arr.chunks[:-2] + ((int(size),), (int(size),)),
        dtype=np.float32,
        meta=np.empty((0,) * arr.ndim, dtype=np.float32),
    )


def _check_size(size) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(f"pool size must be an integer >= 1; got {size!r}")
