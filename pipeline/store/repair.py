"""``diffprobe verify --repair``: act on a verify report so that the next run recomputes only the damage.

For unit stores (extract, pool, classify) every damaged unit is marked pending in
``done`` and its damaged objects are deleted; a lost or damaged ``done`` chunk is
rebuilt from the data present (a unit whose objects are all there and decode is
written; samples with a ``failure`` reason failed); a lost ``zarr.json`` is rewritten
from the consolidated metadata; leftovers of killed writers (``*.partial`` files,
stale temp folders and locks) are removed; and ``complete`` is cleared when a unit is
left to compute: the next ``diffprobe run`` recomputes just those units and
finalizes again, leaving every other shard file as it was. For probe and cka
results the damaged chunks are deleted and ``complete`` cleared; the next run
rewrites them from its task cache. A store on object storage (a URL) is repaired the
same way: deleting an object and putting a whole ``done`` chunk or ``zarr.json`` are
single requests there, and no other object is written. Damaged attrs or coordinates are not repaired
(the stage must run again with ``--force``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.store import checks as chk
from pipeline.store.layout import FAILED, PENDING, WRITTEN, open_root
from pipeline.store.location import as_location, is_remote, remove
from pipeline.store.verify import LEFTOVER, UNIT_STAGES, Report


def repair_store(path: str | Path, report: Report) -> list[str]:
    """Act on ``report`` (from :func:`pipeline.store.verify.verify_store`); one line per action taken.

    ``path``: a folder or a URL; every action is a delete or a whole-object write, so it
    works the same on object storage."""
    from pipeline.store.layout import stamp_attrs

    path = as_location(path)
    actions = []
    for f in report.findings:
        if f.kind == LEFTOVER:
            for file in f.files:
                remove(file)
            actions.append(f"removed {f.files[0]}")
    doc = json.loads((path / "zarr.json").read_text())
    listed = (doc.get("consolidated_metadata") or {}).get("metadata") or {}
    for f in report.damage:
        if f.kind == "metadata" and f.array in listed:
            meta = path / f.array / "zarr.json"
            if not is_remote(meta):
                meta.parent.mkdir(parents=True, exist_ok=True)
            meta.write_text(json.dumps(listed[f.array], indent=2))
            actions.append(f"rewrote {f.array}/zarr.json from the consolidated metadata")
    unrepairable = [f for f in report.damage if f.kind in ("attrs", "coordinates")
                    or (f.kind == "metadata" and f.array not in listed)]
    if report.stage in UNIT_STAGES:
        done_actions, rerun = _repair_units(path, report)
        actions += done_actions
    else:
        rerun = False
        for f in report.damage:
            if f.kind in ("damaged", "missing"):
                for file in f.files:
                    remove(file)
                actions.append(f"{'deleted damaged' if f.kind == 'damaged' else 'to rewrite:'} "
                               f"{_relative(f.files[0], path)}")
                rerun = True
    if rerun:
        stamp_attrs(path, {"complete": False})
        actions.append("cleared 'complete': the next 'diffprobe run' recomputes what was marked and finalizes")
    for f in unrepairable:
        actions.append(f"cannot repair: {f.message} (re-run its stage with --force)")
    return actions


def _repair_units(path: Path, report: Report) -> tuple[list[str], bool]:
    """Mark damaged units pending, rebuild lost done chunks; (actions, whether a unit is left to compute)."""
    from pipeline.store.durable import sync_unit

    root = open_root(path, mode="r+")
    integrity = chk.Integrity(root, path)
    done = root["done"]
    data = [p for p in chk.data_arrays(root) if p in root]
    actions = []
    damaged_units = sorted({f.samples for f in report.damage if f.samples and f.kind in ("damaged", "missing")})
    for f in report.damage:
        if f.kind == "damaged" and f.samples:
            for file in f.files:
                remove(file)
    rerun = bool(damaged_units)
    for lo, hi in damaged_units:
        done[lo:hi] = np.zeros(hi - lo, dtype=np.int8)
        sync_unit([done], lo, hi)
        arrays = sorted({f.array for f in report.damage if f.samples == (lo, hi) and f.array})
        actions.append(f"samples {lo}..{hi - 1}: marked pending ({', '.join(arrays)} damaged or missing)")
    lost_done = sorted({f.samples for f in report.damage if f.kind == "done" and f.samples} - set(damaged_units))
    for lo, hi in lost_done:
        flags = _rebuilt_flags(integrity, data, lo, hi)
        done[lo:hi] = flags
        sync_unit([done], lo, hi)
        state = ("written" if (flags == WRITTEN).any() else "failed") if (flags != PENDING).all() else "pending"
        actions.append(f"samples {lo}..{hi - 1}: done rebuilt from the data present ({state})")
        rerun = rerun or state == "pending"
    return actions, rerun


def _rebuilt_flags(integrity: chk.Integrity, data: list[str], lo: int, hi: int) -> np.ndarray:
    """Done flags of samples ``[lo, hi)`` from the objects present: written when every data
    array's object is there and decodes, failed where ``failure`` gives a reason; else pending."""
    root = integrity.root
    try:
        reasons = np.asarray(root["failure"][lo:hi], dtype=object)
    except Exception:  # noqa: BLE001 -- unreadable reasons: recompute the unit
        return np.zeros(hi - lo, dtype=np.int8)
    failed = np.array([bool(r) for r in reasons])
    pending = np.zeros(hi - lo, dtype=np.int8)
    for array_path in data:
        array = root[array_path]
        files = [f for *_, f in integrity.objects(array, lo, hi)]
        if not all(integrity.present(array, files)):
            return pending if not failed.all() else np.full(hi - lo, FAILED, dtype=np.int8)
        try:
            array[lo:hi]
        except Exception:  # noqa: BLE001 -- damaged: recompute
            return pending
    return np.where(failed, FAILED, WRITTEN).astype(np.int8)


def _relative(file, path) -> str:
    text, base = str(file), str(path).rstrip("/") + "/"
    return text[len(base):] if text.startswith(base) else text
