"""Centered kernel alignment (CKA): pure estimators on arrays, float64 throughout.

Three estimators, all from Kornblith et al. 2019 and Nguyen, Raghu & Kornblith 2021:

- **Exact linear CKA**, streamed so that no ``(n, p)`` float64 matrix is ever held.
  Two routes give the same number; :func:`linear_route` picks the one that holds
  fewer bytes:

  ``"gram"``     two ``(n, n)`` centred Gram matrices K = Xc Xc^T and L = Yc Yc^T,
                 summed over *column* (feature) chunks of X and of Y separately;
                 holds ``2 n^2 x 8`` bytes. Centring a column chunk needs only its
                 own column means, so every partial Gram is exactly centred and
                 partial Grams from different workers simply add up.
  ``"feature"``  the co-moment matrices Xc^T Xc, Yc^T Yc, Xc^T Yc, merged over
                 *row* (sample) blocks of X and Y together with the pairwise
                 update of Chan, Golub & LeVeque; holds ``(p1^2 + p2^2 + p1 p2) x 8``
                 bytes, whatever n is.

- **Minibatch CKA** with the unbiased HSIC_1 (Song et al. 2012), computed as in the
  reference code through U-centred Grams (Szekely & Rizzo 2014), and
- **RBF CKA** for small n, bandwidth a fraction of the median distance.

Every chunk is upcast to float64 before any product: a float16 Gram entry over 65504
(e.g. the squared norm of 80k unit-scale features) would be inf.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.errors import ConfigError

#: float64 working set of one upcast chunk when the caller gives no chunk size.
DEFAULT_CHUNK_BYTES = 64 * 2**20
ROUTES = ("gram", "feature")


# --------------------------------------------------------------------------- helpers


def _float64_block(a: Any, name: str) -> np.ndarray:
    """Return a fresh C-ordered float64 copy of a 2-D block; refuse NaN/inf."""
    arr = np.asarray(a)
    if arr.ndim != 2:
        raise ConfigError(f"{name} must be 2-D (samples, features); got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ConfigError(f"{name} has dtype {arr.dtype}; CKA needs real-valued features")
    out = arr.astype(np.float64, order="C", copy=True)
    if not np.isfinite(out).all():
        raise ConfigError(f"{name} contains NaN or inf; CKA needs finite features "
                          f"(re-extract the block or drop the samples the store flagged)")
    return out


def _check_samples(n_expected: int, n_got: int, what: str) -> None:
    if n_got != n_expected:
        raise ConfigError(f"{what} has {n_got} samples but {n_expected} were expected; "
                          f"both representations must hold the same samples in the same order")


def _ratio(num: float, xx: float, yy: float) -> float:
    """num / sqrt(xx yy); NaN with a warning when a self-similarity is not positive."""
    if not (xx > 0 and yy > 0):
        warnings.warn(f"CKA undefined: self-similarity terms are {xx:.3g} and {yy:.3g} "
                      f"(a representation is constant over the samples); returning NaN",
                      RuntimeWarning, stacklevel=3)
        return math.nan
    return float(num / math.sqrt(xx * yy))


def _syrk_upper(c: np.ndarray, a: np.ndarray, trans: int) -> None:
    """Add ``a^T a`` (trans=1) or ``a a^T`` (trans=0) to the upper triangle of ``c``.

    ``c`` is an F-ordered float64 buffer updated in place; ``a`` should be F-ordered
    too (a transposed C-ordered block is), else BLAS copies it. Half a matmul's flops.
    """
    from scipy.linalg import blas  # scipy.linalg's import costs ~0.5-1 s: only where a Gram is computed

    out = blas.dsyrk(1.0, a, beta=1.0, c=c, trans=trans, lower=0, overwrite_c=1)
    if not np.shares_memory(out, c):  # pragma: no cover - BLAS contract
        raise RuntimeError("dsyrk did not update the buffer in place")


def _symmetrize_upper(c: np.ndarray, block: int = 1024) -> None:
    """Copy the upper triangle onto the lower one, in blocks (no n^2 index arrays)."""
    n = c.shape[0]
    for i in range(0, n, block):
        c[i:i + block, :i] = c[:i, i:i + block].T
        sub = c[i:i + block, i:i + block]
        sub[...] = np.triu(sub) + np.triu(sub, 1).T


def _frobenius_inner(a: np.ndarray, b: np.ndarray) -> float:
    """sum_ij a_ij b_ij without copies; a and b are C-contiguous and equally shaped."""
    return float(np.dot(a.ravel(), b.ravel()))


# ------------------------------------------------------------------- route choice


def linear_route_bytes(n: int, p1: int, p2: int) -> dict[str, int]:
    """Bytes each exact linear-CKA route holds, besides one upcast chunk.

    Returns ``{"gram": 2 n^2 x 8, "feature": (p1^2 + p2^2 + p1 p2 + p1 + p2) x 8}``.
    """
    return {"gram": 2 * n * n * 8, "feature": (p1 * p1 + p2 * p2 + p1 * p2 + p1 + p2) * 8}


def linear_route(n: int, p1: int, p2: int) -> str:
    """The cheaper exact route for ``n`` samples and ``p1``, ``p2`` features.

    ``"feature"`` when its co-moments hold fewer bytes than the two Grams, else
    ``"gram"``. For p1 = p2 = p that is p < 0.82 n; the flop counts, n^2 (p1 + p2)
    against n (p1 + p2)^2, favour the same side except near the boundary.
    """
    b = linear_route_bytes(n, p1, p2)
    return "feature" if b["feature"] < b["gram"] else "gram"


# --------------------------------------------------------------------- Gram route


def partial_gram(columns: Any) -> np.ndarray:
    """Centred linear Gram of one column chunk: ``Xc_j Xc_j^T``.

    Parameters
    ----------
    columns : array_like, (n, p_chunk), any real dtype (float16 included)
        Some feature columns of X for *all* n samples.

    Returns
    -------
    (n, n) float64, symmetric. Summing these over disjoint column chunks gives the
    exactly centred Gram of the whole X (what a dask task per chunk returns).
    """
    acc = GramAccumulator(np.shape(columns)[0])
    acc.add(columns)
    return acc.gram()


class GramAccumulator:
    """Running centred linear Gram ``sum_j Xc_j Xc_j^T`` over column chunks.

    Holds one ``(n, n)`` float64 buffer (``8 n^2`` bytes) plus the current chunk.
    """

    def __init__(self, n: int):
        if n < 2:
            raise ConfigError(f"CKA needs at least 2 samples; got {n}")
        self.n = int(n)
        self.n_features = 0
        self._upper = np.zeros((self.n, self.n), order="F")

    def add(self, columns: Any) -> None:
        """Add a chunk ``(n, p_chunk)``; it is upcast and centred on its own column means."""
        x = _float64_block(columns, "feature chunk")
        _check_samples(self.n, x.shape[0], "feature chunk")
        x -= x.mean(axis=0)
        _syrk_upper(self._upper, x.T, trans=1)  # x.T is F-ordered: x x^T with no copy
        self.n_features += x.shape[1]

    def gram(self) -> np.ndarray:
        """The accumulated ``(n, n)`` float64 Gram: a C-ordered view of the buffer, not a copy."""
        _symmetrize_upper(self._upper)
        return self._upper.T  # symmetric, so the transpose view is the same matrix, C-ordered


def gram_linear_chunks(chunks: Iterable[Any]) -> np.ndarray:
    """Centred linear Gram of X from an iterable of column chunks ``(n, p_j)``.

    Returns ``(n, n)`` float64 equal to Xc Xc^T, never holding X in float64.
    """
    acc: GramAccumulator | None = None
    for chunk in chunks:
        if acc is None:
            acc = GramAccumulator(np.shape(chunk)[0])
        acc.add(chunk)
    if acc is None:
        raise ConfigError("no feature chunks given; a representation needs at least one feature")
    return acc.gram()


# ------------------------------------------------------------------ feature route


class CovarianceAccumulator:
    """Co-moments of X and Y merged over row blocks (the exact ``"feature"`` route).

    Holds Sxx (p1, p1), Syy (p2, p2) upper triangles and Sxy (p1, p2) in float64,
    updated in place by BLAS, and merges with another accumulator over disjoint
    samples (for a dask tree reduction).
    """

    def __init__(self, p1: int, p2: int):
        self.n_samples = 0
        self.mean_x, self.mean_y = np.zeros(p1), np.zeros(p2)
        self.sxx = np.zeros((p1, p1), order="F")  # upper triangle only
        self.syy = np.zeros((p2, p2), order="F")  # upper triangle only
        self.sxy = np.zeros((p1, p2), order="F")

    def add(self, x_rows: Any, y_rows: Any) -> None:
        """Add the same samples of both representations: ``(b, p1)`` and ``(b, p2)``."""
        x, y = _float64_block(x_rows, "X rows"), _float64_block(y_rows, "Y rows")
        _check_samples(x.shape[0], y.shape[0], "Y rows")
        if (x.shape[1], y.shape[1]) != (self.mean_x.size, self.mean_y.size):
            raise ConfigError(f"row blocks have {x.shape[1]} and {y.shape[1]} features; "
                              f"expected {self.mean_x.size} and {self.mean_y.size}")
        block = CovarianceAccumulator(x.shape[1], y.shape[1])
        block.n_samples = x.shape[0]
        block.mean_x, block.mean_y = x.mean(axis=0), y.mean(axis=0)
        x -= block.mean_x
        y -= block.mean_y
        self._merge(block, x_centred=x, y_centred=y)

    def merge(self, other: CovarianceAccumulator) -> None:
        """Fold in an accumulator over other samples (Chan et al.'s pairwise update)."""
        if (other.mean_x.size, other.mean_y.size) != (self.mean_x.size, self.mean_y.size):
            raise ConfigError("cannot merge co-moments of different feature counts")
        self._merge(other)

    def _merge(self, other: CovarianceAccumulator, x_centred=None, y_centred=None) -> None:
        m, b = self.n_samples, other.n_samples
        total = m + b
        if b == 0:
            return
        from scipy.linalg import blas

        dx, dy = other.mean_x - self.mean_x, other.mean_y - self.mean_y
        if x_centred is not None:  # a fresh block: products go straight into our buffers
            _syrk_upper(self.sxx, x_centred.T, trans=0)
            _syrk_upper(self.syy, y_centred.T, trans=0)
            blas.dgemm(1.0, x_centred.T, y_centred.T, beta=1.0, c=self.sxy, trans_b=1, overwrite_c=1)
        else:
            self.sxx += other.sxx
            self.syy += other.syy
            self.sxy += other.sxy
        w = m * b / total
        blas.dsyr(w, dx, a=self.sxx, lower=0, overwrite_a=1)
        blas.dsyr(w, dy, a=self.syy, lower=0, overwrite_a=1)
        blas.dger(w, dx, dy, a=self.sxy, overwrite_a=1)
        self.mean_x += dx * (b / total)
        self.mean_y += dy * (b / total)
        self.n_samples = total

    def cka(self) -> float:
        """``||Sxy||_F^2 / (||Sxx||_F ||Syy||_F)`` (Kornblith et al. 2019, feature form)."""

        def sym_sq_norm(upper: np.ndarray) -> float:  # lower triangle is zero
            return 2.0 * float(np.vdot(upper, upper)) - float(np.sum(np.diag(upper) ** 2))

        num = float(np.vdot(self.sxy, self.sxy))
        return _ratio(num, sym_sq_norm(self.sxx), sym_sq_norm(self.syy))


# ----------------------------------------------------------- exact linear CKA API


class LinearCKAAccumulator:
    """Exact streaming linear CKA between X (n, p1) and Y (n, p2).

    The route is fixed at construction (``"auto"``: :func:`linear_route`) and says
    how to feed it: ``"gram"`` takes column chunks of X and of Y separately
    (:meth:`add_x_columns`, :meth:`add_y_columns`, any order); ``"feature"`` takes
    row blocks of both together (:meth:`add_rows`). :meth:`result` checks that every
    column / row arrived.

    Raises ``ConfigError`` when the route's bytes (:func:`linear_route_bytes`) exceed
    ``memory_limit_bytes``.
    """

    def __init__(self, n: int, p1: int, p2: int, route: str = "auto",
                 memory_limit_bytes: int | None = None):
        if route == "auto":
            route = linear_route(n, p1, p2)
        if route not in ROUTES:
            raise ConfigError(f"unknown linear CKA route {route!r}; valid: auto, gram, feature")
        need = linear_route_bytes(n, p1, p2)[route]
        if memory_limit_bytes is not None and need > memory_limit_bytes:
            raise ConfigError(f"exact linear CKA ({route} route) for n={n}, p1={p1}, p2={p2} holds "
                              f"{need / 2**30:.2f} GiB, over the {memory_limit_bytes / 2**30:.2f} GiB "
                              f"limit; raise the limit, pool the features, or use minibatch CKA")
        if min(p1, p2) < 1:
            raise ConfigError(f"both representations need features; got p1={p1}, p2={p2}")
        self.n, self.p1, self.p2, self.route = int(n), int(p1), int(p2), route
        self.bytes_held = need
        if route == "gram":
            self._gx, self._gy = GramAccumulator(n), GramAccumulator(n)
        else:
            self._cov = CovarianceAccumulator(p1, p2)

    def _need(self, route: str) -> None:
        if self.route != route:
            raise RuntimeError(f"this accumulator uses the {self.route!r} route; "
                               f"it does not take {'column chunks' if route == 'gram' else 'row blocks'}")

    def add_x_columns(self, columns: Any) -> None:
        """Gram route: add X[:, j:k] as an ``(n, k - j)`` array of any real dtype."""
        self._need("gram")
        self._gx.add(columns)

    def add_y_columns(self, columns: Any) -> None:
        """Gram route: add Y[:, j:k] as an ``(n, k - j)`` array of any real dtype."""
        self._need("gram")
        self._gy.add(columns)

    def add_rows(self, x_rows: Any, y_rows: Any) -> None:
        """Feature route: add X[i:k] ``(k - i, p1)`` and Y[i:k] ``(k - i, p2)`` together."""
        self._need("feature")
        self._cov.add(x_rows, y_rows)

    def result(self) -> float:
        """Linear CKA in [0, 1]; NaN (with a warning) if a representation is constant."""
        if self.route == "gram":
            got = (self._gx.n_features, self._gy.n_features)
            if got != (self.p1, self.p2):
                raise RuntimeError(f"received {got[0]}/{self.p1} X and {got[1]}/{self.p2} Y columns")
            return _alignment(self._gx.gram(), self._gy.gram())
        if self._cov.n_samples != self.n:
            raise RuntimeError(f"received {self._cov.n_samples}/{self.n} rows")
        return self._cov.cka()


def linear_cka(X: Any, Y: Any, *, route: str = "auto", chunk_size: int | None = None,
               memory_limit_bytes: int | None = None) -> float:
    """Exact linear CKA (Kornblith et al. 2019) of two representations of the same samples.

    Parameters
    ----------
    X, Y : (n, p1), (n, p2) arrays of any real dtype
        numpy arrays, or anything 2-D sliceable with ``.shape`` (Zarr arrays,
        memmaps): only one chunk at a time is read and upcast to float64.
    route : {"auto", "gram", "feature"}
        ``"auto"`` follows :func:`linear_route` (Gram form when p > ~n).
    chunk_size : int, optional
        Columns per chunk (gram route) or rows per block (feature route); default
        keeps one upcast chunk near 64 MiB. Align it with the storage chunks.
    memory_limit_bytes : int, optional
        Refuse (``ConfigError``) when the route's accumulators would exceed it.

    Returns
    -------
    float
        ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), columns centred.
    """
    if not hasattr(X, "shape"):
        X = np.asarray(X)
    if not hasattr(Y, "shape"):
        Y = np.asarray(Y)
    if len(X.shape) != 2 or len(Y.shape) != 2:
        raise ConfigError(f"X and Y must be 2-D (samples, features); got {X.shape} and {Y.shape}")
    (n, p1), (n_y, p2) = X.shape, Y.shape
    _check_samples(n, n_y, "Y")
    acc = LinearCKAAccumulator(n, p1, p2, route, memory_limit_bytes)
    if acc.route == "gram":
        step = chunk_size or max(1, DEFAULT_CHUNK_BYTES // (8 * n))
        for j in range(0, p1, step):
            acc.add_x_columns(X[:, j:j + step])
        for j in range(0, p2, step):
            acc.add_y_columns(Y[:, j:j + step])
    else:
        step = chunk_size or max(1, DEFAULT_CHUNK_BYTES // (8 * (p1 + p2)))
        for i in range(0, n, step):
            acc.add_rows(X[i:i + step], Y[i:i + step])
    return acc.result()


def linear_cka_from_chunks(x_chunks: Iterable[Any], y_chunks: Iterable[Any]) -> float:
    """Exact linear CKA from column chunks ``(n, p_j)`` of X and of Y (Gram route).

    The two iterables are consumed one after the other; holds two ``(n, n)`` Grams.
    """
    kx = gram_linear_chunks(x_chunks)
    ky = gram_linear_chunks(y_chunks)
    _check_samples(kx.shape[0], ky.shape[0], "Y chunks")
    return _alignment(kx, ky)  # partial Grams are exactly centred already


# ------------------------------------------------------------ Grams -> CKA values


def center_gram(K: Any, unbiased: bool = False) -> np.ndarray:
    """Centre a symmetric Gram matrix; returns a new ``(n, n)`` float64 array.

    ``unbiased=False``: H K H with H = I - 11^T/n. ``unbiased=True``: U-centring as in
    the reference code of Kornblith/Nguyen (Szekely & Rizzo 2014): zero the diagonal,
    subtract row and column means scaled by 1/(n-2) with the 1/(2(n-1)) correction,
    zero the diagonal again; then <U(K), U(L)> / (n(n-3)) is HSIC_1. Needs n >= 4.
    """
    K = np.array(K, dtype=np.float64, order="C", copy=True)
    n = K.shape[0]
    if K.ndim != 2 or K.shape[1] != n:
        raise ConfigError(f"a Gram matrix must be square; got shape {K.shape}")
    if unbiased:
        if n < 4:
            raise ConfigError(f"the unbiased HSIC needs at least 4 samples; got {n}")
        np.fill_diagonal(K, 0.0)
        means = K.sum(axis=0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
    else:
        means = K.mean(axis=0)
        means -= means.mean() / 2
    K -= means[:, None]
    K -= means[None, :]
    if unbiased:
        np.fill_diagonal(K, 0.0)
    return K


def hsic_unbiased(K: Any, L: Any) -> float:
    """HSIC_1 (Song et al. 2012) of two ``(n, n)`` Grams, via U-centring; may be negative."""
    uk, ul = center_gram(K, unbiased=True), center_gram(L, unbiased=True)
    _check_samples(uk.shape[0], ul.shape[0], "L")
    n = uk.shape[0]
    return _frobenius_inner(uk, ul) / (n * (n - 3))


def _alignment(kc: np.ndarray, lc: np.ndarray) -> float:
    return _ratio(_frobenius_inner(kc, lc), _frobenius_inner(kc, kc), _frobenius_inner(lc, lc))


def cka_from_grams(K: Any, L: Any, unbiased: bool = False) -> float:
    """CKA from two ``(n, n)`` Grams of the same samples (any kernel).

    ``unbiased=False``: HSIC_0-based (biased, Kornblith et al. 2019);
    ``unbiased=True``: HSIC_1-based (Nguyen et al. 2021 on one batch of all n).
    """
    kc = center_gram(K, unbiased)
    lc = center_gram(L, unbiased)
    _check_samples(kc.shape[0], lc.shape[0], "L")
    return _alignment(kc, lc)


def cka_matrix(grams: Iterable[Any], others: Iterable[Any] | None = None,
               unbiased: bool = False) -> np.ndarray:
    """CKA between every pair of representations, each Gram centred only once.

    Parameters
    ----------
    grams : iterable of (n, n) Grams (m of them)
    others : iterable of (n, n) Grams (m2 of them), optional
        Given: the rectangular ``(m, m2)`` block grams x others (a tile of a larger
        matrix, or two stores); omitted: the symmetric ``(m, m)`` matrix.

    Holds the m (+ m2) centred Grams, ``8 n^2`` bytes each; each entry then costs one
    inner product of n^2 terms.
    """
    def normalised(gs):
        out = []
        for g in gs:
            c = center_gram(g, unbiased)
            norm = math.sqrt(_frobenius_inner(c, c))
            out.append(c / norm if norm > 0 else np.full_like(c, np.nan))
        return out

    left = normalised(grams)
    right = left if others is None else normalised(others)
    if left and right and left[0].shape != right[0].shape:
        raise ConfigError(f"Gram shapes differ: {left[0].shape} vs {right[0].shape}")
    m = np.empty((len(left), len(right)))
    for i, a in enumerate(left):
        for j, b in enumerate(right):
            if others is None and j < i:
                m[i, j] = m[j, i]
            else:
                m[i, j] = _frobenius_inner(a, b)
    return m

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
