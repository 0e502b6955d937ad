"""Adapter for diffusers ``UNet2DModel`` (DDPM/ADM-style, optional class embedding)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.datasets.preprocess import Preprocessing
from pipeline.errors import ModelError
from pipeline.models.base import Condition, ModelAdapter, component_folder
from pipeline.models.config import ModelConfig
from pipeline.models.schedule import alphas_cumprod, load_scheduler_config


class UNet2DAdapter(ModelAdapter):
    kind = "unet2d"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from diffusers.models.unets.unet_2d import UNet2DModel  # not `from diffusers import`: 2x faster start

        folder = None
        if cfg.path:
            folder = Path(cfg.path).expanduser()
            if not folder.exists():
                raise ModelError(f"model path {str(folder)!r} does not exist; point 'model.path' at a local diffusers folder")
            unet_dir = component_folder(folder, "unet", "diffusers model")
            if cfg.random_init:
                torch.manual_seed(cfg.seed)
                module = UNet2DModel.from_config(UNet2DModel.load_config(unet_dir))
            else:
                try:
                    module = UNet2DModel.from_pretrained(unet_dir, local_files_only=True, low_cpu_mem_usage=False)
                except (OSError, ValueError, RuntimeError) as exc:
                    raise ModelError(f"cannot load UNet2DModel weights from {str(unet_dir)!r}: {exc}") from None
            self.source = {"path": str(folder), "random_init": cfg.random_init, "seed": cfg.seed if cfg.random_init else None}
        elif cfg.config:
            config_path = Path(cfg.config).expanduser()
            if not config_path.exists():
                raise ModelError(f"model config {str(config_path)!r} does not exist")
            torch.manual_seed(cfg.seed)
            module = UNet2DModel.from_config(json.loads(config_path.read_text()))
            self.source = {"config": str(config_path), "random_init": True, "seed": cfg.seed}
        else:
            raise ModelError("model needs 'path:' (local diffusers folder) or 'config:' (config JSON)")
        self.module = module.eval().requires_grad_(False)
        conf = module.config
        size = cfg.size or conf.sample_size
        size = size if isinstance(size, int) else size[0]
        self.latent_channels = conf.in_channels
        self.latent_size = size
        self.preprocessing = Preprocessing(size=size, channels=conf.in_channels if conf.in_channels in (1, 3) else 3)
        self.scheduler_config = load_scheduler_config(folder, cfg.scheduler)
        self.num_train_timesteps = int(self.scheduler_config["num_train_timesteps"])
        self.alphas_cumprod = alphas_cumprod(self.scheduler_config)
        embeds = conf.num_class_embeds
        if embeds:
            if cfg.null_class is not None and not 0 <= cfg.null_class < embeds:
                raise ModelError(f"null_class {cfg.null_class} outside the model's {embeds} class embeddings")
            self.null_class = cfg.null_class
            self.num_classes = embeds - (1 if cfg.null_class is not None else 0)
        elif cfg.null_class is not None:
            raise ModelError("null_class is set but the model has no class embedding (num_class_embeds is empty)")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        labels = None
        if self.module.config.num_class_embeds:
            if cond.kind == "null":
                if self.null_class is None:
                    raise ModelError("conditioning 'null' needs model.null_class (the null class embedding index)")
                labels = torch.full((x_t.shape[0],), self.null_class, dtype=torch.long, device=x_t.device)
            elif cond.kind in ("class", "label"):
                labels = cond.labels.to(x_t.device)
            else:
                raise ModelError(
                    "the model is class-conditional: set conditioning to 'class' (image labels) or 'null' (null class)"
                )
        elif cond.kind not in ("none",):
            raise ModelError(f"conditioning {cond.kind!r} needs a class-conditional model; this one is unconditional")
        return self.module(x_t, t, class_labels=labels).sample
