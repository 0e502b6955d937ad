"""The GPU check in one call: every GPU number the project needs, in one JSON + one Markdown table.

    benchmarks/gpu/run.sh                  # on a GPU machine: OUT=... (default ./gpu-out)
    python benchmarks/gpu/check.py --cpu-smoke --out /tmp/smoke   # the same table on CPU, tiny widths

Sections (each a list of rows of the same columns in both modes):

``tests``       the ``gpu``-marked tests (``pytest -m gpu``): passed / failed / skipped.
``extract``     extraction efficiency = bare forward time / pipeline time over the same
                (x_t, t) batches, for an ADM-256-sized ``UNet2DModel`` (256x256 pixels) and
                the SD-1.x ``UNet2DConditionModel`` (64x64 latents), compute fp16 and bf16,
                batch 32 and 128, blocks ``one`` (one mid-depth block), ``all`` (every
                top-level block, full maps) and ``pooled`` (every top-level block pooled to
                4x4 on the device). The pipeline side is ``extract_units`` (decode,
                preprocessing, per-sample noise, hooks, truncated forward, float16 cast +
                inf/NaN check, pinned host copy, background Zarr writer), store creation
                excluded; the SD pipeline also runs the VAE encoder once per image. Also:
                what the GPU produces (MB/s of activations at the bare forward's rate) and
                what the writer absorbs (MB/s while it writes).
``truncate``    the truncated forward's speed-up (full forward time / time up to the block)
                for ADM blocks up to the paper's 24.
``classify``    Diffusion-Classifier forwards/s over the bare forward's, SD with the CIFAR-10
                schedule [50, 500] / [5, 1] (500 trials, 10 classes) on a few images.
``variants``    bare forward under channels-last, SDPA off (the classic attention
                processor), and ``torch.compile``, as speed-ups over the default.

Every row records its own wall time; rows that would pass ``--budget`` seconds are
skipped and say so, so the call ends in time whatever the machine. Random weights:
FLOPs and bytes do not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import models as gpu_models  # noqa: E402
from pipeline import store  # noqa: E402
from pipeline.datasets import DatasetConfig  # noqa: E402
from pipeline.datasets.torch_data import load_images  # noqa: E402
from pipeline.hooks import capture, run_truncated  # noqa: E402
from pipeline.models import Condition, ModelConfig  # noqa: E402
import stages.classify  # noqa: E402
import stages.extract  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from stages.extract import ExtractConfig, Extractor, PoolSpec, extract_units  # noqa: E402

_ADAPTERS: dict = {}


def cached_load_model(cfg: ModelConfig, device: str = "cpu", dtype: str = "float32"):
    """One adapter per (model, device, dtype): a 500-900 M parameter random init costs seconds."""
    key = (repr(cfg), device, dtype)
    if key not in _ADAPTERS:
        _ADAPTERS.clear()  # one model on the device at a time
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _ADAPTERS[key] = load_model(cfg, device, dtype)
    return _ADAPTERS[key]


stages.extract.load_model = stages.classify.load_model = cached_load_model

#: the columns of every section's table (JSON rows carry the same keys)
COLUMNS = {
    "tests": ["selection", "passed", "failed", "skipped", "seconds"],
    "extract": ["model", "dtype", "batch", "blocks", "sample_t", "bare_per_s", "pipeline_per_s", "ratio",
                "gpu_MBps", "writer_MBps", "seconds"],
    "truncate": ["model", "dtype", "batch", "block", "paper", "full_ms", "truncated_ms", "speedup", "seconds"],
    "classify": ["model", "dtype", "batch", "schedule", "images", "forwards", "bare_fwd_per_s",
                 "classify_fwd_per_s", "ratio", "s_per_image", "seconds"],
    "variants": ["model", "dtype", "batch", "variant", "default_ms", "variant_ms", "speedup", "seconds"],
}


@dataclass(frozen=True)
class Profile:
    """Sizes of one mode: the GPU run, or the CPU smoke run (same rows, toy sizes)."""

    device: str
    tiny: bool
    dtypes: tuple[str, ...]
    batches: tuple[int, ...]
    timesteps: tuple[int, ...]
    classify_images: int
    classify_schedule: tuple[tuple[int, ...], tuple[int, ...]]
    timing_repeats: int
    compile: bool


GPU = Profile("cuda", False, ("float16", "bfloat16"), (32, 128), (10, 100), 4, ((50, 500), (5, 1)), 5, True)
CPU_SMOKE = Profile("cpu", True, ("float32",), (2,), (10, 100), 2, ((1, 2), (2, 1)), 1, False)


class Budget:
    """Wall-clock budget: rows that would start after ``seconds`` are skipped and say so."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


# ----------------------------------------------------------------- gpu-marked tests


