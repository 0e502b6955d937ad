"""The ADM workflow templates (arXiv 2307.08702 on ImageNet and the fine-grained sets).

Each template, with only what a user edits changed (dataset root -> a fake dataset in the
reader's native layout, the guided-diffusion checkpoint -> the tiny model in the same
layout at 256 px, the reference factory -> a toy network named like a ResNet, the device
-> this CPU), passes ``diffprobe run --dry-run``: the blocks, timesteps, splits, pools and
heads it ships are valid. And each is the paper's whole protocol, with its settings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fake_datasets import make_dataset
from helpers import invoke

ROOT = Path(__file__).resolve().parent.parent
ADM = "guided_diffusion_adm.py:adm256_uncond"
TEMPLATES = sorted(p for p in (ROOT / "workflows").glob("*.yaml") if ADM in p.read_text())
TINY_ADM = ROOT / "data" / "factories" / "guided_diffusion_tiny.py"
RESNET = ROOT / "tests" / "factories" / "resnet_layers.py"
#: dataset -> (train split, test split): the official splits
SPLITS = {"imagenet": ("train", "val"), "cub": ("train", "test"), "cars": ("train", "test"),
          "aircraft": ("trainval", "test"), "flowers": ("trainval", "test"), "pets": ("trainval", "test"),
          "food": ("train", "test"), "dogs": ("train", "test"), "nabirds": ("train", "test")}


def test_every_adm_dataset_has_a_template():
    readers = {yaml.safe_load(p.read_text())["stages"][0]["dataset"]["reader"] for p in TEMPLATES}
    assert readers == set(SPLITS)


def load(path: Path) -> dict:
    """The template as plain data, every ``*anchor`` its own copy (so editing one stage edits one)."""
    return json.loads(json.dumps(yaml.safe_load(path.read_text())))


def stages_of(path: Path) -> dict[str, dict]:
    return {s["name"]: s for s in load(path)["stages"]}


@pytest.mark.parametrize("path", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_template_is_the_papers_protocol(path):
    stages = stages_of(path)
    extracts = {n: s for n, s in stages.items() if s["stage"] == "extract"}
    adm = {n: s for n, s in extracts.items() if ADM in s["model"]["factory"]}
    reference = [n for n, s in extracts.items() if s["model"]["options"].get("timestep_free")]
    reader = next(iter(adm.values()))["dataset"]["reader"]
    train, test = SPLITS[reader]
    by_split = {s["dataset"]["split"]: n for n, s in adm.items()}
    assert set(by_split) == {train, test}, by_split
    for s in adm.values():
        assert s["blocks"] == [24] and 150 in s["timesteps"] and s["dataset"]["resize"] == "adm"
        assert s["compute_dtype"] == "float16" and "pool" not in s  # block 24 is stored at 16x16
    assert adm[by_split[train]]["augment"]["kind"] == "adm_random_crop"
    assert adm[by_split[train]]["views"] >= 2 and adm[by_split[test]].get("views", 1) == 1

    probes = [s for s in stages.values() if s["stage"] == "probe"]
    heads = {h["name"]: (h, p) for p in probes for h in p["heads"]}
    assert set(heads) == {"linear", "mlp", "cnn", "attention"}
    for head, probe in heads.values():
        recipe = {**probe["train"], **head.get("train", {})}
        assert {k: recipe[k] for k in ("optimizer", "momentum", "weight_decay", "schedule", "step_size",
                                       "gamma", "epochs")} == {
            "optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0, "schedule": "step", "step_size": 7,
            "gamma": 0.1, "epochs": 28}
        # trained on the random views only, tested on the centre crop of the official test split
        assert probe["batch_size"] == 128 and 0 not in probe["train_views"] and probe["test_views"] == [0]
        tested = probe["test_input"]
        assert by_split[test] in (tested, stages[tested].get("input")), tested
    linear, attention = heads["linear"], heads["attention"]
    assert linear[0]["pools"] == [2] and {**linear[1]["train"], **linear[0].get("train", {})}["lr"] == 0.01
    assert attention[1]["input"] == by_split[train]  # the stored 16x16 maps, as the paper's pre_pool_size 16
    assert {**attention[1]["train"], **attention[0]["train"]}["lr"] == 0.05
    assert attention[0]["head"] | {"kind": "attention"} == {"kind": "attention", "width": 1024, "heads": 8,
                                                           "depth": 2, "mlp_ratio": 4.0}

    assert len(reference) == 1
    assert any(s["stage"] == "cka" and s.get("mode") == "across"
               and any(c["input"] == reference[0] for c in s["cols"]) for s in stages.values())
    report = next(s for s in stages.values() if s["stage"] == "report")
    assert set(report["inputs"]) == set(stages) - {"report"}


@pytest.fixture(scope="module")
def fake_roots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("datasets")
    return {reader: make_dataset(reader, folder / reader) for reader in SPLITS}


@pytest.mark.parametrize("path", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_template_passes_dry_run_with_its_paths_edited(path, fake_roots, tmp_path):
    doc = load(path)
    doc["output_dir"] = str(tmp_path / "runs")
    for stage in doc["stages"]:
        if stage["stage"] != "extract":
            continue
        stage["dataset"]["root"] = str(fake_roots[stage["dataset"]["reader"]])
        stage["device"] = "cpu"  # this machine's, not the template's
        model = stage["model"]
        if ADM in model["factory"]:
            # model_channels 4: the ADM-256 layout (so block 24 is 16x16) at toy width
            model.update(factory=f"{TINY_ADM}:tiny_adm",
                         options={"image_size": 256, "in_channels": 3, "model_channels": 4})
        else:
            model["factory"] = f"{RESNET}:resnet50"
            model["options"]["weights"] = str(tmp_path / "resnet50.pth")
    # the fake test splits hold a few images: the minibatch CKA's batch of 256 would be
    # refused (rightly) by validation, as it would be on a real run over so few images
    for stage in doc["stages"]:
        if stage["stage"] == "cka" and stage.get("estimator") == "minibatch":
            stage["batch_size"] = 4
    edited = tmp_path / path.name
    edited.write_text(yaml.safe_dump(doc, sort_keys=False))
    code, out = invoke("run", "--dry-run", edited)
    assert code == 0, out
    lines = out.splitlines()
    for stage in doc["stages"]:
        assert any(line.startswith(f"{stage['name']} ({stage['stage']}) -> ") and line.endswith(": run")
                   for line in lines), (stage["name"], out)
