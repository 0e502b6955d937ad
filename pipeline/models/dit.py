"""Adapter for DiT: diffusers ``DiTTransformer2DModel``, class-conditional.

Sources: a local folder laid out like ``DiTPipeline.save_pretrained`` (``transformer/``
+ ``vae/`` + ``scheduler/``; the hub's DiT folders name the class
``Transformer2DModel`` with ``norm_type: ada_norm_zero``, which loads as the same
weights), a bare model folder (``config.json`` + weights), or a transformer config
JSON with random weights. With a ``vae/`` folder the model works in latent space
(VAE mean x scaling_factor, see ``pipeline.models.latent``); without one, or with
``options: {latent: false}``, it works on pixels (``in_channels`` must be 1 or 3).

Classes: ``num_embeds_ada_norm`` = number of classes. The null class for classifier-
free guidance is index ``num_classes``: diffusers' ``LabelEmbedding`` has
``num_classes + 1`` rows whenever its dropout probability is > 0, and
``AdaLayerNormZero`` always builds it with ``class_dropout_prob=0.1``; ``DiTPipeline``
passes label 1000 as the unconditional input for the 1000-class model.

Output: with learned sigma (``out_channels == 2 * in_channels``) the first
``in_channels`` channels are eps. Blocks: ``pos_embed`` and ``transformer_blocks.i``
output tokens (B, N, D), reshaped to (B, D, h, w) with h = w = sqrt(N)
= latent_size / patch_size.
"""

from __future__ import annotations

import math
import re

import torch

from pipeline.datasets.preprocess import Preprocessing
from pipeline.errors import ModelError
from pipeline.models.base import Condition, ModelAdapter
from pipeline.models.config import ModelConfig
from pipeline.models.imports import diffusers_module
from pipeline.models.latent import VaeEncoder, check_epsilon, load_denoiser
from pipeline.models.schedule import alphas_cumprod, load_scheduler_config

TOKEN_BLOCK = re.compile(r"^(pos_embed|transformer_blocks\.\d+)$")


def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, D) tokens in row-major patch order -> (B, D, sqrt(N), sqrt(N))."""
    if tokens.dim() != 3:
        raise ValueError(f"expected (B, N, D) tokens, got shape {tuple(tokens.shape)}")
    b, n, d = tokens.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} tokens do not form a square grid")
    return tokens.transpose(1, 2).reshape(b, d, side, side)


class DiTAdapter(ModelAdapter):
    kind = "dit"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        DiTTransformer2DModel = diffusers_module(
            "diffusers.models.transformers.dit_transformer_2d").DiTTransformer2DModel

        opts = dict(cfg.options)
        module, folder, self.source = load_denoiser(DiTTransformer2DModel, cfg, "transformer", "DiT model",
                                                    opts.get("variant"))
        self.module = module.eval().requires_grad_(False)
        conf = module.config

        has_vae = folder is not None and (folder / "vae").is_dir()
        latent = opts.get("latent", has_vae)
        if latent and not has_vae:
            raise ModelError("options.latent is true but there is no vae/ folder next to transformer/")
        self.vae = VaeEncoder(folder / "vae", opts.get("variant")) if latent else None
        if self.vae is not None and self.vae.latent_channels != conf.in_channels:
            raise ModelError(
                f"the DiT takes {conf.in_channels} channels but the VAE makes {self.vae.latent_channels}"
            )
        if self.vae is None and conf.in_channels not in (1, 3):
            raise ModelError(
                f"the DiT takes {conf.in_channels} channels, so it needs a VAE: give a folder with vae/"
            )
        f = self.vae.scale_factor if self.vae else 1
        pixels = cfg.size or conf.sample_size * f
        if pixels % (f * conf.patch_size):
            raise ModelError(
                f"size {pixels} is not a multiple of {f * conf.patch_size} (VAE factor x patch size)"
            )
        self.latent_channels = conf.in_channels
        self.latent_size = pixels // f
        channels = self.vae.in_channels if self.vae else conf.in_channels
        self.preprocessing = Preprocessing(size=pixels, channels=channels, value_range=(-1.0, 1.0))

        out_channels = conf.out_channels or conf.in_channels
        if out_channels not in (conf.in_channels, 2 * conf.in_channels):
            raise ModelError(f"DiT out_channels {out_channels} is neither in_channels nor 2 x in_channels")
        self.num_classes = int(conf.num_embeds_ada_norm)
        rows = module.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings
        if rows != self.num_classes + 1:  # diffusers' layout changed: the null index would be wrong
            raise ModelError(
                f"DiT label embedding has {rows} rows; expected num_classes + 1 = {self.num_classes + 1}"
            )
        if cfg.null_class is not None and cfg.null_class != self.num_classes:
            raise ModelError(
                f"DiT's null class is index {self.num_classes} (= num_classes); drop model.null_class"
            )
        self.null_class = self.num_classes
        self.scheduler_config = load_scheduler_config(folder, cfg.scheduler)
        check_epsilon(self.scheduler_config, str(folder or cfg.config))
        self.num_train_timesteps = int(self.scheduler_config["num_train_timesteps"])
        self.alphas_cumprod = alphas_cumprod(self.scheduler_config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels -> latents (VAE mean x scaling_factor), or pixels unchanged for a pixel-space DiT."""
        return self.vae.encode(x) if self.vae else x

    def feature_map(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if TOKEN_BLOCK.match(name):
            return tokens_to_grid(tensor)
        raise ValueError(f"{name!r} is not a DiT token block")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        if cond.kind == "null":
            labels = torch.full((x_t.shape[0],), self.null_class, dtype=torch.long, device=x_t.device)
        elif cond.kind in ("class", "label"):
            labels = cond.labels.to(x_t.device)
        else:
            raise ModelError(
                "DiT is class-conditional: set conditioning to 'class' (image labels) or 'null' (null class)"
            )
        out = self.module(x_t, t, class_labels=labels).sample
        return out[:, : self.latent_channels]  # learned sigma: keep the eps half

    def provenance(self) -> dict:
        out = super().provenance()
        out["vae"] = self.vae.provenance() if self.vae else None
        return out
