"""Feature slices of diffprobe stores: what one probe-grid or CKA read names.

A *feature slice* is what one probe-grid read needs: one block at one pooling size,
``(sample, timestep, C, p, p)``. An extraction store offers one slice per block
(``blocks/<block>/activations``, pool = the stored map side); a pooled store (the
``pool`` stage) offers one per (block, size), at ``blocks/<block>/p<size>/activations``
(:func:`pooled_key` is the one place that spells the name).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
    attrs = root.attrs[ATTR_KEY]
    out: dict[tuple[str, int], FeatureSlice] = {}
    pooled = attrs.get("pooled")
    if pooled:
        pairs = [(b, int(s), f"blocks/{pooled_key(b, s)}/activations") for b in pooled["blocks"]
                 for s in sorted(pooled["sizes"])]
    else:
        pairs = [(b, None, f"blocks/{b}/activations") for b in block_names(root)]
    for block, size, array_path in pairs:
        c, h, w = (int(v) for v in root[array_path].shape[2:])
        out[(block, size or h)] = FeatureSlice(block, size or h, array_path, (c, h, w))
    return out


def store_timesteps(path: str | Path) -> list[int]:
    return [int(t) for t in open_root(path)["timestep"][:]]
