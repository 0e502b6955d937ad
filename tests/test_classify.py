"""The classify stage: stored errors against a direct recomputation, shared (t, eps) across
classes, adaptive savings, re-scoring from the cache, resume, scoring without torch,
SD / DiT end to end, and the shipped digits model above chance."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from pipeline import store


from pipeline.dc import rescore
from pipeline.workflow.config import load_workflow
from stages import STAGES
from pipeline.datasets import DatasetConfig, open_dataset, preprocess
from pipeline.dc.classifier import TrialPlan, even_timesteps
from pipeline.errors import ConfigError, ModelError, StoreError
from pipeline.models import ModelConfig, load_model
from pipeline.models.unet2d import UNet2DAdapter
from pipeline.noise import sample_noise
from pipeline.workflow.runner import Runner
from stages.classify import Classifier
from helpers import TINY_UNET, tiny_vae, write_tiny_sd

ROOT = Path(__file__).resolve().parents[1]
DIGITS_MODEL = ROOT / "data" / "models" / "digits-ddpm"
N_IMAGES, N_TRIALS = 6, 6


def classify_workflow(folder: Path, **params) -> Path:
    """A one-stage classify workflow on held-out digits with the tiny UNet; params override."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny_unet.json").write_text(json.dumps(TINY_UNET))
    values = {"model": "{config: tiny_unet.json, null_class: 10}",
              "dataset": f"{{reader: digits, split: test, limit: {N_IMAGES}}}",
              "n_timesteps": N_TRIALS, "batch_size": 16}
    values.update(params)
    body = "\n".join(f"    {k}: {v}" for k, v in values.items() if v is not None)
    (folder / "wf.yaml").write_text("name: t\noutput_dir: out\nstages:\n  - name: c\n    stage: classify\n"
                                    + body + "\n")
    return folder / "wf.yaml"


def run_classify(folder: Path, **params) -> Path:
    Runner(load_workflow(classify_workflow(folder, **params), STAGES), progress=False).run()
    return folder / "out" / "c.zarr"


def read(path: Path, name: str) -> np.ndarray:
    return zarr.open_group(str(path), mode="r")[name][:]


@pytest.fixture(scope="module")
def exhaustive(tmp_path_factory):
    """An exhaustive run (6 images x 10 classes x 6 trials) and every denoiser call it made."""
    calls = []
    original = UNet2DAdapter.forward

    def recording(self, x_t, t, cond):
        calls.append((x_t.detach().clone(), t.detach().clone(), cond.labels.detach().clone()))
        return original(self, x_t, t, cond)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(UNet2DAdapter, "forward", recording)
        path = run_classify(tmp_path_factory.mktemp("exhaustive"))
    return path, calls


def test_store_opens_with_xarray_and_carries_the_plan(exhaustive):
    path, _ = exhaustive
    ds = xr.open_zarr(path)
    for loss in ("l2", "l1", "huber"):
        assert ds[f"error_{loss}"].dims == ("sample", "candidate", "trial")
        assert ds[f"error_{loss}"].shape == (N_IMAGES, 10, N_TRIALS)
    assert ds["timestep"].dims == ("trial",) and ds["timestep"].values.tolist() == even_timesteps(N_TRIALS)
    assert ds["class_name"].values.tolist() == [str(d) for d in range(10)]
    assert {"image_id", "label", "class_name", "timestep"} <= set(ds.coords)
    attrs = store.read_attrs(path)
    assert TrialPlan.from_dict(attrs["plan"]).timesteps == tuple(even_timesteps(N_TRIALS))
    assert "sample_noise" in attrs["plan"]["eps_scheme"] and attrs["provenance"]["noise"]["seed"] == 0
    assert attrs["schedule"]["kind"] == "exhaustive" and attrs["complete"] is True
    assert (ds["forward_passes"].values == 10 * N_TRIALS).all()
    assert np.isfinite(ds["error_l2"].values).all()


