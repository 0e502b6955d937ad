"""``diffprobe verify STORE [--repair]``: read every chunk of a store and name what is damaged.

Checks, for any diffprobe output (extract, pool, classify stores; probe and cka results):

- metadata: the root ``zarr.json`` and its diffprobe attrs (stage, stage hash,
  format version, ``complete``); every node the consolidated metadata lists still
  has its own ``zarr.json``;
- every stored chunk decodes (crc32c where the array has it: every read is checked);
- unit stores: the ``done`` mask decodes and holds only 0/1/2; every object a done
  unit requires exists (``pipeline.store.checks`` rules); a complete store has no
  pending unit;
- coordinates: ``image_id`` and the other sample coordinates decode, have one entry
  per sample, agree with each block group's copies, and with the dataset identity
  the attrs record (``identity``: count and sha256 of the ordered (image_id, label)
  pairs; ``provenance.dataset.n_images``).

``--repair`` acts on the findings (:mod:`pipeline.store.repair`).

``STORE`` is a folder or a URL (``s3://``, ``memory://``; credentials and endpoint from
the environment or the location's storage options): the store is opened through
:func:`pipeline.store.location.zarr_store` and objects are listed through its fs. On
object storage there are no ``*.partial`` files or temp folders; a finalize claim
older than ``location.STALE_CLAIM_S`` is the leftover there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import StoreError
from pipeline.store import checks as chk
from pipeline.store.layout import CROP_COORDS, FAILED, PENDING, SAMPLE_COORDS, WRITTEN, quiet_zarr, read_attrs
from pipeline.store.location import as_location, claim_is_stale, finalize_claim, is_remote, list_files, zarr_store
from pipeline.store.schema import dataset_identity

UNIT_STAGES = ("extract", "pool", "classify")
#: Not counted as damage: what killed writers leave, removed by --repair.
LEFTOVER = "leftover"


@dataclass
class Finding:
    """One problem: a line for the user, and what --repair needs to know."""

    kind: str  # damaged | missing | done | metadata | coordinates | attrs | leftover
    message: str
    array: str | None = None
    samples: tuple[int, int] | None = None  # [start, stop) of the unit
    files: tuple[Path, ...] = ()


@dataclass
class Report:
    path: Path
    stage: str | None
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    objects: int = 0
    bytes_read: int = 0
    complete: bool = False

    @property
    def damage(self) -> list[Finding]:
        return [f for f in self.findings if f.kind != LEFTOVER]

    def add(self, *args, **kwargs) -> None:
        self.findings.append(Finding(*args, **kwargs))

    def lines(self) -> list[str]:
        out = [f"{f.kind:<11} {f.message}" for f in self.findings]
        out += [f"note        {n}" for n in self.notes]
        mib = self.bytes_read / 2**20
        if self.damage:
            out.append(f"{len(self.damage)} problem(s) in {self.path}; "
                       f"'diffprobe verify {self.path} --repair' marks them for recomputation")
        else:
            leftovers = f"; {len(self.findings)} leftover(s) of killed writers" if self.findings else ""
            out.append(f"ok: {self.path} ({self.stage}{'' if self.complete else ', incomplete'}), "
                       f"{self.objects} objects read ({mib:.1f} MiB decoded), every chunk checked{leftovers}")
        return out


# ----------------------------------------------------------------- verify


def verify_store(path: str | Path) -> Report:
    """Read every chunk of the output at ``path`` (a folder or a URL); the findings say what is damaged and where."""
    path = as_location(path)
    if not path.exists() and not (path / "zarr.json").exists():  # an S3 prefix "exists" only by its objects
        raise StoreError(f"store {str(path)!r} does not exist")
    try:
        attrs = read_attrs(path)
    except StoreError as exc:
        report = Report(path, None)
        report.add("metadata", str(exc))
        return report
    if attrs is None:
        raise StoreError(f"{str(path)!r} is not a diffprobe output (no zarr.json with diffprobe attrs); "
                         "give a store or results folder a stage wrote")
    report = Report(path, attrs.get("stage"), complete=bool(attrs.get("complete")))
    for key in ("stage", "stage_hash", "format_version", "complete"):
        if key not in attrs:
            report.add("attrs", f"the root attrs lack diffprobe.{key}")
    _leftovers(path, report)
    _node_metadata(path, report)
    import zarr

    with quiet_zarr():
        root = zarr.open_group(zarr_store(path, read_only=True), mode="r", zarr_format=3)
    integrity = chk.Integrity(root, path)
    if "done" in root:
        _unit_store(root, integrity, attrs, report)
    else:
        _results(root, integrity, report)
    return report


def _leftovers(path: Path, report: Report) -> None:
    from pipeline.store.locks import alive, lock_path, read_owner, stale_temps

    if is_remote(path):  # no partial files or temp folders there; a finalize claim can be left
        claim = finalize_claim(path)
        if claim_is_stale(claim):
            report.add(LEFTOVER, f"{claim}: the finalize claim of a process that is gone", files=(claim,))
        return
    for f in path.rglob("*.partial"):
        report.add(LEFTOVER, f"{f.relative_to(path)}: a write that was killed before its rename", files=(f,))
    for folder in stale_temps(path):
        report.add(LEFTOVER, f"{folder}: the temp folder of a killed schema build", files=(folder,))
    lock = lock_path(path)
    if lock.exists():
        owner = read_owner(lock)
        if owner is None or alive(owner) is False:
            report.add(LEFTOVER, f"{lock}: the finalize lock of a process that is gone", files=(lock,))


def _node_metadata(path: Path, report: Report) -> None:
    doc = json.loads((path / "zarr.json").read_text())
    listed = (doc.get("consolidated_metadata") or {}).get("metadata") or {}
    for name in sorted(listed):
        meta = path / name / "zarr.json"
        if not meta.exists():
            report.add("metadata", f"{name}/zarr.json is missing (the consolidated metadata still has it: "
                                   f"--repair rewrites it)", array=name, files=(meta,))
            continue
        try:
            json.loads(meta.read_text())
        except (OSError, ValueError) as exc:
            report.add("metadata", f"{name}/zarr.json is unreadable ({exc}); --repair rewrites it from the "
                                   f"consolidated metadata", array=name, files=(meta,))
    if not listed:
        for key in list_files(path):
            if key.rpartition("/")[2] != "zarr.json":
                continue
            try:
                json.loads((path / key).read_text())
            except (OSError, ValueError) as exc:
                report.add("metadata", f"{key} is unreadable ({exc})", files=(path / key,))


def _read_object(array, integrity: chk.Integrity, lo: int, hi: int, coords, report: Report) -> str | None:
    """Decode one stored object's region; None if fine, else the damage line."""
    region = [slice(lo, hi)] + [slice(c * o, min((c + 1) * o, s)) for c, o, s in
                                zip(coords[1:], array.metadata.chunk_grid.chunk_shape[1:], array.shape[1:])]
    report.objects += 1
    try:
        values = array[tuple(region)]
        report.bytes_read += values.nbytes
        return None
    except Exception as exc:  # noqa: BLE001 -- any codec failure is damage
        return integrity.describe_damage(array, tuple(region), exc)


