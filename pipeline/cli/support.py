"""Helpers that turn CLI arguments into library objects (kept out of cli.py to keep it thin)."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.errors import ConfigError
from pipeline.models import ModelConfig


def model_config_from_cli(model: str, size: int | None, kind: str | None, options: tuple[str, ...]) -> ModelConfig:
    """MODEL argument -> ModelConfig: folder (diffusers), *.json (config), file.py:fn or pkg:fn (factory)."""
    opts = {}
    for item in options:
        if "=" not in item:
            raise ConfigError(f"--option {item!r} must look like KEY=VALUE")
        key, value = item.split("=", 1)
        opts[key] = yaml.safe_load(value)
    path = Path(model)
    if kind is None:
        if ":" in model and not path.exists():
            kind = "factory"
        elif path.is_dir() and (path / "transformer").exists():  # before sd: a DiT folder has vae/ too
            kind = "dit"
        elif (path / "model_index.json").exists() and (path / "vae").exists():
            kind = "sd"
        else:
            kind = "unet2d"
    if kind == "factory":
        return ModelConfig(kind="factory", factory=model, options=opts, size=size)
    if not path.exists():
        raise ConfigError(f"model {model!r} not found: give a local diffusers folder, a config JSON or file.py:function")
    if path.suffix == ".json":
        return ModelConfig(kind=kind, config=str(path), size=size, options=opts)
    return ModelConfig(kind=kind, path=str(path), size=size, options=opts)
