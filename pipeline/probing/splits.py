"""Seeded splits of samples by group (an image and its views): train/test and validation.

Every view of an image lands on one side of a split, so a probe is never tested on
another view of a training image. Group keys are factorised to integer codes first
(``np.unique(..., return_inverse=True)`` on plain ``str``), then membership is a table
lookup: linear after the sort, where ``np.isin`` over object arrays of image ids
compared strings in a Python loop (1.7 h per probe task at ImageNet size).
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import ConfigError


def split_groups(keys: np.ndarray, fraction: float, seed: int, salt: int, what: str) -> np.ndarray:
    """Choose a seeded share of the distinct ``keys``; returns the (n,) bool mask of their samples.

    Parameters
    ----------
    keys : (n,) group key per sample (image ids as str, or integer group codes).
    fraction : share of distinct groups chosen (at least one, and at least one left).
    seed : the split's seed; ``salt`` separates independent splits of one seed.
    what : the split's name for the error message (``"train/test"``, ``"validation"``).
    """
    keys = np.asarray(keys)
    if keys.dtype == object:
        keys = keys.astype(str)
    unique, codes = np.unique(keys, return_inverse=True)
    if len(unique) < 2:
        raise ConfigError(f"a {what} split needs >= 2 groups (images); got {len(unique)}")
    n_chosen = min(max(1, round(fraction * len(unique))), len(unique) - 1)
    rng = np.random.default_rng([seed, salt])
    chosen = np.zeros(len(unique), dtype=bool)
    chosen[rng.permutation(len(unique))[:n_chosen]] = True
    return chosen[codes.reshape(-1)]
