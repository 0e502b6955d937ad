"""Random-weight models of real sizes for the GPU check, written as the files users point at.

``adm_config`` is a diffusers ``UNet2DModel`` config with guided-diffusion ADM-256's
widths (256 base channels, channel_mult (1, 1, 2, 2, 4, 4), 2 res blocks, attention at
32/16/8 with 64 channels per head, scale-shift norm): ~550 M parameters, the same
FLOPs per forward as the released checkpoint whatever the weights. ``write_sd_folder``
writes a Stable Diffusion pipeline folder with random weights from a UNet and a VAE
config; here ``sd_unet_config`` / ``sd_vae_config`` give SD 1.x's (860 M parameters,
64x64 latents), and the CLIP text encoder has SD's width (768) but one layer, since
prompts are encoded once per run and are not what the check measures. ``tiny=True``
keeps every structure (level count, block types, so block names match) at toy widths
for the CPU smoke run. The tests build their own toy SD folders with the same writer.
"""

from __future__ import annotations

import json
from pathlib import Path

#: top-level blocks of both U-Nets (diffusers names), in forward order
ADM_BLOCKS = [f"down_blocks.{i}" for i in range(6)] + ["mid_block"] + [f"up_blocks.{i}" for i in range(6)]
SD_BLOCKS = [f"down_blocks.{i}" for i in range(4)] + ["mid_block"] + [f"up_blocks.{i}" for i in range(4)]

#: guided-diffusion paper block number -> the diffusers module that ends there (ADM layout:
#: input blocks 1-18, middle 19, output blocks 20-37; 24 = output_blocks.4 = up_blocks.1's
#: second resnet + attention)
ADM_PAPER_BLOCKS = {4: "down_blocks.0", 10: "down_blocks.2", 16: "down_blocks.4", 18: "down_blocks.5",
                    19: "mid_block", 24: "up_blocks.1.attentions.1"}


def adm_config(tiny: bool = False) -> dict:
    widths = (8, 8, 16, 16, 32, 32) if tiny else (256, 256, 512, 512, 1024, 1024)
    return {
        "sample_size": 32 if tiny else 256, "in_channels": 3, "out_channels": 3,
        "block_out_channels": list(widths), "layers_per_block": 2,
        "down_block_types": ["DownBlock2D"] * 3 + ["AttnDownBlock2D"] * 3,
        "up_block_types": ["AttnUpBlock2D"] * 3 + ["UpBlock2D"] * 3,
        "attention_head_dim": 8 if tiny else 64, "norm_num_groups": 4 if tiny else 32,
        "resnet_time_scale_shift": "scale_shift",
    }


def sd_unet_config(tiny: bool = False) -> dict:
    return {
        "sample_size": 4 if tiny else 64, "in_channels": 4, "out_channels": 4,
        "block_out_channels": [8, 16, 16, 16] if tiny else [320, 640, 1280, 1280], "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "cross_attention_dim": 16 if tiny else 768, "attention_head_dim": 4 if tiny else 8,
        "norm_num_groups": 4 if tiny else 32,
    }


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: the 256 base symbols of a byte-level BPE vocab."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]


def write_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer with no merges (one token per byte): 514 ids, loads offline."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))


def sd_vae_config(tiny: bool = False) -> dict:
    """SD's ``AutoencoderKL`` (4 levels, 8x down); toy widths with ``tiny``."""
    return {
        "block_out_channels": [8, 8, 8, 8] if tiny else [128, 256, 512, 512], "in_channels": 3, "out_channels": 3,
        "latent_channels": 4, "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "norm_num_groups": 4 if tiny else 32,
        "sample_size": 32 if tiny else 512,
    }


def write_sd_folder(folder: Path, unet: dict, vae: dict) -> Path:
    """A StableDiffusionPipeline-layout folder with random weights (torch seed 0).

    ``unet`` and ``vae`` are ``UNet2DConditionModel`` and ``AutoencoderKL`` configs (the
    GPU check's: ``sd_unet_config``, ``sd_vae_config``; the tests pass toy ones). The CLIP
    text encoder is one layer at the UNet's ``cross_attention_dim``; the tokenizer is
    ``write_tokenizer``'s; the scheduler is SD's scaled-linear DDPM.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(0)
    UNet2DConditionModel(**unet).save_pretrained(folder / "unet")
    AutoencoderKL(**vae).save_pretrained(folder / "vae")
    width = unet["cross_attention_dim"]
    CLIPTextModel(CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_attention_heads=2,
                                 num_hidden_layers=1, vocab_size=1000, max_position_embeddings=77,
                                 projection_dim=width, bos_token_id=512, eos_token_id=513, pad_token_id=513)
                  ).save_pretrained(folder / "text_encoder")
    write_tokenizer(folder / "tokenizer")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDPMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_image_folder(root: Path, n_images: int, size: int, classes=CIFAR10) -> Path:
    """``root/<class>/<i>.png``: smooth random RGB images (cheap to encode and decode)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n_images):
        folder = root / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(folder / f"{i:05d}.png")
    return root