def run_gpu_tests(profile: Profile, out: Path) -> list[dict]:
    """``pytest -m gpu`` on the test files that hold gpu marks (collecting the rest needs extras)."""
    files = sorted(str(p) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())
    start = time.perf_counter()
    report = out / "gpu-tests.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           f"--junitxml={report}", *files], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    (out / "gpu-tests.log").write_text(proc.stdout[-20000:] + proc.stderr[-5000:])
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    if report.exists():
        import xml.etree.ElementTree as ET

        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        total, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped = int(suite.get("skipped", 0))
        counts = {"passed": total - failed - skipped, "failed": failed, "skipped": skipped}
    return [{"selection": "-m gpu " + " ".join(Path(f).name for f in files), **counts,
             "seconds": round(time.perf_counter() - start, 1)}]


# ----------------------------------------------------------------- extraction efficiency


def model_configs(profile: Profile, work: Path) -> dict[str, tuple[ModelConfig, list[str], str]]:
    """name -> (model config, top-level blocks, the 'one' block)."""
    adm_json = work / "adm256.json"
    adm_json.write_text(json.dumps(gpu_models.adm_config(profile.tiny)))
    sd_folder = gpu_models.write_sd_folder(work / "sd15", gpu_models.sd_unet_config(profile.tiny),
                                           gpu_models.sd_vae_config(profile.tiny))
    return {
        "adm256": (ModelConfig(config=str(adm_json)), gpu_models.ADM_BLOCKS, "up_blocks.1"),
        "sd15": (ModelConfig(kind="sd", path=str(sd_folder)), gpu_models.SD_BLOCKS, "up_blocks.1"),
    }


