"""What CKA compares: representations in diffprobe stores, matched by image_id, read in bounded memory.

A *representation* is one (store, block, pool, timestep) slice of an extraction
store (``blocks/<block>/activations``) or a pooled store
(``blocks/<block>/p<size>/activations``), flattened to ``(n, C*p*p)``: one row per
sample, every channel and position a feature. ``pool`` is the map side ``p`` of the
slice (for an extraction store's raw maps, their own side).

Samples are matched across stores by ``image_id`` within one augmented ``view``
(:func:`align_samples`): every store must hold the same ids (else a ``ConfigError``
that counts and lists the differences), a sample that failed (``done`` = 2) in *any*
store is dropped from all, and rows follow the first store's order. Tasks recompute
the alignment from the stores themselves, so only paths and selectors travel.

Reading is by chunk-aligned slabs of samples (one timestep, whole maps, as the store
is chunked), so a pass over a representation decodes each chunk once:

- :func:`gather_rows` -- some samples, all (or some) features, stored dtype;
- :func:`representation_gram` -- the centred ``(n, n)`` float64 Gram, built from
  column groups of at most ``read_bytes`` (one pass over the slice per group);
- :func:`write_normalised_gram` / :func:`gram_inner_products` -- the same Gram,
  centred and normalised, kept as a scratch ``.npy`` file, and CKA values as inner
  products of such files (when one task cannot hold every Gram of the matrix);
- :func:`stream_pair_cka` -- exact linear CKA of one pair with
  ``pipeline.cka.estimators.LinearCKAAccumulator`` (row blocks on the feature route, column
  groups on the Gram route) when n is too large to hold even one Gram;
- :func:`minibatch_accumulate` -- minibatch CKA over several representations, the
  same batches as ``pipeline.cka.estimators.minibatch_cka``, read a group of batches at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.cka.estimators import GramAccumulator, LinearCKAAccumulator
from pipeline.cka.estimators import MinibatchCKA, rbf_gram_from_linear
from pipeline.errors import ConfigError, StoreError, select_or_error
from pipeline.store.slices import feature_slices, store_timesteps
from pipeline.store.checks import Integrity
from pipeline.store.layout import PENDING, WRITTEN, open_root, read_attrs
from pipeline.store.location import as_location, is_remote

#: Stage kinds whose outputs hold representations.
STORE_STAGES = ("extract", "pool")
#: Bytes read per zarr call: whole inner chunks, a few at a time.
SLAB_BYTES = 32 << 20
#: float64 working set of one column chunk handed to a Gram accumulator.
CHUNK_BYTES = 32 << 20


@dataclass(frozen=True)
class Representation:
    """One slice of a store, flattened to ``(n, n_features)``."""

    stage: str
    path: Path  # a location: a URL's carries its storage options to the worker
    array_path: str
    block: str
    pool: int
    timestep: int
    t_index: int
    n_features: int
    itemsize: int
    pooled: bool

    @property
    def label(self) -> str:
        """``stage/block/t<t>`` (``/p<size>`` added for a pooled store's slices)."""
        base = f"{self.stage}/{self.block}/t{self.timestep}"
        return f"{base}/p{self.pool}" if self.pooled else base


# ------------------------------------------------------------------ selections


def _choose(requested, available: list, what: str, stage: str) -> list:
    return select_or_error(requested, available, what, f"the store of stage {stage!r}", "cka")


def expand_selections(selections: Sequence, paths: dict[str, Path | str]) -> list[Representation]:
    """Selections -> representations, in selection order, then block (forward), pool, timestep.

    Parameters
    ----------
    selections : objects with ``input`` (stage name), ``blocks``, ``timesteps`` and
        ``pool`` (each a tuple or ``"all"``)
    paths : {stage name: store path}
    """
    out: list[Representation] = []
    for sel in selections:
        path = as_location(paths[sel.input])
        attrs = read_attrs(path) or {}
        if attrs.get("stage") not in STORE_STAGES:
            raise ConfigError(f"cka: input {sel.input!r} is a {attrs.get('stage')!r} stage; "
                              f"cka reads the stores of {' or '.join(STORE_STAGES)} stages")
        slices = feature_slices(path)
        blocks = _choose(sel.blocks, list(dict.fromkeys(b for b, _ in slices)), "block", sel.input)
        timesteps = store_timesteps(path)
        chosen_t = _choose(sel.timesteps, timesteps, "timestep", sel.input)
        itemsize = int(np.dtype(open_root(path)[next(iter(slices.values())).array_path].dtype).itemsize)
        for block in blocks:
            pools = _choose(sel.pool, [p for b, p in slices if b == block], f"pool size of block {block!r}",
                            sel.input)
            for pool in pools:
                fs = slices[(block, pool)]
                for t in chosen_t:
                    out.append(Representation(sel.input, path, fs.array_path, block, pool, int(t),
                                              timesteps.index(t), int(np.prod(fs.shape)), itemsize,
                                              bool(attrs.get("pooled"))))
    labels = [r.label for r in out]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise ConfigError(f"cka: selections name {repeated[0]!r} more than once; list each slice once")
    return out


# ------------------------------------------------------------------ samples


@dataclass
class Alignment:
    """Rows common to every store: ``positions[path]`` (n,) int64 store positions, row-aligned."""

    n: int
    positions: dict[str, np.ndarray]
    view: int
    n_excluded: int  # failed (done = 2) in at least one store
    image_ids: np.ndarray  # (n,) the aligned ids


def _view_table(path, view: int):
    root = open_root(path)
    ids = np.asarray(root["image_id"][:], dtype=object).astype(str)
    views = root["view"][:]
    done = Integrity(root, path).done()
    chosen = np.flatnonzero(views == view)
    if len(chosen) == 0:
        raise ConfigError(f"cka: store {path} has no samples of view {view}; it has views "
                          f"{sorted(set(views.tolist()))} (set view:)")
    if (done[chosen] == PENDING).any():
        raise StoreError(f"cka: store {path} has unwritten samples; finish the stage that writes it")
    ids = ids[chosen]
    if len(np.unique(ids)) != len(ids):
        raise StoreError(f"cka: store {path} repeats image ids within view {view}; samples cannot be matched")
    return ids, chosen, done[chosen] == WRITTEN


def _examples(ids: np.ndarray, k: int = 3) -> str:
    shown = ", ".join(repr(str(i)) for i in ids[:k])
    return shown + (" ..." if len(ids) > k else "")


def align_samples(paths: Sequence[str | Path], view: int = 0) -> Alignment:
    """Match samples of every store by ``image_id`` (one view); drop samples failed anywhere.

    Raises ``ConfigError`` when the stores' id sets differ, saying how many ids
    differ and naming the first few.
    """
    locations = {str(p): p for p in paths}  # keyed by URL / path text; a URL's location keeps its options
    paths = list(locations)
    tables = {p: _view_table(locations[p], view) for p in paths}
    ref = paths[0]
    ref_ids, ref_pos, usable = tables[ref]
    ref_order = np.argsort(ref_ids, kind="stable")
    ref_sorted = ref_ids[ref_order]
    maps = {}
    for path in paths:
        ids, pos, ok = tables[path]
        order = np.argsort(ids, kind="stable")
        if len(ids) != len(ref_ids) or not np.array_equal(ids[order], ref_sorted):
            only_ref = np.setdiff1d(ref_ids, ids)
            only_here = np.setdiff1d(ids, ref_ids)
            raise ConfigError(
                f"cka: stores hold different samples (view {view}): {len(only_ref)} image id(s) only in "
                f"{ref} ({_examples(only_ref)}) and {len(only_here)} only in {path} "
                f"({_examples(only_here)}); "
                f"compare stores extracted from the same dataset, split and limit"
            )
        row_to_index = np.empty(len(ids), dtype=np.int64)
        row_to_index[ref_order] = order  # ref row r has the same id as this store's index row_to_index[r]
        maps[path] = pos[row_to_index]
        usable = usable & ok[row_to_index]
    n = int(usable.sum())
    if n < 4:
        raise ConfigError(f"cka: only {n} sample(s) are written in every store; CKA needs at least 4")
    positions = {p: np.ascontiguousarray(m[usable], dtype=np.int64) for p, m in maps.items()}
    return Alignment(n, positions, view, int((~usable).sum()), ref_ids[usable])


def save_alignment(align: Alignment, path) -> Path:
    """Save ``align.positions`` (one int64 array per store) for tasks to load.

    Matching ids sorts every store's ids; saved once per run, a task loads n int64 per
    store. Local files are written atomically (temp + rename); on object storage one PUT
    is atomic by itself.
    """
    import io

    from pipeline.store.location import as_location, is_remote

    path = as_location(path)
    stores = list(align.positions)
    buffer = io.BytesIO()
    np.savez(buffer, stores=np.asarray(stores, dtype=str), **{f"p{k}": align.positions[s] for k, s in enumerate(stores)})
    if is_remote(path):
        path.write_bytes(buffer.getvalue())
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
    return path


def load_alignment(path) -> dict[str, np.ndarray]:
    """``{store path: (n,) int64 positions}`` as saved by :func:`save_alignment`."""
    import io

    from pipeline.store.location import as_location

    with np.load(io.BytesIO(as_location(path).read_bytes())) as saved:
        return {str(s): saved[f"p{k}"] for k, s in enumerate(saved["stores"])}


# ------------------------------------------------------------------ reading


def open_array(rep: Representation):
    """The representation's array; reads of damaged chunks, and a done unit's missing shard, are
    StoreErrors naming them (``pipeline.store.checks``)."""
    checks = Integrity(open_root(rep.path), rep.path)
    checks.check_present([rep.array_path])
    return checks.array(rep.array_path)


def _slabs(array, positions: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, int, int]]:
    """Group sorted store positions by slab: yields (order indices, positions, slab start, stop)."""
    order = np.argsort(positions, kind="stable")
    q = positions[order]
    chunk = int(array.chunks[0])
    row_bytes = int(np.prod(array.shape[2:])) * array.dtype.itemsize
    slab = chunk * max(1, SLAB_BYTES // max(1, chunk * row_bytes))
    ids = q // slab
    bounds = np.flatnonzero(np.diff(ids)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(q)]):
        start = int(ids[lo]) * slab
        yield order[lo:hi], q[lo:hi], start, min(start + slab, int(array.shape[0]))


