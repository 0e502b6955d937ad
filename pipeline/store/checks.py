"""Checks on what a stage is asked to store, shared by the stages that store maps."""

from __future__ import annotations

from pipeline.errors import ConfigError


def check_pool_sizes(what: str, sizes, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse pooling a (C, H, W) map to a side larger than the map: adaptive pooling
    would silently repeat values (upsample), multiplying bytes without information."""
    for name, shape in shapes.items():
        side = min(shape[-2:])
        big = [s for s in sizes if s > side]
        if big:
            raise ConfigError(
                f"{what} {big[0]} is larger than block {name!r}'s {shape[-2]}x{shape[-1]} map "
                f"(pooling would upsample it); use sizes <= {side}, or leave this block out")
