"""How long a CKA matrix takes, from one piece of it timed at a size a login node can hold.

What a piece is follows the method the stage chose (``stages/cka.py``):

- ``gram`` / ``gram-cache``: every representation's centred Gram once (``2 n^2 d``
  flops from an ``(n, d)`` slice), then one ``n^2`` inner product per pair;
- ``stream``: every pair on its own, on the cheaper exact route
  (:func:`pipeline.cka.estimators.linear_route`: ``n^2 (p1 + p2)`` on the Gram route,
  ``n (p1 + p2)^2`` on the feature route);
- ``minibatch``: every pair over ``epochs x n / batch_size`` batches.

Each piece is timed with the real estimator code on random float16 data of
``min(n, SAMPLE_N)`` samples and ``min(d, SAMPLE_D)`` features (``SAMPLE_D_FEATURE`` on the
feature route), on one BLAS thread (dask
workers run with ``OMP_NUM_THREADS=1``), and scaled by the ratio of those flop counts,
so that a 50,000-sample Gram is not computed to plan it. Reading the slices from the
stores is not included.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.cka import estimators as cka
from pipeline.estimate import Estimate, Sample, measure, merged

#: The largest sample timed: an (n, d) float16 slice of 1024 x 4096 and its 1024^2 Gram
#: (~0.3 s on one core); the feature route's (p1 + p2)^2 co-moments take at most 1024 + 1024.
SAMPLE_N = 1024
SAMPLE_D = 4096
SAMPLE_D_FEATURE = 1024

_SAMPLES: dict[tuple, Sample] = {}


def _data(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32).astype(np.float16)


def _timed(key: tuple, fn) -> Sample:
    if key not in _SAMPLES:
        _SAMPLES[key] = measure(fn, warmup=1, repeats=3, budget_s=3.0, threads=1)
    return _SAMPLES[key]


def stream_cost(n: int, p1: int, p2: int) -> float:
    """Flops (up to a constant) of one exact pair on the route ``linear_cka`` takes."""
    return n * n * (p1 + p2) if cka.linear_route(n, p1, p2) == "gram" else n * (p1 + p2) ** 2


def cka_estimates(method: str, estimator: str, features: Sequence[int], pairs: Sequence[tuple[int, int]],
                  n: int, batch_size: int = 256, epochs: int = 1, sigma_fraction: float = 1.0,
                  workers: int = 1) -> list[Estimate]:
    """Estimates for a matrix of representations with ``features[k]`` features each.

    ``pairs``: the ``(k1, k2)`` indices into ``features`` that need computing (not a
    representation with itself, each unordered pair once). ``n``: matched samples.
    """
    n_s = min(n, SAMPLE_N)
    out: list[Estimate] = []
    if method in ("gram", "gram-cache"):
        by_d: dict[int, int] = {}
        for d in features:
            by_d[d] = by_d.get(d, 0) + 1
        for d, count in by_d.items():
            d_s = min(d, SAMPLE_D)
            x = _data(n_s, d_s, 0)

            def gram(x=x):
                g = cka.gram_linear_chunks([x])
                if estimator == "rbf":
                    g = cka.rbf_gram_from_linear(g, sigma_fraction)
                cka.center_gram(g)

            sample = _timed(("gram", estimator, n_s, d_s), gram)
            out.append(Estimate(f"Gram of {n_s} x {d_s}", sample, count, scale=(n * n * d) / (n_s * n_s * d_s),
                                workers=workers))
        a, b = cka.center_gram(cka.gram_linear_chunks([_data(n_s, 8, 1)])), \
            cka.center_gram(cka.gram_linear_chunks([_data(n_s, 8, 2)]))
        sample = _timed(("dot", n_s), lambda: float(np.dot(a.ravel(), b.ravel())))
        out.append(Estimate(f"{n_s}^2 inner product", sample, len(pairs), scale=(n / n_s) ** 2, workers=workers))
        return out
    for k1, k2 in pairs:
        p1, p2 = features[k1], features[k2]
        s1, s2 = min(p1, SAMPLE_D), min(p2, SAMPLE_D)
        if method == "stream":
            route = cka.linear_route(n, p1, p2)
            if route == "feature":
                s1, s2 = min(p1, SAMPLE_D_FEATURE), min(p2, SAMPLE_D_FEATURE)
            x, y = _data(n_s, s1, 0), _data(n_s, s2, 1)
            sample = _timed(("stream", route, n_s, s1, s2), lambda: cka.linear_cka(x, y, route=route))
            timed = n_s * n_s * (s1 + s2) if route == "gram" else n_s * (s1 + s2) ** 2
            out.append(Estimate(f"{route}-route pair of {n_s} x ({s1}, {s2})", sample, 1,
                                scale=stream_cost(n, p1, p2) / timed,
                                workers=workers))
        else:  # minibatch: linear in the batches and in the features
            b = min(batch_size, n)
            m = min(n, max(b, (SAMPLE_N // b) * b))
            x, y = _data(m, s1, 0), _data(m, s2, 1)
            sample = _timed(("minibatch", b, m, s1, s2), lambda: cka.minibatch_cka(x, y, b))
            batches_real, batches_timed = epochs * (n // b), m // b
            scale = batches_real / max(1, batches_timed) * (p1 + p2) / (s1 + s2)
            out.append(Estimate(f"minibatch pair of {m} x ({s1}, {s2}), batch {b}", sample, 1, scale=scale,
                                workers=workers))
    return merged(out)


def n_tasks_hint(method: str, n_reps: int, n_pairs: int) -> int:
    """Tasks that can run side by side: one per Gram / pair, or one for ``gram``."""
    return 1 if method == "gram" else max(1, n_reps if method == "gram-cache" else n_pairs)