def _unit_store(root, integrity: chk.Integrity, attrs: dict, report: Report) -> None:
    done_array = root["done"]
    n = done_array.shape[0]
    unit = int(attrs.get("layout", {}).get("unit_samples") or done_array.chunks[0])
    done = np.full(n, -1, dtype=np.int16)  # -1: unknown (damaged)
    for coords, lo, hi, file in integrity.objects(done_array):
        report.objects += 1
        try:
            flags = np.asarray(done_array[lo:hi])
        except Exception as exc:  # noqa: BLE001
            report.add("done", f"the done chunk of samples {lo}..{hi - 1} ({integrity.relative(file)}) "
                               f"{chk.decode_failure(exc)}; --repair rebuilds it from the data present",
                       array="done", samples=(lo, hi), files=(file,))
            continue
        bad = ~np.isin(flags, (PENDING, WRITTEN, FAILED))
        if bad.any():
            report.add("done", f"the done chunk of samples {lo}..{hi - 1} holds flags other than 0/1/2 "
                               f"({int(bad.sum())} sample(s)); --repair rebuilds it from the data present",
                       array="done", samples=(lo, hi), files=(file,))
            continue
        done[lo:hi] = flags
    complete = bool(attrs.get("complete"))
    data = chk.data_arrays(root)
    listed = attrs.get("blocks") if "blocks" in root else None
    for name in listed or ():
        if f"blocks/{name}/activations" not in root:
            report.add("metadata", f"block {name!r} has no activations array (its zarr.json is lost and the "
                                   f"metadata is not consolidated); re-run the stage with --force")
    for array_path in data + ["failure"]:
        if array_path not in root:
            continue
        array = root[array_path]
        kind = chk.presence_kind(array_path)
        if chk.stage_of(root) != "classify" and array_path != "failure" and not _has_crc(array):
            report.notes.append(f"{integrity.label(array_path)} has no crc32c: damaged bytes may decode silently")
        for coords, lo, hi, file, there in _objects(array, integrity):
            flags = done[lo:hi]
            if there:
                _check_object(array, integrity, lo, hi, coords, report, "damaged", array_path, file,
                              samples=(lo, hi))
            elif (flags >= 0).all() and chk.required(kind, flags):
                where = integrity.where(array, [slice(lo, hi)] + [slice(0, s) for s in array.shape[1:]])
                report.add("missing", f"{integrity.label(array_path)} {where}: {integrity.relative(file)} is "
                                      f"missing, though done marks the unit written",
                           array=array_path, samples=(lo, hi), files=(file,))
    for lo in range(0, n, unit):
        hi = min(lo + unit, n)
        flags = done[lo:hi]
        if complete and (flags == PENDING).any():
            present = [p for p in data if p in root and
                       any(integrity.present(root[p], [f for *_, f in integrity.objects(root[p], lo, hi)]))]
            why = "its done chunk is lost" if present else "it was never written"
            report.add("done", f"samples {lo}..{hi - 1} are pending in a store stamped complete ({why}); "
                               f"--repair rebuilds done from the data present", array="done", samples=(lo, hi))
    if not complete and n and (done > PENDING).all():
        report.notes.append("every unit is done but the store is not finalized: re-run its workflow to finalize")
    _coordinates(root, integrity, attrs, report)
    _failed_list(root, integrity, attrs, report)


