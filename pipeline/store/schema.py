"""Names every store shares: the attrs key, the ``done`` flags, the block order, the dataset identity.

Kept apart from ``layout`` (which re-exports them) so the readers' checks
(``pipeline.store.checks``), which ``layout`` uses, need not import ``layout``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

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


def dataset_identity(pairs: Iterable[tuple[str, int]]) -> dict:
    """``{"n_images": n, "ids_sha256": hex}``: the identity a store's attrs record of its dataset.

    ``pairs`` are the ordered ``(image_id, label)`` of the dataset's images, one per
    image; each is hashed as ``f"{image_id}\\x1f{label}\\x1e"``. The one formula for both
    the stage hash (``pipeline.workflow.identity``, from the dataset's records) and
    ``diffprobe verify`` (from a store's coordinates).
    """
    digest = hashlib.sha256()
    n = 0
    for image_id, label in pairs:
        digest.update(f"{image_id}\x1f{int(label)}\x1e".encode())
        n += 1
    return {"n_images": n, "ids_sha256": digest.hexdigest()}
