"""Adapter for Stable Diffusion: ``UNet2DConditionModel`` from a local diffusers pipeline folder.

The folder is what ``StableDiffusionPipeline.save_pretrained`` writes::

    model_index.json  unet/  vae/  text_encoder/  tokenizer/  scheduler/

``module`` is the UNet (the network whose blocks are captured). Pixels are encoded
once by the VAE (``pipeline.models.latent``); prompts go through the CLIP text
encoder (``transformers``, the optional extra ``diffprobe[sd]``) and are cached per
prompt string. ``Condition("none")`` and ``Condition("null")`` both mean the empty
prompt ``""`` (SD's unconditional input); ``Condition("text", text=emb)`` takes
(B, L, D) or (1, L, D) embeddings from ``encode_text``.

``options: {variant: fp16}`` loads ``*.fp16.safetensors`` weight files where a folder
has them. ``random_init: true`` re-initialises the UNet only; the VAE and text encoder keep
their weights, so a random twin sees exactly the same latents and prompts.

Which prompts stand for which class is the classifier's business
(``pipeline.dc.prompts``); this adapter only encodes the strings it is given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.datasets.preprocess import Preprocessing
from pipeline.errors import ModelError
from pipeline.models.base import Condition, ModelAdapter, weights_hash
from pipeline.models.config import ModelConfig
from pipeline.models.imports import diffusers_module
from pipeline.models.latent import VaeEncoder, check_epsilon, load_component, local_folder
from pipeline.models.schedule import alphas_cumprod, load_scheduler_config

SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")


# ----------------------------------------------------------------- adapter


def _import_transformers():
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError:
        raise ModelError(
            "model kind 'sd' needs the CLIP text encoder from transformers: pip install 'diffprobe[sd]'"
        ) from None
    return CLIPTextModel, CLIPTokenizer


class StableDiffusionAdapter(ModelAdapter):
    kind = "sd"
    text_conditional = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        UNet2DConditionModel = diffusers_module("diffusers.models.unets.unet_2d_condition").UNet2DConditionModel

        CLIPTextModel, CLIPTokenizer = _import_transformers()
        if cfg.config and not cfg.path:
            raise ModelError("model kind 'sd' needs 'path:' (a pipeline folder with a tokenizer), "
                             "not 'config:'")
        folder = local_folder(cfg.path, "sd")
        missing = [c for c in SD_COMPONENTS if not (folder / c).is_dir()]
        if missing:
            raise ModelError(
                f"{str(folder)!r} is not a Stable Diffusion pipeline folder: "
                f"missing {', '.join(c + '/' for c in missing)} "
                f"(expected {', '.join(c + '/' for c in SD_COMPONENTS)} and scheduler/)"
            )
        variant = cfg.options.get("variant")
        if cfg.random_init:
            torch.manual_seed(cfg.seed)
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        else:
            unet = load_component(UNet2DConditionModel, folder / "unet", "UNet", variant)
        self.module = unet.eval().requires_grad_(False)
        self.vae = VaeEncoder(folder / "vae", variant)
        self.text_encoder = load_component(CLIPTextModel, folder / "text_encoder", "text encoder", variant)
        self.text_encoder = self.text_encoder.float().eval().requires_grad_(False)
        self.tokenizer = load_component(CLIPTokenizer, folder / "tokenizer", "tokenizer")

        conf = unet.config
        if conf.in_channels != self.vae.latent_channels:
            raise ModelError(
                f"{str(folder)!r}: the UNet takes {conf.in_channels} channels but the VAE makes "
                f"{self.vae.latent_channels}; unet/ and vae/ come from different models"
            )
        if conf.cross_attention_dim != self.text_encoder.config.hidden_size:
            raise ModelError(
                f"{str(folder)!r}: the UNet's cross_attention_dim is {conf.cross_attention_dim} but the text "
                f"encoder's hidden_size is {self.text_encoder.config.hidden_size}"
            )
        f = self.vae.scale_factor
        native = conf.sample_size if isinstance(conf.sample_size, int) else conf.sample_size[0]
        pixels = cfg.size or native * f
        if pixels % f:
            raise ModelError(f"size {pixels} is not a multiple of the VAE's downsampling factor {f}")
        self.latent_channels = conf.in_channels
        self.latent_size = pixels // f
        self.preprocessing = Preprocessing(size=pixels, channels=self.vae.in_channels,
                                           value_range=(-1.0, 1.0))
        self.scheduler_config = load_scheduler_config(folder, cfg.scheduler)
        check_epsilon(self.scheduler_config, str(folder))
        self.num_train_timesteps = int(self.scheduler_config["num_train_timesteps"])
        self.alphas_cumprod = alphas_cumprod(self.scheduler_config)
        # a tokenizer folder without tokenizer_config.json reports a huge model_max_length
        self.max_length = min(int(self.tokenizer.model_max_length),
                              int(self.text_encoder.config.max_position_embeddings))
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self.source = {"path": str(folder), "random_init": cfg.random_init,
                       "seed": cfg.seed if cfg.random_init else None, "variant": variant}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> latents (B, 4, H/8, W/8) float32 (VAE mean x scaling_factor)."""
        return self.vae.encode(x)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP last hidden states for ``prompts``: (K, L, D) float32 on the UNet's device, cached per prompt.

        L is the tokenizer's max length (77 for SD), padded as StableDiffusionPipeline does.
        """
        device = self.device
        todo = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if todo:
            if next(self.text_encoder.parameters()).device != device:
                self.text_encoder.to(device)
            ids = self.tokenizer(list(todo), padding="max_length", max_length=self.max_length,
                                 truncation=True, return_tensors="pt").input_ids
            hidden = self.text_encoder(ids.to(device))[0].float()
            for prompt, emb in zip(todo, hidden, strict=True):
                self._prompt_cache[prompt] = emb
        return torch.stack([self._prompt_cache[p].to(device) for p in prompts])

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        batch = x_t.shape[0]
        if cond.kind in ("none", "null"):
            text = self.encode_text([""])
        elif cond.kind == "text":
            if cond.text is None or cond.text.dim() != 3:
                raise ModelError("Condition('text') needs text=(B, L, D) prompt embeddings "
                                 "from encode_text")
            text = cond.text
        else:
            raise ModelError(
                f"conditioning {cond.kind!r} needs class embeddings; Stable Diffusion is text-conditional: "
                "use conditioning 'none' (the empty prompt) or prompt embeddings"
            )
        if text.shape[0] == 1 and batch > 1:
            text = text.expand(batch, -1, -1)
        if text.shape[0] != batch:
            raise ModelError(f"{text.shape[0]} prompt embeddings for a batch of {batch} images")
        text = text.to(device=x_t.device, dtype=x_t.dtype)
        return self.module(x_t, t, encoder_hidden_states=text).sample

    def provenance(self) -> dict:
        out = super().provenance()
        out["vae"] = self.vae.provenance()
        out["text_encoder_sha256"] = weights_hash(self.text_encoder)
        out["prompt_max_length"] = self.max_length
        return out
