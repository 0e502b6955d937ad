"""Adapter for diffusers ``UNet2DModel`` (DDPM/ADM-style, optional class embedding)."""

from __future__ import annotations

import torch

from pipeline.datasets.preprocess import Preprocessing
from pipeline.errors import ModelError
from pipeline.models.base import Condition, ModelAdapter
from pipeline.models.config import ModelConfig
from pipeline.models.imports import diffusers_module
from pipeline.models.latent import load_denoiser
from pipeline.models.schedule import alphas_cumprod, load_scheduler_config


class UNet2DAdapter(ModelAdapter):
    kind = "unet2d"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        UNet2DModel = diffusers_module("diffusers.models.unets.unet_2d").UNet2DModel

        module, folder, self.source = load_denoiser(UNet2DModel, cfg, "unet", "diffusers model")
        self.module = module.eval().requires_grad_(False)
        conf = module.config
        size = cfg.size or conf.sample_size
        if size is None:
            raise ModelError(f"{self.source.get('config') or self.source.get('path')!r}: the UNet2DModel config "
                             "has no sample_size; set sample_size in it, or model.size (--size)")
        size = size if isinstance(size, int) else size[0]
        factor = 2 ** (len(conf.block_out_channels) - 1)  # every down block but the last halves the map
        if size % factor:
            lower, upper = max(factor, size - size % factor), size - size % factor + factor
            raise ModelError(
                f"input size {size} is not a multiple of {factor} (the UNet's downsampling), so its skip "
                f"connections would not line up; use size {lower} or {upper} (model.size / --size)"
            )
        self.latent_channels = conf.in_channels
        self.latent_size = size
        self.preprocessing = Preprocessing(size=size, channels=conf.in_channels if conf.in_channels in (1, 3) else 3)
        self.scheduler_config = load_scheduler_config(folder, cfg.scheduler)
        self.num_train_timesteps = int(self.scheduler_config["num_train_timesteps"])
        self.alphas_cumprod = alphas_cumprod(self.scheduler_config)
        embeds = conf.num_class_embeds
        if embeds:
            if cfg.null_class is not None and not 0 <= cfg.null_class < embeds:
                raise ModelError(
                    f"null_class {cfg.null_class} is outside the model's {embeds} class embeddings (valid: "
                    f"0-{embeds - 1}); set model.null_class to the null embedding's index (often the last, "
                    f"{embeds - 1}), or drop it if the model has no null class"
                )
            self.null_class = cfg.null_class
            self.num_classes = embeds - (1 if cfg.null_class is not None else 0)
        elif cfg.null_class is not None:
            raise ModelError("null_class is set but the model has no class embedding (num_class_embeds is empty); "
                             "drop model.null_class")

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
