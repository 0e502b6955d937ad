"""Block discovery at ADM-256 size: a real batch-1 forward vs the meta-device dry run.

``diffprobe blocks``, ``plan`` and every extract/classify start discover the model's
blocks (names, forward order, output shapes). Before, that was a real forward at batch
1 -- on a CPU login node, most of a minute for ADM-256. Now the forward runs on the
``meta`` device (``ModelAdapter.find_blocks``), which computes shapes only. Both paths
must list the same blocks; this script checks that and times them, interleaved.

Models (random weights; shapes and cost do not depend on the weights):

- ``--repo PATH``: openai/guided-diffusion's own ``UNetModel`` with the settings of
  the 256x256 unconditional checkpoint (``data/factories/guided_diffusion_adm.py``).
- always: ``data/factories/guided_diffusion_tiny.py`` widened to ADM-256's widths
  (``model_channels=256``; no attention outside the middle block).

    .venv/bin/python benchmarks/block_discovery.py --repo /path/to/guided-diffusion
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.models import ModelConfig
from pipeline.models.factory import FactoryAdapter


def adm256(repo: str) -> torch.nn.Module:
    sys.path.insert(0, repo)
    from guided_diffusion.script_util import create_model

    return create_model(
        image_size=256, num_channels=256, num_res_blocks=2, channel_mult="", learn_sigma=True, class_cond=False,
        use_checkpoint=False, attention_resolutions="32,16,8", num_heads=4, num_head_channels=64,
        num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0, resblock_updown=True, use_fp16=False,
        use_new_attention_order=False)


def tiny_wide() -> torch.nn.Module:
    sys.path.insert(0, str(ROOT / "data/factories"))
    from guided_diffusion_tiny import tiny_adm

    return tiny_adm(image_size=256, model_channels=256)


def measure(name: str, module: torch.nn.Module, repeats: int) -> None:
    cfg = ModelConfig(kind="factory", factory=name, options={"image_size": 256, "in_channels": 3})
    adapter = FactoryAdapter(cfg, module)
    params = sum(p.numel() for p in module.parameters())
    times = {"forward": [], "meta": []}
    results = {}
    for _ in range(repeats):
        for mode in ("forward", "meta"):
            start = time.perf_counter()
            results[mode] = adapter.find_blocks(meta=mode == "meta")
            times[mode].append(time.perf_counter() - start)
            assert adapter.discovery == mode, (mode, adapter.discovery)
    assert results["meta"] == results["forward"], "meta discovery listed different blocks"
    best = {mode: min(v) for mode, v in times.items()}
    print(f"{name}: {params / 1e6:.0f} M parameters, {len(results['meta'])} blocks; "
          f"real forward {best['forward']:.2f} s, meta {best['meta']:.3f} s, "
          f"speedup {best['forward'] / best['meta']:.0f}x (best of {repeats}, torch threads "
          f"{torch.get_num_threads()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", help="a guided-diffusion clone (for its own UNetModel)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.repo:
        measure("guided-diffusion UNetModel (ADM-256)", adm256(args.repo), args.repeats)
    measure("guided_diffusion_tiny at ADM-256 widths", tiny_wide(), args.repeats)


if __name__ == "__main__":
    main()
