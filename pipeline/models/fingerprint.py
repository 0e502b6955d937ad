"""What identifies a model's weights in a stage hash (the config alone does not)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.models.config import ModelConfig
from pipeline.models.remote import localize


def model_fingerprint(cfg: ModelConfig) -> dict:
    """Names, sizes and sha256 of the model's local files (mtime for files over 64 MiB).

    Covers ``path`` (the whole folder), ``config`` and a ``file.py`` factory, so changed
    weights change the hash of every stage that used them.
    """
    cfg = localize(cfg)  # on object storage: the local copy's files, which hash as the originals
    targets = [Path(p) for p in (cfg.path, cfg.config) if p]
    if cfg.factory and cfg.factory.rsplit(":", 1)[0].endswith(".py"):
        targets.append(Path(cfg.factory.rsplit(":", 1)[0]))
    files = []
    for target in targets:
        paths = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
        for p in paths:
            if p.exists():
                size = p.stat().st_size
                digest = (hashlib.sha256(p.read_bytes()).hexdigest() if size < (64 << 20)
                          else f"mtime:{p.stat().st_mtime_ns}")
                files.append([str(p.relative_to(target)) if target.is_dir() else p.name, size, digest])
    return {"model_files": files}