def _failed_list(root, integrity: chk.Integrity, attrs: dict, report: Report) -> None:
    """The ``failed_images`` group of a finished store: it decodes and holds the count the attrs give."""
    from pipeline.store.failures import COUNT_ATTR, GROUP

    if GROUP not in root:
        if attrs.get(COUNT_ATTR):
            report.add("metadata", f"{GROUP}/ is missing, though the attrs count {attrs[COUNT_ATTR]} failed "
                                   "image(s); the failure array still holds every reason", array=GROUP)
        return
    for name in ("image_id", "reason"):
        path = f"{GROUP}/{name}"
        if path not in root:
            report.add("metadata", f"{path} is missing", array=path)
            continue
        array = root[path]
        report.objects += 1
        try:  # a whole read (any store, object storage included): the list is small
            values = np.asarray(array[:], dtype=object)
        except Exception as exc:  # noqa: BLE001 -- any codec failure is damage
            report.add("coordinates", f"{path} {chk.decode_failure(exc)}", array=path)
            continue
        if (values == "").any():  # a lost chunk reads as the fill value
            report.add("coordinates", f"{path} has {int((values == '').sum())} empty entries (a lost chunk); "
                                      "the failure array still holds every reason", array=path)
        if COUNT_ATTR in attrs and array.shape[0] != int(attrs[COUNT_ATTR]):
            report.add("coordinates", f"{path} lists {array.shape[0]} image(s); the attrs count "
                                      f"{attrs[COUNT_ATTR]}", array=path)


def _has_crc(array) -> bool:
    text = json.dumps(array.metadata.to_dict(), default=str)
    return "crc32c" in text


def _objects(array, integrity: chk.Integrity) -> list[tuple]:
    """``(coords, lo, hi, file, present)`` of every stored object of ``array``; presence is
    asked for all of them at once (one listing on object storage)."""
    objects = list(integrity.objects(array))
    return [(*o, there) for o, there in zip(objects, integrity.present(array, [o[3] for o in objects]))]