def extract_row(name: str, model: ModelConfig, blocks: list[str], mode: str, dtype: str, batch: int,
                profile: Profile, images: Path, work: Path) -> dict:
    """Bare forward vs ``extract_units`` over the same batches (one unit = one batch)."""
    n_t = len(profile.timesteps)
    per_unit = max(1, batch // n_t)
    units = 1 if mode == "all" else 2  # full maps of every block are ~100 MB per sample on ADM
    cfg = ExtractConfig(
        model=model, dataset=DatasetConfig(reader="imagefolder", root=str(images), split="all",
                                           limit=per_unit * units),
        blocks=tuple(blocks), timesteps=profile.timesteps, batch_size=batch, device=profile.device,
        compute_dtype=dtype, pool=PoolSpec(4) if mode == "pooled" else None,
        conditioning="none", unit_samples=per_unit,
    )
    ex = Extractor(cfg)
    adapter = ex.adapter
    arrays, _ = load_images(ex.reader, ex.prep, range(len(ex.reader.records)))
    with torch.no_grad():
        x0 = torch.cat([adapter.encode(torch.from_numpy(arrays[i])[None].to(ex.device)).float()
                        for i in range(len(arrays))])
    gen = torch.Generator(device="cpu").manual_seed(0)
    pairs = [(s, ti) for s in range(len(x0)) for ti in range(n_t)]
    batches = []
    torch_dtype = getattr(torch, dtype)
    for b in range(0, len(pairs), batch):
        chunk = pairs[b:b + batch]
        t = torch.tensor([profile.timesteps[ti] for _, ti in chunk], device=ex.device)
        eps = torch.randn(len(chunk), *x0.shape[1:], generator=gen).to(ex.device)
        batches.append((adapter.add_noise(x0[[s for s, _ in chunk]], eps, t).to(torch_dtype), t))
    cond = ex.condition([0])

    def bare():
        with torch.no_grad():
            for xb, t in batches:
                adapter.forward(xb, t, cond)

    writer_seconds = [0.0]
    write_unit = store.write_unit

    def counted(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return write_unit(*args, **kwargs)
        finally:
            writer_seconds[0] += time.perf_counter() - begin

    out = work / "extract.zarr"

    def pipeline():
        shutil.rmtree(out, ignore_errors=True)
        store.create_store(out, ex.layout, ex.samples, ex.reader.class_names, {"stage_hash": "gpu-check"})
        writer_seconds[0] = 0.0
        store.write_unit = counted
        try:
            return timed(lambda: extract_units(ex, out, list(range(ex.layout.n_units)), progress=False),
                         profile.device)
        finally:
            store.write_unit = write_unit

    start = time.perf_counter()
    bare()  # warm-up: kernels, allocator
    tb = min(timed(bare, profile.device) for _ in range(max(1, profile.timing_repeats // 2)))
    tp = pipeline()
    shutil.rmtree(out, ignore_errors=True)
    n = len(pairs)
    raw_mb = ex.layout.bytes_per_sample() * ex.layout.n_samples / 1e6
    return {"model": name, "dtype": dtype, "batch": batch, "blocks": f"{mode} ({len(blocks)})",
            "sample_t": n, "bare_per_s": n / tb, "pipeline_per_s": n / tp, "ratio": tb / tp,
            "gpu_MBps": raw_mb / tb, "writer_MBps": raw_mb / max(writer_seconds[0], 1e-9),
            "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------- truncated forward


def noisy_input(adapter, device: str, dtype: str, batch: int):
    """A fixed (seed 0) ``(batch, C, H, W)`` model input in ``dtype`` on ``device``, and t = 100."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, adapter.latent_channels, adapter.latent_size, adapter.latent_size, generator=gen)
    return x.to(device, getattr(torch, dtype)), torch.full((batch,), 100, device=device)


def truncate_rows(model: ModelConfig, profile: Profile) -> list[dict]:
    dtype = profile.dtypes[0]
    batch = profile.batches[0]
    adapter = cached_load_model(model, profile.device, dtype)
    x, t = noisy_input(adapter, profile.device, dtype, batch)
    cond = Condition("none")
    reps = profile.timing_repeats

    def best(fn) -> float:
        with torch.no_grad():
            fn()
            return min(timed(fn, profile.device) for _ in range(reps))

    full = best(lambda: adapter.forward(x, t, cond))
    rows = []
    for paper, block in gpu_models.ADM_PAPER_BLOCKS.items():
        start = time.perf_counter()

        def cut(block=block):
            with capture(adapter.module, [block], stop_after=block):
                run_truncated(lambda: adapter.forward(x, t, cond))

        part = best(cut)
        rows.append({"model": "adm256", "dtype": dtype, "batch": batch, "block": block, "paper": paper,
                     "full_ms": 1e3 * full, "truncated_ms": 1e3 * part, "speedup": full / part,
                     "seconds": time.perf_counter() - start})
    return rows


# ----------------------------------------------------------------- classify


def classify_row(model: ModelConfig, profile: Profile, images: Path, work: Path) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from classify_throughput import bare_rate, run_classify
    from stages.classify import ClassifyConfig, Classifier, ScheduleConfig

    start = time.perf_counter()
    dtype = profile.dtypes[0]
    batch = profile.batches[-1]
    n_samples, to_keep = profile.classify_schedule
    cfg = ClassifyConfig(model=model, dataset=DatasetConfig(reader="imagefolder", root=str(images), split="all",
                                                            limit=profile.classify_images),
                         schedule=ScheduleConfig(n_samples, to_keep), batch_size=batch, device=profile.device,
                         compute_dtype=dtype, prompt="cifar10")
    result = run_classify(cfg, work / "classify.zarr")
    clf = Classifier(cfg)
    bare = bare_rate(clf, batch, min(result["forwards"], 4 * batch))
    shutil.rmtree(work / "classify.zarr", ignore_errors=True)
    return {"model": "sd15", "dtype": dtype, "batch": batch,
            "schedule": f"{list(n_samples)}/{list(to_keep)}", "images": profile.classify_images,
            "forwards": result["forwards"], "bare_fwd_per_s": bare, "classify_fwd_per_s": result["rate"],
            "ratio": result["rate"] / bare, "s_per_image": result["seconds_per_image"],
            "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------- variants


def variant_rows(models: dict, profile: Profile, budget: Budget) -> list[dict]:
    dtype = profile.dtypes[0]
    batch = profile.batches[-1]
    rows = []
    for name, (model, _, _) in models.items():
        adapter = cached_load_model(model, profile.device, dtype)
        x, t = noisy_input(adapter, profile.device, dtype, batch)
        cond = Condition("none")

        def best(fn, inp) -> float:
            with torch.no_grad():
                fn(inp)
                return min(timed(lambda: fn(inp), profile.device) for _ in range(profile.timing_repeats))

        plain = best(lambda inp: adapter.forward(inp, t, cond), x)
        variants = ["channels_last", "no_sdpa"] + (["compile"] if profile.compile else ["compile (GPU only)"])
        for variant in variants:
            start = time.perf_counter()
            row = {"model": name, "dtype": dtype, "batch": batch, "variant": variant, "default_ms": 1e3 * plain}
            if budget.left() < (150 if variant == "compile" else 20) or variant.endswith("(GPU only)"):
                rows.append(row | {"variant_ms": None, "speedup": None, "seconds": 0.0,
                                   "note": "skipped" + (" (time budget)" if budget.left() < 150 else "")})
                continue
            try:
                ms = time_variant(adapter, variant, lambda inp: best(lambda i: adapter.forward(i, t, cond), inp), x)
            except Exception as exc:  # noqa: BLE001 -- a variant that does not run is a finding, not a crash
                rows.append(row | {"variant_ms": None, "speedup": None, "seconds": time.perf_counter() - start,
                                   "note": f"{type(exc).__name__}: {str(exc)[:160]}"})
                continue
            rows.append(row | {"variant_ms": 1e3 * ms, "speedup": plain / ms,
                               "seconds": time.perf_counter() - start})
    return rows


def time_variant(adapter, variant: str, best, x: torch.Tensor) -> float:
    """Best forward time with ``variant`` applied to ``adapter.module``, then undone."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    module = adapter.module
    try:
        if variant == "channels_last":
            adapter.module = module.to(memory_format=torch.channels_last)
            return best(x.to(memory_format=torch.channels_last))
        if variant == "no_sdpa":
            for m in module.modules():
                if isinstance(m, Attention):
                    m.set_processor(AttnProcessor())
            return best(x)
        adapter.module = torch.compile(module)
        return best(x)
    finally:
        adapter.module = module.to(memory_format=torch.contiguous_format)
        for m in module.modules():
            if isinstance(m, Attention):
                m.set_processor(AttnProcessor2_0())


# ----------------------------------------------------------------- driver


def markdown(result: dict) -> str:
    lines = [f"# GPU check ({result['mode']})", "", f"machine: {result['machine']}", ""]
    for section, cols in COLUMNS.items():
        lines += [f"## {section}", "", "| " + " | ".join(cols + ["note"]) + " |",
                  "|" + "---|" * (len(cols) + 1)]
        for row in result["sections"][section]:
            cells = []
            for c in cols:
                v = row.get(c)
                cells.append("—" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v))
            lines.append("| " + " | ".join(cells + [row.get("note", "")]) + " |")
        lines.append("")
    return "\n".join(lines)


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.node()}, {gpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"python {platform.python_version()}, load average {load:.1f}")


def guarded(section: list, what: str, budget: Budget, need: float, fn, template: dict) -> None:
    """Run ``fn`` (returning a row or rows) unless the budget is short; errors become a row's note."""
    if budget.left() < need:
        section.append(template | {"note": "skipped (time budget)"})
        return
    try:
        rows = fn()
        section.extend(rows if isinstance(rows, list) else [rows])
    except Exception as exc:  # noqa: BLE001 -- one failed row must not cost the whole call
        section.append(template | {"note": f"error in {what}: {type(exc).__name__}: {str(exc)[:200]}"})
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-out"))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny widths, batch 2, one dtype, on CPU")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the benchmark rows")
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke or not torch.cuda.is_available()
    profile = CPU_SMOKE if smoke else GPU
    if smoke:
        torch.set_num_threads(1)  # toy widths: more threads only spin on a shared CPU
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dp-gpu-check-"))
    budget = Budget(args.budget)
    sections: dict[str, list[dict]] = {k: [] for k in COLUMNS}
    result = {"mode": "cpu-smoke" if smoke else "gpu", "machine": machine(), "profile": profile.__dict__,
              "sections": sections}
    try:
        if args.skip_tests:
            sections["tests"].append({"selection": "-m gpu", "note": "skipped (--skip-tests)"})
        else:
            guarded(sections["tests"], "pytest", budget, 0, lambda: run_gpu_tests(profile, args.out),
                    {"selection": "-m gpu"})
        models = model_configs(profile, work)
        size = {"adm256": 32 if profile.tiny else 256, "sd15": 32 if profile.tiny else 512}
        folders = {name: gpu_models.write_image_folder(work / f"images-{name}", max(10, 2 * max(profile.batches)),
                                                       size[name]) for name in models}
        guarded(sections["truncate"], "truncate", budget, 30, lambda: truncate_rows(models["adm256"][0], profile),
                {"model": "adm256"})
        # Order: the first dtype's rows, then classify and variants (which use the first dtype, so the
        # cached SD model is reused), then the other dtypes: what the budget cuts comes last.
        for k, dtype in enumerate(profile.dtypes):
            for name, (model, blocks, one) in models.items():
                for batch in profile.batches:
                    for mode in ("one", "pooled", "all"):
                        chosen = [one] if mode == "one" else blocks
                        template = {"model": name, "dtype": dtype, "batch": batch, "blocks": mode}
                        guarded(sections["extract"], "extract", budget, 25,
                                lambda: extract_row(name, model, chosen, mode, dtype, batch, profile,
                                                    folders[name], work), template)
                        write(result, args.out)
            if k == 0:
                guarded(sections["classify"], "classify", budget, 60,
                        lambda: classify_row(models["sd15"][0], profile, folders["sd15"], work),
                        {"model": "sd15"})
                reversed_models = dict(reversed(list(models.items())))  # SD first: it is loaded now
                guarded(sections["variants"], "variants", budget, 30,
                        lambda: variant_rows(reversed_models, profile, budget), {"variant": "all"})
                write(result, args.out)
    finally:
        result["seconds"] = time.perf_counter() - budget.start
        write(result, args.out)
        shutil.rmtree(work, ignore_errors=True)
    return result


def write(result: dict, out: Path) -> None:
    (out / "gpu-check.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "gpu-check.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
