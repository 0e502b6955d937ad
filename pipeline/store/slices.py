"""Feature slices of diffprobe stores: what one probe-grid or CKA read names.

A *feature slice* is what one probe-grid read needs: one block at one pooling size,
``(sample, timestep, C, p, p)``. An extraction store offers one slice per block
(``blocks/<block>/activations``, pool = the stored map side); a pooled store (the
``pool`` stage) offers one per (block, size), at ``blocks/<block>/p<size>/activations``
(:func:`pooled_key` is the one place that spells the name).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import StoreError
from pipeline.store.layout import ATTR_KEY, block_names, open_root


def pooled_key(block: str, size: int) -> str:
    """Name of a pooled slice inside a pooled store's ``blocks/`` group: ``"<block>/p<size>"``."""
    return f"{block}/p{int(size)}"


def timestep_key(t: int) -> str:
    """BatchSource key of one timestep: ``"t<t>"``."""
    return f"t{int(t)}"


@dataclass(frozen=True)
class FeatureSlice:
    """One (block, pool) slice of a store: ``array_path`` holds (sample, timestep, C, p, p)."""

    block: str
    pool: int
    array_path: str
    shape: tuple[int, int, int]


def feature_slices(path: str | Path) -> dict[tuple[str, int], FeatureSlice]:
    """Every (block, pool) slice a store offers, in forward block order.

    A pooled store lists its attrs' ``pooled.blocks`` x ``pooled.sizes``; an
    extraction store offers each block at its stored map side (``pool`` = H).
    """
    root = open_root(path)
    out: dict[tuple[str, int], FeatureSlice] = {}
    for block, size, key in stored_groups(root):
        array_path = f"blocks/{key}/activations"
        c, h, w = (int(v) for v in root[array_path].shape[2:])
        out[(block, size or h)] = FeatureSlice(block, size or h, array_path, (c, h, w))
    return out


def stored_groups(root) -> list[tuple[str, int | None, str]]:
    """``(block, pool size or None, group key under blocks/)`` of every activations array of
    an opened store: a pooled store's ``pooled.blocks`` x ``pooled.sizes``, else its blocks."""
    pooled = root.attrs[ATTR_KEY].get("pooled")
    if pooled:
        return [(b, int(s), pooled_key(b, s)) for b in pooled["blocks"] for s in sorted(pooled["sizes"])]
    return [(b, None, b) for b in block_names(root)]


def timestep_positions(path, stored: Sequence[int], asked: Sequence[int]) -> list[int]:
    """Where each of the timestep values ``asked`` lies among a store's ``stored`` ones; a
    StoreError naming the missing values (and ``path``'s) when some are not stored."""
    stored = [int(t) for t in stored]
    missing = [int(t) for t in asked if int(t) not in stored]
    if missing:
        raise StoreError(f"store {str(path)!r} lacks timestep(s) {missing}; it has {stored}")
    return [stored.index(int(t)) for t in asked]


def store_timesteps(path: str | Path) -> list[int]:
    return [int(t) for t in open_root(path)["timestep"][:]]