def _check_object(array, integrity: chk.Integrity, lo: int, hi: int, coords, report: Report, kind: str,
                  name: str, file, **where) -> None:
    """Read one present object and report it under ``kind`` if it does not decode."""
    problem = _read_object(array, integrity, lo, hi, coords, report)
    if problem:
        report.add(kind, problem, array=name, files=(file,), **where)


def _coordinates(root, integrity: chk.Integrity, attrs: dict, report: Report) -> None:
    n = root["done"].shape[0]
    names = [c for c in ("sample", "image_id", *SAMPLE_COORDS, *CROP_COORDS, "class", "class_name", "timestep",
                         "trial", "draw", "candidate", "candidate_class", "candidate_prompt") if c in root]
    values = {}
    for name in dict.fromkeys(names):
        array = root[name]
        for coords, lo, hi, file, there in _objects(array, integrity):
            if there:
                _check_object(array, integrity, lo, hi, coords, report, "coordinates", name, file)
        try:
            values[name] = np.asarray(array[:])
        except Exception:  # noqa: BLE001, S112 -- its damage is reported above
            continue
        if array.metadata.dimension_names == ("sample",) and array.shape[0] != n:
            report.add("coordinates", f"{name} has {array.shape[0]} entries for {n} samples", array=name)
    ids = values.get("image_id")
    if ids is None:
        return
    ids = np.asarray(ids.tolist(), dtype=object)
    dataset = (attrs.get("provenance") or {}).get("dataset") or {}
    views = values.get("view")
    distinct = len(np.unique(ids))
    if dataset.get("n_images") is not None and distinct != int(dataset["n_images"]) and \
            (views is None or distinct * len(np.unique(views)) == n):
        report.add("coordinates", f"image_id holds {distinct} distinct images; the dataset identity in the "
                                  f"attrs says {dataset['n_images']}", array="image_id")
    identity = attrs.get("identity")
    labels = values.get("label")
    if isinstance(identity, dict) and identity.get("ids_sha256") and labels is not None and len(labels) == len(ids):
        n_images, digest = ids_identity(ids.tolist(), labels.tolist())
        if (n_images, digest) != (identity.get("n_images"), identity["ids_sha256"]):
            report.add("coordinates", f"image_id/label ({n_images} images, sha256 {digest[:12]}) do not match the "
                                      f"dataset identity in the attrs ({identity.get('n_images')} images, sha256 "
                                      f"{str(identity['ids_sha256'])[:12]})", array="image_id")
    for name in [f"blocks/{b}" for b in (attrs.get("blocks") or [])]:
        group = root[name] if name in root else {}  # noqa: SIM401 -- a zarr group has no .get
        for coord in ("image_id", "label", "view"):
            if coord not in group or coord not in values:
                continue
            try:
                copy = np.asarray(group[coord][:])
            except Exception as exc:  # noqa: BLE001 -- a damaged copy
                report.add("coordinates", f"{name}/{coord} {chk.decode_failure(exc)}", array=f"{name}/{coord}")
                continue
            if copy.shape != values[coord].shape or copy.tolist() != values[coord].tolist():
                report.add("coordinates", f"{name}/{coord} differs from the root's {coord}", array=f"{name}/{coord}")


def ids_identity(ids: list, labels: list) -> tuple[int, str]:
    """``(n_images, sha256)`` of a store's rows as the runner stamps ``attrs.identity``
    (:func:`pipeline.store.schema.dataset_identity` over one ``(image_id, label)`` per image:
    an image's views are adjacent rows)."""
    firsts = [(i, lab) for k, (i, lab) in enumerate(zip(ids, labels)) if k == 0 or ids[k - 1] != i]
    identity = dataset_identity(firsts)
    return identity["n_images"], identity["ids_sha256"]


def _results(root, integrity: chk.Integrity, report: Report) -> None:
    for name, array in root.arrays():
        for coords, lo, hi, file, there in _objects(array, integrity):
            if there:
                _check_object(array, integrity, lo, hi, coords, report, "damaged", name, file)
            else:
                report.add("missing", f"array {name!r} chunk {coords}: {integrity.relative(file)} is missing "
                                      f"(it would read as the fill value)", array=name, files=(file,))
    if not report.objects:
        report.notes.append("no arrays (a results folder without results yet?)")
