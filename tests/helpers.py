"""Helpers the tests share: the tiny UNet config and workflow writers (plain functions;
the fixtures in conftest.py build on them)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np

from pipeline import store

ROOT = Path(__file__).resolve().parents[1]

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


#: a 2-level SD UNet on 8x8 latents, cross-attention at 16 (the text encoder's width)
TINY_SD_UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [8, 16], "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 16, "attention_head_dim": 4, "norm_num_groups": 4,
}

#: a 2-level AutoencoderKL (8 channels, 4 latent channels): 16 px images <-> 8x8 latents
TINY_VAE = {
    "block_out_channels": [8, 8], "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
    "norm_num_groups": 4, "sample_size": 16,
}


def tiny_vae():
    """``TINY_VAE`` with random weights."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    return AutoencoderKL(**TINY_VAE)


def write_tiny_sd(folder: Path) -> Path:
    """A tiny random Stable Diffusion pipeline folder (16 px images, 8x8 latents, 16-d CLIP),
    written by the GPU check's own SD folder writer."""
    gpu = str(ROOT / "benchmarks" / "gpu")
    if gpu not in sys.path:
        sys.path.insert(0, gpu)
    from models import write_sd_folder

    return write_sd_folder(folder, TINY_SD_UNET, TINY_VAE)


def synthetic_store(path, n=512, channels=16, p=4, failed=()):
    """A one-block store where sample i holds i everywhere at t=1 and -i at t=2 (labels i % 4).

    Returns ``(path, array path)``, the part spec ``ZarrSource`` takes."""
    layout = store.make_layout(n, {"b": (channels, p, p)}, [1, 2], unit_samples=64)
    samples = store.SampleTable([f"im{i}" for i in range(n)], [0] * n, [False] * n, [i % 4 for i in range(n)])
    store.create_store(path, layout, samples, list("abcd"), {"stage": "extract", "stage_hash": "x"})
    root = store.open_root(path, mode="r+")
    values = np.arange(n, dtype=np.float32)[:, None, None, None, None] * np.ones((1, 2, channels, p, p))
    values[:, 1] *= -1
    for u in range(layout.n_units):
        a, b = layout.unit_range(u)
        store.write_unit(root, layout, u, {"b": values[a:b].astype(np.float32)},
                         {i - a: "bad" for i in failed if a <= i < b})
    return str(path), "blocks/b/activations"


def invoke(*args):
    """Run the ``diffprobe`` CLI in-process: ``(exit code, output)``."""
    from click.testing import CliRunner

    from pipeline.cli.commands import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output.strip()


def one_error_line(code, out):
    """Exit 2, exactly one 'error:' line, no traceback (progress lines may precede it)."""
    assert code == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in out, out
    return errors[0]


def race_for_lease(racers, name: str) -> list:
    """Every ``Claims`` in ``racers`` calls ``try_claim(name)`` at once (a barrier starts the
    threads together); their results in order (None: that racer won)."""
    import threading

    results: list = [None] * len(racers)
    barrier = threading.Barrier(len(racers))

    def take(i):
        barrier.wait()
        results[i] = racers[i].try_claim(name, f"racer {i}")

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(racers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
