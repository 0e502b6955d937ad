"""``diffprobe inspect``: a human-readable summary of a store, from its metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.store import layout as store
from pipeline.store.checks import Integrity
from pipeline.errors import StoreError


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def describe_store(path: str | Path) -> str:
    from pipeline.store.location import as_location

    path = as_location(path)
    if not path.exists():
        raise StoreError(f"store {str(path)!r} does not exist")
    attrs = store.read_attrs(path)
    if attrs is None:
        raise StoreError(f"{str(path)!r} is not a diffprobe store (no diffprobe attrs in zarr.json)")
    root = store.open_root(path)
    lines = [f"store     {path}", f"stage     {attrs.get('stage')} '{attrs.get('stage_name')}'  hash {attrs.get('stage_hash', '')[:16]}"]
    if "blocks" not in root:
        hint = {"probe": "diffprobe results PATH", "classify": "diffprobe score PATH"}.get(attrs.get("stage"))
        lines.append(f"complete  {'yes' if attrs.get('complete') else 'NO'}")
        lines.append(f"arrays    {', '.join(sorted(name for name, _ in root.arrays()))}")
        if hint:
            lines.append(f"tables    {hint}")
        lines.append(f"config    {json.dumps(attrs.get('config'), default=str)[:1500]}")
        return "\n".join(lines + failed_lines(path, attrs))
    layout = attrs["layout"]
    done = Integrity(root, path).done()
    n = len(done)
    written, failed = int((done == store.WRITTEN).sum()), int((done == store.FAILED).sum())
    units = store.unit_status(path)
    lines.append(f"complete  {'yes' if attrs.get('complete') else 'NO'}  ({units.sum()}/{len(units)} units, "
                 f"{100 * (written + failed) / max(1, n):.1f}% of {n} samples; {failed} failed images)")
    lines.append(f"timesteps {', '.join(map(str, root['timestep'][:].tolist()))}")
    lines.append(f"classes   {root['class_name'].shape[0]}; dtype {layout['dtype']} (stored {layout['storage_dtype']})")
    comp = attrs.get("compression", {})
    codec = ("no compressor" if comp.get("cname") == "none" else
             f"blosc {comp.get('cname')} L{comp.get('clevel')} {comp.get('shuffle')}") + \
        (" + crc32c" if comp.get("checksum") else "") + \
        (f" + BitRound(keepbits={comp['bitround_keepbits']})" if comp.get("bitround_keepbits") is not None else "")
    lines.append(f"codecs    {codec}")
    total_raw = total_disk = 0
    lines.append(f"{'block':<36} {'shape (n, T, C, H, W)':<28} {'chunks':<22} {'stored':>10} {'raw':>10} {'ratio':>6}")
    for name in store.block_names(root):
        arr = root[f"blocks/{name}/activations"]
        raw = int(np.prod(arr.shape)) * arr.dtype.itemsize * (written / max(1, n))
        disk = store.stored_bytes(path / "blocks" / name)
        total_raw += raw
        total_disk += disk
        lines.append(f"{name:<36} {str(arr.shape):<28} {str(arr.chunks):<22} {human_bytes(disk):>10} {human_bytes(raw):>10} "
                     f"{raw / max(1, disk):>6.2f}")
    lines.append(f"{'total':<36} {'':<28} {'':<22} {human_bytes(total_disk):>10} {human_bytes(total_raw):>10} "
                 f"{total_raw / max(1, total_disk):>6.2f}")
    prov = attrs.get("provenance", {})
    model = prov.get("model", {})
    lines.append(f"model     {model.get('kind')} {json.dumps(model.get('source'), default=str)}")
    lines.append(f"weights   sha256 {str(model.get('weights_sha256'))[:16]}...; scheduler {json.dumps(model.get('scheduler'))}")
    lines.append(f"noise     {json.dumps(prov.get('noise'))}")
    lines.append(f"prep      {json.dumps(prov.get('preprocessing'))}")
    lines.append(f"dataset   {json.dumps(prov.get('dataset'))}")
    lines.append(f"cond      {prov.get('conditioning')}; views {prov.get('views')} flip {prov.get('flip')}; "
                 f"pool {prov.get('pool')}; device {prov.get('device')}")
    if prov.get("augment"):
        lines.append(f"augment   {json.dumps(prov['augment'])}")
    lines.append(f"version   diffprobe {attrs.get('diffprobe_version')} format {attrs.get('format_version')}")
    lines += failed_lines(path, attrs)
    return "\n".join(lines)


def failed_lines(path, attrs: dict, shown: int = 5) -> list[str]:
    """The count of images that could not be read, and the first ``shown`` of them."""
    from pipeline.store.failures import GROUP, count_failed_images, read_failed_images

    n_failed = count_failed_images(attrs)
    if not n_failed:
        return []
    which = "all" if n_failed <= shown else f"the first {shown}"
    lines = [f"failed    {n_failed} image(s) could not be read (masked, done=2); {which} below, every one in {GROUP}/"]
    lines += [f"failed    {item['image_id']}: {item['reason']}" for item in read_failed_images(path, limit=shown)]
    return lines
