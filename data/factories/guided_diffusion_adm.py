"""Factory for OpenAI guided-diffusion ADM checkpoints (the backbone of arXiv 2307.08702).

Needs a local clone of https://github.com/openai/guided-diffusion (nothing is
downloaded: point ``repo`` at the clone and ``checkpoint`` at the ``.pt`` file).
The 256x256 unconditional model used by the paper:

    model:
      kind: factory
      factory: ../data/factories/guided_diffusion_adm.py:adm256_uncond
      options: {repo: /path/to/guided-diffusion, checkpoint: /path/to/256x256_diffusion_uncond.pt,
                image_size: 256, in_channels: 3}
    blocks: [19, 24, 30]            # the paper's 1-based numbering: 24 = output_blocks.4

Settings of the released 256x256 unconditional checkpoint (2307.08702 uses it): 256 base channels, 2 res blocks, channel_mult
(1,1,2,2,4,4), attention at 32/16/8 with 64 channels per head, resblock up/down,
learned sigma, scale-shift norm, linear schedule over 1000 steps. The learned-sigma
half of the output is dropped by the factory adapter.

The model is built in float32 (``use_fp16=False``) and loaded as the checkpoint is
stored; the stage's ``compute_dtype: float16`` then applies the model's own
``convert_to_fp16()`` and sets ``model.dtype``, which is exactly what
``create_model(use_fp16=True)`` followed by the reference scripts' ``convert_to_fp16()``
produce (the paper's precision). There is therefore no ``use_fp16`` option.
"""

from __future__ import annotations

import sys
from pathlib import Path


def adm256_uncond(repo: str, checkpoint: str, image_size: int = 256, in_channels: int = 3):
    """guided-diffusion's 256x256 unconditional ADM with the released checkpoint, in float32."""
    repo_path = Path(repo).expanduser()
    if not (repo_path / "guided_diffusion").is_dir():
        raise FileNotFoundError(f"{repo_path} is not a guided-diffusion clone (no guided_diffusion/ package)")
    if not Path(checkpoint).expanduser().is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist (options.checkpoint)")
    if str(repo_path) not in sys.path:
        sys.path.insert(0, str(repo_path))
    import torch
    from guided_diffusion.script_util import create_model

    model = create_model(
        image_size=image_size, num_channels=256, num_res_blocks=2, channel_mult="", learn_sigma=True,
        class_cond=False, use_checkpoint=False, attention_resolutions="32,16,8", num_heads=4,
        num_head_channels=64, num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0,
        resblock_updown=True, use_fp16=False, use_new_attention_order=False,
    )
    model.load_state_dict(torch.load(Path(checkpoint).expanduser(), map_location="cpu", weights_only=True))
    return model
