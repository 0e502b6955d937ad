"""Minibatch CKA (unbiased HSIC_1) and RBF CKA: the estimators besides exact linear CKA.

Both build on :mod:`pipeline.cka` (Gram centring, float64 upcasting); see its
docstring for the references.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.cka import _check_samples, _float64_block, _frobenius_inner, _ratio, center_gram, cka_from_grams
from pipeline.errors import ConfigError

# -------------------------------------------------------------------- minibatch CKA


@dataclass(frozen=True)
class MinibatchCKAResult:
    """Minibatch CKA and what is needed to reproduce it.

    ``hsic_*`` are the means of HSIC_1 over batches; ``value`` is
    hsic_xy / sqrt(hsic_xx hsic_yy), NaN when a self term is 0 (``note`` says why).
    """

    value: float
    batch_size: int
    n_batches: int
    hsic_xy: float
    hsic_xx: float
    hsic_yy: float
    seed: int | None = None
    n_epochs: int | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _u_centred_linear_gram(batch: Any, name: str) -> np.ndarray:
    x = _float64_block(batch, name)
    x -= x.mean(axis=0)  # HSIC_1 is unchanged by feature means; centring first avoids cancellation
    return center_gram(x @ x.T, unbiased=True)


class MinibatchCKA:
    """Minibatch linear CKA (Nguyen, Raghu & Kornblith 2021) over 2 or more representations.

    Each :meth:`update` takes one batch of the same samples, in the same order, for
    every representation: ``(b, p_i)`` arrays, b fixed over all updates and >= 4.
    It accumulates HSIC_1 for every pair; CKA = mean HSIC_1(K, L) /
    sqrt(mean HSIC_1(K, K) mean HSIC_1(L, L)).

    With U-centring the self terms are squared norms, never negative, so the square
    root is always defined; only a representation constant on every batch makes a
    self term 0, and then the value is NaN with a warning and a note, not a clamp.
    The cross term may be negative, so unrelated representations can give values
    slightly below 0; |CKA| <= 1 still holds (Cauchy-Schwarz).
    """

    def __init__(self, n_representations: int = 2):
        if n_representations < 2:
            raise ConfigError(f"CKA compares at least 2 representations; got {n_representations}")
        self.n_representations = n_representations
        self.batch_size: int | None = None
        self.n_batches = 0
        self._sums = np.zeros((n_representations, n_representations))

    def update(self, *batches: Any) -> None:
        """Add one minibatch: one ``(b, p_i)`` array per representation."""
        if len(batches) != self.n_representations:
            raise ConfigError(f"expected {self.n_representations} batches, got {len(batches)}")
        sizes = {np.shape(b)[0] for b in batches}
        if len(sizes) != 1:
            raise ConfigError(f"batches hold different sample counts {sorted(sizes)}; feed the same "
                              f"samples in the same order to every representation")
        b = sizes.pop()
        if b < 4:
            raise ConfigError(f"minibatch CKA needs batches of at least 4 samples (unbiased HSIC "
                              f"divides by n(n-3)); got {b}")
        if self.batch_size is not None and b != self.batch_size:
            raise ConfigError(f"batch of {b} samples after batches of {self.batch_size}; minibatch "
                              f"CKA needs one fixed batch size (drop the last partial batch)")
        self.batch_size = b
        u = [_u_centred_linear_gram(x, f"batch {i}") for i, x in enumerate(batches)]
        scale = 1.0 / (b * (b - 3))
        for i in range(self.n_representations):
            for j in range(i, self.n_representations):
                self._sums[i, j] += _frobenius_inner(u[i], u[j]) * scale
                self._sums[j, i] = self._sums[i, j]
        self.n_batches += 1

    def _means(self) -> np.ndarray:
        if self.n_batches == 0:
            raise RuntimeError("no minibatch was added")
        return self._sums / self.n_batches

    def matrix(self) -> np.ndarray:
        """``(m, m)`` CKA between all representations (NaN rows for constant ones)."""
        h = self._means()
        d = np.sqrt(np.diag(h))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(np.outer(d, d) > 0, h / np.outer(d, d), np.nan)

    def result(self, i: int = 0, j: int = 1) -> MinibatchCKAResult:
        """CKA between representations i and j, with the mean HSIC_1 terms."""
        h = self._means()
        xy, xx, yy = float(h[i, j]), float(h[i, i]), float(h[j, j])
        note = ""
        if not (xx > 0 and yy > 0):
            note = (f"undefined: mean HSIC_1 self terms are {xx:.3g} and {yy:.3g} (a representation "
                    f"is constant within every batch)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            value = _ratio(xy, xx, yy)
        if note:
            warnings.warn(f"minibatch CKA {note}; returning NaN", RuntimeWarning, stacklevel=2)
        return MinibatchCKAResult(value, self.batch_size or 0, self.n_batches, xy, xx, yy, note=note)


def _take_rows(a: Any, idx: np.ndarray) -> Any:
    return a.oindex[idx] if hasattr(a, "oindex") else np.asarray(a)[idx]


def minibatch_cka(X: Any, Y: Any, batch_size: int, seed: int = 0, n_epochs: int = 1) -> MinibatchCKAResult:
    """Minibatch linear CKA over shuffled batches of X (n, p1) and Y (n, p2).

    Each epoch draws a permutation from ``np.random.default_rng(seed)`` and cuts it
    into ``n // batch_size`` batches; the ``n % batch_size`` left-over samples of that
    epoch are skipped (a partial batch would break the fixed batch size). Returns
    the value with batch size, seed, epochs and number of batches for the record.
    """
    n, n_y = np.shape(X)[0], np.shape(Y)[0]
    _check_samples(n, n_y, "Y")
    if batch_size < 4:
        raise ConfigError(f"batch_size must be at least 4 for the unbiased HSIC; got {batch_size}")
    if batch_size > n:
        raise ConfigError(f"batch_size {batch_size} exceeds the {n} samples")
    if n_epochs < 1:
        raise ConfigError(f"n_epochs must be at least 1; got {n_epochs}")
    rng = np.random.default_rng(seed)
    acc = MinibatchCKA()
    for _ in range(n_epochs):
        perm = rng.permutation(n)
        for k in range(n // batch_size):
            idx = np.sort(perm[k * batch_size:(k + 1) * batch_size])  # sorted: sequential reads
            acc.update(_take_rows(X, idx), _take_rows(Y, idx))
    r = acc.result()
    return MinibatchCKAResult(r.value, r.batch_size, r.n_batches, r.hsic_xy, r.hsic_xx, r.hsic_yy,
                              seed=seed, n_epochs=n_epochs, note=r.note)


# -------------------------------------------------------------------------- RBF CKA


def gram_rbf(X: Any, sigma_fraction: float = 1.0) -> np.ndarray:
    """Gaussian-kernel Gram ``exp(-||x_i - x_j||^2 / (2 sigma^2))`` of X (n, p).

    sigma^2 = sigma_fraction^2 x median of the n x n squared distances, the diagonal
    zeros included, exactly as the reference code of Kornblith et al. 2019 (whose
    default fraction is 1.0; the paper also reports 0.2, 0.4 and 0.8). Holds about
    three ``(n, n)`` float64 arrays: for small n.
    """
    if not sigma_fraction > 0:
        raise ConfigError(f"sigma_fraction must be positive; got {sigma_fraction}")
    x = _float64_block(X, "X")
    x -= x.mean(axis=0)  # distances are unchanged; smaller norms, less cancellation
    return rbf_gram_from_linear(x @ x.T, sigma_fraction)


def rbf_gram_from_linear(gram: np.ndarray, sigma_fraction: float) -> np.ndarray:
    """RBF Gram from a (centred) linear Gram K = X X^T, in place.

    ``||x_i - x_j||^2 = K_ii + K_jj - 2 K_ij``; sigma^2 = sigma_fraction^2 x the median
    squared distance, zeros included. Lets a task that already holds K skip re-reading X.
    """
    sq = np.diag(gram).copy()
    gram *= -2.0
    gram += sq[:, None]
    gram += sq[None, :]
    np.maximum(gram, 0.0, out=gram)  # round-off can leave tiny negative squared distances
    median = float(np.median(gram))
    if median <= 0:
        raise ConfigError("RBF bandwidth is 0: over half the pairwise distances are 0 "
                          "(duplicate or constant samples); use linear CKA (estimator: linear)")
    gram /= -2.0 * sigma_fraction**2 * median
    return np.exp(gram, out=gram)


def rbf_cka(X: Any, Y: Any, sigma_fraction: float = 1.0, unbiased: bool = False) -> float:
    """RBF-kernel CKA of X (n, p1) and Y (n, p2); see :func:`gram_rbf` for the bandwidth."""
    _check_samples(np.shape(X)[0], np.shape(Y)[0], "Y")
    return cka_from_grams(gram_rbf(X, sigma_fraction), gram_rbf(Y, sigma_fraction), unbiased)
