"""A wheel built from the repository, installed into a fresh venv outside the checkout,
runs a classify stage that needs its shipped prompt set (and reads its shipped class names)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

from helpers import write_tiny_sd

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DATA = ["pipeline/dc/prompt_sets/mnist.csv", "pipeline/dc/prompt_sets/imagenet.csv",
                "pipeline/dc/prompt_sets/templates.csv", "pipeline/datasets/classnames/flowers102.txt"]


def build_wheel(tmp_path: Path) -> Path:
    """``pip wheel`` of a copy of the sources alone (no data/, no tests/), so nothing else can leak in."""
    src = tmp_path / "src"
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("diffprobe-*.whl")
    return wheel


def fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    """A venv with the wheel installed; torch and the other dependencies come from this
    interpreter's site-packages, appended after the venv's own (its .pth files, such as
    an editable install of the checkout, are not processed)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = Path(subprocess.run([str(python), "-c", where], check=True, capture_output=True,
                                  text=True).stdout.strip())
    (purelib / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, capture_output=True, timeout=300)
    return venv


@pytest.mark.slow
def test_installed_wheel_runs_classify_with_shipped_prompts(tmp_path):
    pytest.importorskip("transformers")
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert set(PACKAGE_DATA) <= names and not any(n.startswith("data/") for n in names)
    venv = fresh_venv(tmp_path, wheel)

    work = tmp_path / "work"  # outside the checkout
    work.mkdir()
    sd = write_tiny_sd(work / "sd")
    (work / "wf.yaml").write_text(textwrap.dedent(f"""\
        name: wheel
        output_dir: out
        stages:
          - name: c
            stage: classify
            model: {{kind: sd, path: {sd}}}
            dataset: {{reader: digits, split: test, limit: 2}}
            prompt: mnist
            n_timesteps: 2
            batch_size: 8
        """))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([str(venv / "bin" / "diffprobe"), "run", "wf.yaml", "--no-progress"], cwd=work,
                         env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]

    check = textwrap.dedent("""\
        import json, sys
        import pipeline
        from pipeline import store
        from pipeline.datasets.flowers import flower_names
        attrs = store.read_attrs("out/c.zarr")
        print(json.dumps({"file": pipeline.__file__, "complete": attrs["complete"],
                          "prompts": attrs["provenance"]["conditioning"]["class_prompts"],
                          "source": attrs["provenance"]["conditioning"]["prompt_source"],
                          "flowers": flower_names()}))
        """)
    out = subprocess.run([str(venv / "bin" / "python"), "-c", check], cwd=work, env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).is_relative_to(venv) and not Path(got["file"]).is_relative_to(ROOT)
    assert got["complete"] is True and got["source"] == "shipped:mnist.csv"
    assert got["prompts"][3] == ["a photo of the number: '3'."] and len(got["prompts"]) == 10
    assert len(got["flowers"]) == 102 and got["flowers"][92] == "air plant"