def gather_rows(array, t_index: int, positions: np.ndarray, columns: slice | None = None) -> np.ndarray:
    """Rows ``positions`` (any order) of one timestep, flattened: ``(len(positions), p)`` stored dtype.

    Reads each touched slab of whole chunks once; ``columns`` keeps a feature range.
    """
    p = int(np.prod(array.shape[2:]))
    width = len(range(*columns.indices(p))) if columns is not None else p
    out = np.empty((len(positions), width), dtype=array.dtype)
    for rows, q, start, stop in _slabs(array, np.asarray(positions, dtype=np.int64)):
        block = np.asarray(array[start:stop, t_index]).reshape(stop - start, p)
        picked = block[q - start]
        out[rows] = picked if columns is None else picked[:, columns]
    return out


def representation_gram(rep: Representation, positions: np.ndarray, read_bytes: int) -> np.ndarray:
    """Centred linear Gram ``Xc Xc^T`` of one representation: ``(n, n)`` float64.

    Holds the Gram, one column group of at most ``read_bytes`` (stored dtype) and one
    float64 chunk of ``CHUNK_BYTES``; reads the slice ``ceil(n p itemsize / read_bytes)`` times.
    """
    array = open_array(rep)
    n, p = len(positions), rep.n_features
    group = max(1, min(p, read_bytes // max(1, n * rep.itemsize)))
    step = max(1, CHUNK_BYTES // (8 * n))
    acc = GramAccumulator(n)
    for c0 in range(0, p, group):
        columns = gather_rows(array, rep.t_index, positions, slice(c0, min(p, c0 + group)))
        for j in range(0, columns.shape[1], step):
            acc.add(columns[:, j:j + step])
    return acc.gram()


def stream_pair_cka(rx: Representation, ry: Representation, pos_x: np.ndarray, pos_y: np.ndarray,
                    memory_limit_bytes: int, read_bytes: int) -> tuple[float, str]:
    """Exact linear CKA of one pair, never holding either slice: (value, route).

    The accumulator takes the cheaper exact route under ``memory_limit_bytes``
    (``ConfigError`` if neither fits); row blocks / column groups hold ``read_bytes``.
    """
    n = len(pos_x)
    acc = LinearCKAAccumulator(n, rx.n_features, ry.n_features, "auto", memory_limit_bytes)
    ax, ay = open_array(rx), open_array(ry)
    if acc.route == "gram":
        for rep, array, pos, add in ((rx, ax, pos_x, acc.add_x_columns), (ry, ay, pos_y, acc.add_y_columns)):
            group = max(1, min(rep.n_features, read_bytes // max(1, n * (rep.itemsize + 8))))
            for c0 in range(0, rep.n_features, group):
                add(gather_rows(array, rep.t_index, pos, slice(c0, c0 + group)))
    else:
        row_bytes = rx.n_features * (rx.itemsize + 8) + ry.n_features * (ry.itemsize + 8)
        rows = max(1, read_bytes // row_bytes)
        chunk = int(ax.chunks[0])
        rows = max(rows // chunk * chunk, min(rows, chunk))  # whole chunks where the budget allows
        for r0 in range(0, n, rows):
            acc.add_rows(gather_rows(ax, rx.t_index, pos_x[r0:r0 + rows]),
                         gather_rows(ay, ry.t_index, pos_y[r0:r0 + rows]))
    return acc.result(), acc.route


def minibatch_accumulate(reps: Sequence[Representation], positions: Sequence[np.ndarray], batch_size: int,
                         seed: int, epochs: int, read_bytes: int) -> MinibatchCKA:
    """Minibatch CKA over ``reps`` with exactly the batches of ``pipeline.cka.estimators.minibatch_cka``.

    Each epoch draws ``np.random.default_rng(seed)``'s next permutation of the n
    aligned rows and cuts it into ``n // batch_size`` batches. Consecutive batches
    are read together, as many as fit ``read_bytes`` for all representations (a
    pass over the slices per group: ``n p / read_bytes`` passes per epoch).
    """
    n = len(positions[0])
    arrays = [open_array(r) for r in reps]
    row_bytes = sum(r.n_features * r.itemsize for r in reps)
    per_group = max(1, read_bytes // max(1, batch_size * row_bytes))
    n_batches = n // batch_size
    acc = MinibatchCKA(max(2, len(reps)))
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        perm = rng.permutation(n)
        for g0 in range(0, n_batches, per_group):
            g1 = min(n_batches, g0 + per_group)
            rows = np.sort(perm[g0 * batch_size:g1 * batch_size])
            data = [gather_rows(a, r.t_index, pos[rows]) for a, r, pos in zip(arrays, reps, positions)]
            if len(data) == 1:
                data = data * 2  # MinibatchCKA compares at least two; CKA(X, X) from the same batches
            for k in range(g0, g1):
                local = np.searchsorted(rows, np.sort(perm[k * batch_size:(k + 1) * batch_size]))
                acc.update(*[d[local] for d in data])
    return acc


# ------------------------------------------------------------------ Gram scratch files


def gram_file(folder: str | Path, rep: Representation) -> Path:
    """Where :func:`write_normalised_gram` keeps ``rep``'s Gram: a readable name plus a short hash."""
    import hashlib
    import re

    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", rep.label)
    return as_location(folder) / f"{safe}-{hashlib.sha1(rep.label.encode()).hexdigest()[:8]}.npy"


def write_normalised_gram(rep: Representation, positions: np.ndarray, read_bytes: int, folder: str | Path,
                          sigma_fraction: float | None = None) -> Path:
    """Save ``H K H / ||H K H||_F`` ((n, n) float64 .npy; all NaN for a constant slice), atomically.

    ``K`` is the linear Gram, or the RBF Gram when ``sigma_fraction`` is given. The
    inner product of two such files is their CKA (``pipeline.cka.estimators.cka_matrix``'s terms).
    Holds two (n, n) float64 arrays besides the read buffer.
    """
    from pipeline.cka.estimators import center_gram

    gram = representation_gram(rep, positions, read_bytes)
    if sigma_fraction is not None:
        gram = rbf_gram_from_linear(gram, sigma_fraction)
    centred = center_gram(gram)
    del gram
    norm = float(np.sqrt(np.dot(centred.ravel(), centred.ravel())))
    if norm > 0:
        centred /= norm
    else:
        centred.fill(np.nan)
    path = gram_file(folder, rep)
    if is_remote(path):  # one PUT: atomic already
        with path.open("wb") as f:
            np.save(f, centred)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, centred)
    os.replace(tmp, path)
    return path


def _load_gram(path, mmap_mode: str | None = None) -> np.ndarray:
    path = as_location(path)
    if is_remote(path):
        with path.open("rb") as f:
            return np.load(f)
    return np.load(path, mmap_mode=mmap_mode)


def gram_inner_products(row_file: str | Path, col_files: Sequence[str | Path],
                        read_bytes: int) -> list[float]:
    """``<G_row, G_col>_F`` for each column file: CKA from normalised Grams.

    Holds the row Gram and ``read_bytes`` of each column Gram at a time (memory-mapped).
    """
    a = _load_gram(row_file)
    n = a.shape[0]
    rows = max(1, read_bytes // (8 * n))
    out = []
    for f in col_files:
        b = _load_gram(f, mmap_mode="r")
        if b.shape != a.shape:
            raise StoreError(f"Gram files {row_file} and {f} differ in shape; "
                             f"delete the scratch folder and re-run")
        out.append(float(sum(np.dot(a[i:i + rows].ravel(), np.asarray(b[i:i + rows]).ravel())
                             for i in range(0, n, rows))))
        del b
    return out
