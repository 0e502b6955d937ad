"""Helpers the tests share: the tiny UNet config and workflow writers (plain functions;
the fixtures in conftest.py build on them)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

#: diffusers-style tiny config: class-conditional (10 digits + null class 10), 16x16, 1 channel.
TINY_UNET = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
    "num_class_embeds": 11,
    "attention_head_dim": 8,
}


def write_extract_workflow(folder: Path, **overrides) -> Path:
    """A one-stage extract workflow on digits with the tiny UNet; keyword args override params."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny_unet.json").write_text(json.dumps(TINY_UNET))
    params = {
        "model": "{config: tiny_unet.json, null_class: 10}",
        "dataset": "{reader: digits, split: test, limit: 30}",
        "blocks": "[down_blocks.1, mid_block, up_blocks.0]",
        "timesteps": "[10, 100, 400]",
        "conditioning": "class",
        "batch_size": "4",
        "unit_samples": "8",
    }
    params.update({k: str(v) for k, v in overrides.items()})
    body = "\n".join(f"    {k}: {v}" for k, v in params.items() if v != "None")
    text = textwrap.dedent(
        """\
        name: t
        output_dir: out
        stages:
          - name: ex
            stage: extract
        """
    ) + body + "\n"
    path = folder / "wf.yaml"
    path.write_text(text)
    return path