def test_stored_errors_equal_an_independent_recomputation(exhaustive, tmp_path):
    path, _ = exhaustive
    attrs = store.read_attrs(path)
    plan = TrialPlan.from_dict(attrs["plan"])
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_UNET))
    adapter = load_model(ModelConfig(config=str(tmp_path / "tiny.json"), null_class=10))
    unet = adapter.module
    abar = torch.tensor(attrs["provenance"]["alphas_cumprod"], dtype=torch.float64)
    reader = open_dataset(DatasetConfig(reader="digits", split="test", limit=N_IMAGES))
    ids = read(path, "image_id").tolist()
    for s, c, trial in [(0, 0, 0), (2, 7, 3), (5, 9, 5), (3, 3, 1), (1, 5, 2)]:
        record = reader.records[s]
        assert ids[s] == record.image_id
        x0 = torch.from_numpy(preprocess(reader.load_image(record), adapter.preprocessing))
        t = plan.timesteps[trial]
        eps = sample_noise(plan.seed, record.image_id, 0, t, x0.shape).double()
        x_t = (abar[t].sqrt() * x0.double() + (1 - abar[t]).sqrt() * eps).float()
        with torch.no_grad():
            pred = unet(x_t[None], torch.tensor([t]), class_labels=torch.tensor([c])).sample[0].double()
        d = (pred - eps).abs()
        expected = {"l2": (d**2).mean(), "l1": d.mean(), "huber": torch.where(d < 1, 0.5 * d**2, d - 0.5).mean()}
        for loss, value in expected.items():
            stored = read(path, f"error_{loss}")[s, c, trial]
            np.testing.assert_allclose(stored, value.item(), rtol=1e-4, err_msg=f"{loss} {s, c, trial}")


def test_every_class_of_a_sample_gets_the_same_t_and_eps(exhaustive):
    """The method's variance reduction: class errors are compared on identical (x_t, t)."""
    _, calls = exhaustive
    groups: dict[tuple[int, bytes], list[int]] = {}
    for x_t, t, labels in calls:
        for row in range(x_t.shape[0]):
            groups.setdefault((int(t[row]), x_t[row].numpy().tobytes()), []).append(int(labels[row]))
    # one input per (sample, trial), and each is shown to every class exactly once
    assert len(groups) == N_IMAGES * N_TRIALS
    assert all(sorted(labels) == list(range(10)) for labels in groups.values())
    assert sum(x.shape[0] for x, _, _ in calls) == N_IMAGES * N_TRIALS * 10
    assert max(x.shape[0] for x, _, _ in calls) == 16  # batches mix samples, trials and classes


def test_adaptive_spends_fewer_passes_on_the_same_cells(exhaustive, tmp_path):
    full, _ = exhaustive
    path = run_classify(tmp_path, schedule="{timesteps_per_round: [3, 6], keep_per_round: [3, 1]}")
    passes = read(path, "forward_passes")
    # round 1: trials 1, 3, 5 for all 10 classes; round 2: trials 0, 2, 4 for the 3 survivors
    assert passes.tolist() == [10 * 3 + 3 * 3] * N_IMAGES
    assert passes.sum() < read(full, "forward_passes").sum()
    errors, reference = read(path, "error_l2"), read(full, "error_l2")
    evaluated = np.isfinite(errors)
    assert evaluated[:, :, [1, 3, 5]].all()
    assert (evaluated[:, :, [0, 2, 4]].sum(axis=1) == 3).all()
    # same (t, eps) per timestep whatever the schedule: evaluated cells equal the exhaustive ones
    np.testing.assert_allclose(errors[evaluated], reference[evaluated], rtol=1e-5)
    # elimination recomputed from the exhaustive cache: top 3 on round 1's trials, then argmin on all
    for s in range(N_IMAGES):
        survivors = np.argsort(reference[s][:, [1, 3, 5]].mean(axis=1), kind="stable")[:3]
        assert set(np.flatnonzero(evaluated[s, :, 0])) == set(survivors)
        expected = survivors[np.argmin(reference[s][survivors].mean(axis=1))]
        assert read(path, "prediction")[s] == expected
    assert rescore.score_store(path)["predictions"].tolist() == read(path, "prediction").tolist()


