"""A dataset's identity: its ordered image ids and labels, as they enter a stage hash.

A store's rows are positions in the dataset (row ``s`` holds image ``s // views``), so
a store written against one list of images is wrong for any other list: an image
removed, added, renamed or reordered shifts every later row. The identity is the
count plus a sha256 over the ordered ``(image_id, label)`` pairs; it is part of the
extract and classify stage hashes (preprocessing is covered by the config and the
model fingerprint), so a resume against a changed dataset is refused before any
row is written, and the refusal names the first image that differs.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.store.schema import dataset_identity as identity_of_pairs


def dataset_identity(records: Sequence) -> dict:
    """``{"n_images": n, "ids_sha256": hex}`` over the ordered ``(image_id, label)`` pairs
    of ``records`` (``pipeline.datasets.records.Records``, or anything whose items have
    ``image_id`` and ``label``);
    the formula is ``pipeline.store.schema.dataset_identity``, which ``verify`` shares."""
    pairs = getattr(records, "pairs", None)  # ``Records``: converted a chunk at a time
    return identity_of_pairs(pairs() if pairs else ((rec.image_id, rec.label) for rec in records))


def first_difference(stored: Sequence[str], current: Sequence[str]) -> str:
    """Where two ordered id lists part, in words (for a one-line refusal); '' if equal.

    >>> first_difference(["a", "b", "c"], ["a", "c"])
    "image 1 is 'b' in the store but 'c' in the dataset now (3 images then, 2 now)"
    """
    counts = f" ({len(stored)} images then, {len(current)} now)" if len(stored) != len(current) else ""
    for i, (old, new) in enumerate(zip(stored, current)):
        if old != new:
            return f"image {i} is {old!r} in the store but {new!r} in the dataset now{counts}"
    if len(stored) > len(current):
        return f"image {len(current)} ({stored[len(current)]!r}) is in the store but no longer in the dataset{counts}"
    if len(current) > len(stored):
        return f"image {len(stored)} ({current[len(stored)]!r}) is new in the dataset{counts}"
    return ""


def stored_image_ids(path) -> list[str]:
    """The store's image ids in row order, one per image (the views of an image are adjacent rows)."""
    from pipeline.store.layout import open_root

    ids = open_root(path)["image_id"][:]
    out: list[str] = []
    for image_id in ids:
        if not out or out[-1] != image_id:
            out.append(str(image_id))
    return out
