"""What the report's provenance and cost section says: stages, versions, code, host.

Everything is read from the outputs' own attrs (stage hash, config, completion,
``wall_time_s`` stamped by the runner, model and device provenance) and from the
environment that writes the report (package versions, the git commit of the
workflow's checkout, host).
"""

from __future__ import annotations

import importlib.metadata
import platform
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline import store
from pipeline.errors import DiffprobeError

PACKAGES = ("diffprobe", "torch", "diffusers", "zarr", "dask", "distributed", "xarray", "numpy", "matplotlib")


@dataclass(frozen=True)
class StageRecord:
    """One input of the report, as its output's attrs describe it."""

    name: str
    kind: str
    path: Path
    stage_hash: str
    complete: bool
    wall_time_s: float | None
    bytes_on_disk: int
    seed: int | None
    device: str | None
    summary: str  # the ``diffprobe inspect`` text


def stage_record(name: str, path: Path) -> StageRecord:
    from pipeline.store.describe import describe_store

    attrs = store.read_attrs(path) or {}
    config = attrs.get("config") or {}
    seed = config.get("seed")
    if seed is None and isinstance(config.get("model"), dict):
        seed = config["model"].get("seed")
    try:
        summary = describe_store(path)
    except (DiffprobeError, KeyError, OSError) as exc:  # a missing summary must not sink the report
        summary = f"(no summary: {exc})"
    return StageRecord(
        name, str(attrs.get("stage", "?")), path, str(attrs.get("stage_hash", "")), bool(attrs.get("complete")),
        attrs.get("wall_time_s"), store.stored_bytes(path), seed,
        (attrs.get("provenance") or {}).get("device"), summary,
    )


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(folder: Path) -> str:
    """``<sha> (clean)`` / ``<sha> + uncommitted changes`` of the checkout holding ``folder``."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    return f"{sha} ({'+ uncommitted changes' if dirty else 'clean'})"


def host_description() -> dict[str, str]:
    import os

    return {"host": socket.gethostname(), "platform": platform.platform(),
            "cpus": str(os.cpu_count()), "executable": sys.executable}