def test_plan_counts_the_forward_passes_a_run_spends(tmp_path):
    runner = Runner(load_workflow(classify_workflow(tmp_path, schedule="{timesteps_per_round: [3, 6], keep_per_round: [3, 1]}"), STAGES),
                    progress=False)
    entry = runner.wf.stage("c")
    rows = dict(runner.stages["c"].plan(entry.config, runner.context(entry)))
    assert rows["forward passes"].startswith(f"{N_IMAGES * 39} (39 per sample; exhaustive would be 60)")
    assert "forwards/s" in rows["time (est.)"]


def test_rescoring_a_trial_subset_equals_running_with_it(exhaustive, tmp_path):
    full, _ = exhaustive
    subset = [0, 2, 5]
    timesteps = [even_timesteps(N_TRIALS)[i] for i in subset]
    path = run_classify(tmp_path, n_timesteps=None, timesteps=json.dumps(timesteps))
    np.testing.assert_allclose(read(path, "error_l1"), read(full, "error_l1")[:, :, subset], rtol=1e-5)
    ran, rescored = rescore.score_store(path), rescore.score_store(full, trials=subset)
    assert rescored["predictions"].tolist() == ran["predictions"].tolist() == read(path, "prediction").tolist()
    assert rescored["accuracy"] == ran["accuracy"]
    np.testing.assert_array_equal(rescored["confusion"], ran["confusion"])
    by_time = rescore.score_store(full, timesteps=timesteps)
    assert by_time["predictions"].tolist() == ran["predictions"].tolist()
    assert rescored["forward_passes"] == ran["forward_passes_spent"] == N_IMAGES * 10 * len(subset)


