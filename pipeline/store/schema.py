"""Names every store shares: the attrs key, the ``done`` flags, the block order.

Kept apart from ``layout`` (which re-exports them) so the readers' checks
(``pipeline.store.checks``), which ``layout`` uses, need not import ``layout``.
"""

from __future__ import annotations

#: Root attrs key of diffprobe's metadata (stage, hash, config, provenance, ``complete``).
ATTR_KEY = "diffprobe"
#: ``done`` flags: pending, written, failed (an unreadable image).
PENDING, WRITTEN, FAILED = 0, 1, 2


def block_names(root) -> list[str]:
    """Block groups in the order they were written (forward order)."""
    order = root.attrs.get(ATTR_KEY, {}).get("blocks")
    if order:
        return list(order)
    return sorted(name for name, _ in root["blocks"].groups())
