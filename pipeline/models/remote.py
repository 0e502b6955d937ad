"""Model files on object storage (``model.path`` / ``model.config`` as ``s3://...`` URLs).

A remote model folder (or config JSON) is copied once per process to a local temporary
folder, and everything else (diffusers' ``from_pretrained``, the weights' sha256 in the
stage hash) reads that copy exactly as it reads a local folder. Copying rather than
streaming because diffusers and safetensors read (memory-map) local files only, and
a Stable Diffusion folder is several components with their own configs: a copy is one
recursive listing plus one GET per file, and the model is read once anyway. The copy is
removed when the process exits. A model copied from a URL hashes as the same folder
copied by hand would (file names, sizes, sha256), and the store's provenance records the
URL, never the temporary path or the storage options.
"""

from __future__ import annotations

import atexit
import dataclasses
import shutil
import tempfile
from pathlib import Path

from pipeline.errors import ModelError
from pipeline.models.config import ModelConfig
from pipeline.store.location import as_location, is_remote

#: URL -> its local copy, for this process.
_COPIES: dict[str, Path] = {}


def localize(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with every URL among ``path`` / ``config`` replaced by its local copy."""
    changes = {name: str(local_copy(getattr(cfg, name))) for name in ("path", "config")
               if getattr(cfg, name) and is_remote(getattr(cfg, name))}
    return dataclasses.replace(cfg, **changes) if changes else cfg


def local_copy(url) -> Path:
    """A local copy of the file or folder at ``url`` (made on first use; removed at exit)."""
    where = as_location(url)
    key = str(where)
    if key in _COPIES and _COPIES[key].exists():
        return _COPIES[key]
    fs, base = where.fs, where.path.rstrip("/")
    if not fs.exists(base):
        raise ModelError(f"model path {key!r} does not exist; point 'model.path' at a diffusers folder "
                         f"(or 'model.config' at a config JSON) there")
    scratch = Path(tempfile.mkdtemp(prefix="diffprobe-model-"))
    atexit.register(shutil.rmtree, scratch, True)
    target = scratch / (where.name or "model")
    if fs.isdir(base):
        remote = sorted(fs.find(base))
        local = [str(target / name[len(base) + 1:]) for name in remote]
        for path in local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        if remote:
            fs.get(remote, local)
        target.mkdir(exist_ok=True)
    else:
        target.write_bytes(fs.cat_file(base))
    _COPIES[key] = target
    return target