def test_interrupted_run_resumes_and_skips_units_already_done(exhaustive, tmp_path, monkeypatch):
    full, _ = exhaustive
    computed = []
    original = Classifier.compute_unit

    def crash_on_second_unit(self, unit, strict=False):
        if computed:
            raise RuntimeError("simulated crash")
        computed.append(unit)
        return original(self, unit, strict)

    monkeypatch.setattr(Classifier, "compute_unit", crash_on_second_unit)
    wf = classify_workflow(tmp_path, unit_samples=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Runner(load_workflow(wf, STAGES), progress=False).run()
    path = tmp_path / "out" / "c.zarr"
    assert store.unit_status(path).tolist() == [True, False, False]
    with pytest.raises(StoreError, match="incomplete"):
        rescore.score_store(path)
    written = {p: p.stat().st_mtime_ns for p in (path / "error_l2" / "c").rglob("*") if p.is_file()}
    assert len(written) == 1  # unit 0 is one shard

    def counting(self, unit, strict=False):
        computed.append(unit)
        return original(self, unit, strict)

    computed.clear()
    monkeypatch.setattr(Classifier, "compute_unit", counting)
    assert Runner(load_workflow(wf, STAGES), progress=False).run() == [("c", "resume")]
    assert computed == [1, 2]
    assert all(p.stat().st_mtime_ns == m for p, m in written.items())
    assert store.read_attrs(path)["complete"] is True
    for loss in ("l2", "l1", "huber"):
        np.testing.assert_allclose(read(path, f"error_{loss}"), read(full, f"error_{loss}"), rtol=1e-5)


def test_score_command_needs_no_torch(exhaustive, tmp_path):
    path, _ = exhaustive
    code = textwrap.dedent(f"""\
        import sys
        from pipeline.cli.commands import main
        try:
            main(["score", {str(path)!r}, "--trials", "0:6:2", "--loss", "l1", "--out", {str(tmp_path)!r}])
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
        assert "torch" not in sys.modules, "diffprobe score imported torch"
        """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout
    summary = json.loads((tmp_path / "score.json").read_text())
    expected = rescore.score_store(path, loss="l1", trials=[0, 2, 4])
    assert summary["accuracy"] == expected["accuracy"] and summary["trials"] == [0, 2, 4]
    assert summary["confusion"] == expected["confusion"].tolist()
    assert (tmp_path / "confusion.png").stat().st_size > 0 and (tmp_path / "per_class.csv").exists()


def test_trial_selection_parsing_and_bad_inputs(exhaustive, tmp_path):
    path, _ = exhaustive
    assert rescore.parse_trials("0:4,7,-1", 10) == [0, 1, 2, 3, 7, 9]
    assert rescore.parse_trials("::3", 10) == [0, 3, 6, 9]
    with pytest.raises(ConfigError, match="outside 0..9"):
        rescore.parse_trials("12", 10)
    with pytest.raises(ConfigError, match="not trials of the plan"):
        rescore.score_store(path, timesteps=[999])
    with pytest.raises(ConfigError, match="unknown loss"):
        rescore.score_store(path, loss="l3")
    weighted = rescore.score_store(path, weighting="x0")
    assert 0.0 <= weighted["accuracy"] <= 1.0
    with pytest.raises(ConfigError, match="keep_per_round"):
        Runner(load_workflow(classify_workflow(tmp_path / "a", n_timesteps=None,
                                               schedule="{timesteps_per_round: [3, 6]}"), STAGES), progress=False)
    with pytest.raises(ConfigError, match="n_timesteps"):
        load_workflow(classify_workflow(tmp_path / "b", n_timesteps=None), STAGES)
    with pytest.raises(ConfigError, match="did you mean 'cifar10'"):
        load_workflow(classify_workflow(tmp_path / "c", schedule="{preset: cifar}"), STAGES)
    with pytest.raises(ConfigError, match="'prompt' is for text-conditional"):
        run_classify(tmp_path / "d", prompt="mnist")
    with pytest.raises(StoreError, match="not a classify store"):
        rescore.score_store(tmp_path / "d")


def test_unconditional_model_is_refused(tmp_path):
    (tmp_path / "u.json").write_text(json.dumps({k: v for k, v in TINY_UNET.items() if k != "num_class_embeds"}))
    with pytest.raises(ModelError, match="unconditional"):
        run_classify(tmp_path, model="{config: u.json}")


# ----------------------------------------------------------------- SD and DiT, tiny random


def test_tiny_stable_diffusion_classifies_with_one_prompt_per_class(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("pipeline.models.sd")
    folder = write_tiny_sd(tmp_path / "sd")
    path = run_classify(tmp_path / "run", model=f"{{kind: sd, path: {folder}}}", prompt="mnist",
                        dataset="{reader: digits, split: test, limit: 2}", n_timesteps=2)
    attrs = store.read_attrs(path)
    prompts = read(path, "candidate_prompt").tolist()
    assert prompts[3] == "a photo of the number: '3'." and len(prompts) == 10  # the published MNIST set
    assert attrs["provenance"]["conditioning"]["class_prompts"][3] == [prompts[3]]
    errors = read(path, "error_l2")
    assert errors.shape == (2, 10, 2) and np.isfinite(errors).all()
    assert len(np.unique(errors[0, :, 0])) == 10  # each class has its own prompt
    # one cell recomputed: VAE latents, the class's prompt embedding, the UNet
    sd = load_model(ModelConfig(kind="sd", path=str(folder)))
    reader = open_dataset(DatasetConfig(reader="digits", split="test", limit=2))
    plan = TrialPlan.from_dict(attrs["plan"])
    s, c, trial = 1, 7, 1
    pixels = torch.from_numpy(preprocess(reader.load_image(reader.records[s]), sd.preprocessing))[None]
    x0 = sd.encode(pixels)[0]
    t = plan.timesteps[trial]
    eps = sample_noise(plan.seed, reader.records[s].image_id, 0, t, x0.shape)
    abar = sd.alphas_cumprod[t]
    x_t = (abar.sqrt() * x0.double() + (1 - abar).sqrt() * eps.double()).float()
    with torch.no_grad():
        pred = sd.module(x_t[None], torch.tensor([t]), encoder_hidden_states=sd.encode_text([prompts[c]])).sample
    np.testing.assert_allclose(errors[s, c, trial], ((pred[0] - eps) ** 2).mean().item(), rtol=1e-4)


def test_tiny_dit_classifies_adaptively(tmp_path):
    pytest.importorskip("pipeline.models.dit")
    from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

    folder = tmp_path / "dit"
    torch.manual_seed(1)
    DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                          sample_size=8, patch_size=2, num_embeds_ada_norm=10).save_pretrained(folder / "transformer")
    tiny_vae().save_pretrained(folder / "vae")
    DDPMScheduler().save_pretrained(folder / "scheduler")
    path = run_classify(tmp_path / "run", model=f"{{kind: dit, path: {folder}}}", n_timesteps=None,
                        dataset="{reader: digits, split: test, limit: 3}",
                        schedule="{timesteps_per_round: [2, 4], keep_per_round: [2, 1]}")
    errors = read(path, "error_l2")
    assert read(path, "forward_passes").tolist() == [10 * 2 + 2 * 2] * 3
    # round 1: trials 1, 3 for all classes; round 2: trials 0, 2 for the 2 survivors
    assert np.isfinite(errors[:, :, [1, 3]]).all()
    assert (np.isfinite(errors[:, :, [0, 2]]).sum(axis=1) == 2).all()
    # one cell recomputed with the DiT called directly (label = class index)
    dit = load_model(ModelConfig(kind="dit", path=str(folder)))
    reader = open_dataset(DatasetConfig(reader="digits", split="test", limit=3))
    plan = TrialPlan.from_dict(store.read_attrs(path)["plan"])
    s, c, trial = 2, 4, 1
    x0 = dit.encode(torch.from_numpy(preprocess(reader.load_image(reader.records[s]), dit.preprocessing))[None])[0]
    t = plan.timesteps[trial]
    eps = sample_noise(plan.seed, reader.records[s].image_id, 0, t, x0.shape)
    x_t = dit.add_noise(x0[None], eps[None], torch.tensor([t]))
    with torch.no_grad():
        pred = dit.module(x_t, torch.tensor([t]), class_labels=torch.tensor([c])).sample[:, :4]
    np.testing.assert_allclose(errors[s, c, trial], ((pred[0] - eps) ** 2).mean().item(), rtol=1e-4)


# ----------------------------------------------------------------- the shipped digits model


@pytest.mark.skipif(not (DIGITS_MODEL / "unet" / "config.json").exists(), reason="digits-ddpm not shipped yet")
def test_shipped_digits_model_classifies_well_above_chance(tmp_path):
    """40 held-out digits, 10 trials: exhaustive and adaptive [5, 10] / [3, 1] (chance is 0.1)."""
    common = {"model": f"{{path: {DIGITS_MODEL}, null_class: 10}}", "batch_size": 100,
              "dataset": "{reader: digits, split: test, limit: 40}"}
    full = run_classify(tmp_path / "full", n_timesteps=10, **common)
    adaptive = run_classify(tmp_path / "adaptive", n_timesteps=None, schedule="{timesteps_per_round: [5, 10], keep_per_round: [3, 1]}",
                            **common)
    a, b = rescore.score_store(full), rescore.score_store(adaptive)
    assert a["accuracy"] >= 0.6 and b["accuracy"] >= 0.6, (a["accuracy"], b["accuracy"])
    assert b["forward_passes_spent"] < a["forward_passes_spent"]


# ----------------------------------------------------------------- grid, noise draws, prompts


def test_a_preset_runs_on_the_published_grid(tmp_path):
    """cifar10: [50, 500] / [5, 1] on the reference's grid of 500 (t = 1, 3, ..., 999)."""
    wf = load_workflow(classify_workflow(tmp_path, n_timesteps=None, schedule="{preset: cifar10}"), STAGES)
    clf = Classifier(wf.stage("c").config)
    assert clf.plan.timesteps == tuple(range(1, 1000, 2))
    rounds = clf.schedule_attrs()["round_trials"]
    assert [clf.plan.trial_timesteps[i] for i in rounds[0]] == list(range(11, 1000, 20))
    assert clf.schedule_attrs()["forward_passes_per_sample"] == 10 * 50 + 5 * 450
    # the same grid given explicitly is accepted
    same = load_workflow(classify_workflow(tmp_path / "same", n_timesteps=500, schedule="{preset: cifar10}"), STAGES)
    assert Classifier(same.stage("c").config).plan == clf.plan


@pytest.mark.parametrize("params, message", [
    # 1000 would evaluate t = 10, 30, ... in round 1 and 3000 forwards instead of 2750
    ({"n_timesteps": 1000, "schedule": "{preset: cifar10}"}, "n_timesteps: 1000 changes the grid of schedule"),
    ({"n_timesteps": 40, "schedule": "{timesteps_per_round: [10, 20], keep_per_round: [3, 1]}"},
     r"rounds choose from 20 timesteps"),
    ({"n_timesteps": None, "timesteps": "[1, 3, 5]", "schedule": "{preset: cifar10}"}, "published grid of 500"),
    ({"n_timesteps": None, "spacing": "random", "schedule": "{preset: pets}"}, "published grid of 250"),
    ({"n_timesteps": None, "timesteps": "[1, 3, 5]", "schedule": "{timesteps_per_round: [2, 4], keep_per_round: [2, 1]}"},
     "needs a grid of 4"),
    ({"noise_draws": 0}, "'noise_draws' must be >= 1"),
])
def test_grids_that_differ_from_the_reference_are_refused_in_one_line(tmp_path, params, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_workflow(classify_workflow(tmp_path, **params), STAGES)
    assert "\n" not in str(err.value) and "wf.yaml" in str(err.value)


def test_several_noise_draws_per_timestep(exhaustive, tmp_path):
    full, _ = exhaustive
    path = run_classify(tmp_path, noise_draws=2)
    ds = xr.open_zarr(path)
    grid = even_timesteps(N_TRIALS)
    assert ds["error_l2"].shape == (N_IMAGES, 10, 2 * N_TRIALS)
    assert ds["timestep"].values.tolist() == [t for t in grid for _ in range(2)]
    assert ds["draw"].values.tolist() == [0, 1] * N_TRIALS
    assert (ds["forward_passes"].values == 10 * 2 * N_TRIALS).all()
    errors, reference = read(path, "error_l2"), read(full, "error_l2")
    # draw 0 is the one-draw run's eps: the same cells
    np.testing.assert_allclose(errors[:, :, 0::2], reference, rtol=1e-5)
    assert not np.allclose(errors[:, :, 1::2], reference)
    one_draw = rescore.score_store(path, draws=[0])
    assert one_draw["predictions"].tolist() == rescore.score_store(full)["predictions"].tolist()
    assert one_draw["trials"] == list(range(0, 2 * N_TRIALS, 2))
    # a draw-1 cell recomputed with its own eps, sample_noise(seed, image_id, view=1, t)
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_UNET))
    unet = load_model(ModelConfig(config=str(tmp_path / "tiny.json"), null_class=10)).module
    abar = torch.tensor(store.read_attrs(path)["provenance"]["alphas_cumprod"], dtype=torch.float64)
    reader = open_dataset(DatasetConfig(reader="digits", split="test", limit=N_IMAGES))
    s, c, trial = 4, 6, 7  # grid timestep 3, draw 1
    record = reader.records[s]
    x0 = torch.from_numpy(preprocess(reader.load_image(record), load_model(
        ModelConfig(config=str(tmp_path / "tiny.json"), null_class=10)).preprocessing))
    t = grid[3]
    eps = sample_noise(0, record.image_id, 1, t, x0.shape).double()
    x_t = (abar[t].sqrt() * x0.double() + (1 - abar[t]).sqrt() * eps).float()
    with torch.no_grad():
        pred = unet(x_t[None], torch.tensor([t]), class_labels=torch.tensor([c])).sample[0].double()
    np.testing.assert_allclose(errors[s, c, trial], ((pred - eps) ** 2).mean().item(), rtol=1e-4)
    # the score command selects by draw
    assert rescore.score_store(path, timesteps=[grid[3]], draws=[1])["trials"] == [7]


def test_stable_diffusion_with_several_prompts_per_class(tmp_path):
    """A class is its best prompt: predictions equal a numpy min-over-prompts recomputation."""
    pytest.importorskip("transformers")
    folder = write_tiny_sd(tmp_path / "sd")
    rows = ["prompt,classname,classidx"]
    for d in range(10):
        rows.append(f"a photo of the number: '{d}'.,{d},{d}")
        if d in (3, 7):
            rows += [f"a handwritten {d}.,{d},{d}", f"the digit {d} on paper.,{d},{d}"]
    for run in ("run", "adaptive"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "digits.csv").write_text("\n".join(rows) + "\n")
    common = {"model": f"{{kind: sd, path: {folder}}}", "prompt_file": "digits.csv",
              "dataset": "{reader: digits, split: test, limit: 3}", "n_timesteps": 4}
    path = run_classify(tmp_path / "run", **common)
    ds = xr.open_zarr(path)
    candidate_class = ds["candidate_class"].values
    assert ds["error_l2"].dims == ("sample", "candidate", "trial") and ds["error_l2"].shape == (3, 14, 4)
    assert candidate_class.tolist() == [0, 1, 2, 3, 3, 3, 4, 5, 6, 7, 7, 7, 8, 9]
    assert ds["candidate_prompt"].values[4] == "a handwritten 3."
    conditioning = store.read_attrs(path)["provenance"]["conditioning"]
    assert conditioning["class_prompts"][7] == ["a photo of the number: '7'.", "a handwritten 7.",
                                                "the digit 7 on paper."]
    assert conditioning["class_prompts"][0] == ["a photo of the number: '0'."]
    assert conditioning["prompt_source"].endswith("digits.csv")
    errors = ds["error_l2"].values
    means = errors.mean(axis=2)
    per_class = np.stack([means[:, candidate_class == k].min(axis=1) for k in range(10)], axis=1)
    assert ds["prediction"].values.tolist() == per_class.argmin(axis=1).tolist()
    assert rescore.score_store(path)["predictions"].tolist() == per_class.argmin(axis=1).tolist()
    # adaptive over prompts: round 1 keeps the 4 best prompts (as the reference keeps prompt rows)
    adaptive = run_classify(tmp_path / "adaptive", **(common | {
        "n_timesteps": None, "schedule": "{timesteps_per_round: [2, 4], keep_per_round: [4, 1]}"}))
    cells = read(adaptive, "error_l2")
    assert (np.isfinite(cells[:, :, [1, 3]]).all() and (np.isfinite(cells[:, :, 0]).sum(axis=1) == 4).all())
    np.testing.assert_allclose(cells[np.isfinite(cells)], errors[np.isfinite(cells)], rtol=1e-5)
    for s in range(3):
        first = np.argsort(errors[s][:, [1, 3]].mean(axis=1), kind="stable")[:4]
        winner = first[np.argmin(errors[s][first].mean(axis=1))]
        assert read(adaptive, "prediction")[s] == candidate_class[winner]
