"""Config validation and hashing."""

from __future__ import annotations

import pytest

from pipeline.workflow.config import Where, build_dataclass, load_yaml, stage_hash
from pipeline.errors import ConfigError
from pipeline.probing.training import TrainSpec
from stages.extract import ExtractConfig


def test_yaml_float_strings_are_numbers_but_words_are_errors(tmp_path):
    (tmp_path / "t.yaml").write_text("lr: 1e-3\nepochs: 3\n")
    doc = load_yaml(tmp_path / "t.yaml")
    assert doc["lr"] == "1e-3"  # PyYAML's YAML 1.1 quirk
    spec = build_dataclass(TrainSpec, doc, Where(tmp_path / "t.yaml", 1, "train"))
    assert spec.lr == 0.001 and spec.epochs == 3
    (tmp_path / "t.yaml").write_text("epochs: 3\nlr: fast\n")
    doc = load_yaml(tmp_path / "t.yaml")
    with pytest.raises(ConfigError, match=r"t.yaml:2: 'train.lr' must be a number, got 'fast'"):
        build_dataclass(TrainSpec, doc, Where(tmp_path / "t.yaml", 1, "train"))


def test_hash_includes_defaults_and_changes_with_any_parameter():
    base = {"model": {"config": "m.json"}, "dataset": {"reader": "digits"}}
    a = build_dataclass(ExtractConfig, base, Where(None, None, "x"))
    b = build_dataclass(ExtractConfig, base | {"seed": 0}, Where(None, None, "x"))  # the default, spelled out
    c = build_dataclass(ExtractConfig, base | {"seed": 1}, Where(None, None, "x"))
    assert stage_hash("extract", a, {}) == stage_hash("extract", b, {})
    assert stage_hash("extract", a, {}) != stage_hash("extract", c, {})
    assert stage_hash("extract", a, {"input": "h1"}) != stage_hash("extract", a, {"input": "h2"})


def test_duplicate_keys_and_bad_yaml_name_the_line(tmp_path):
    (tmp_path / "d.yaml").write_text("a: 1\nb: 2\na: 3\n")
    with pytest.raises(ConfigError, match="line 3: duplicate key 'a'"):
        load_yaml(tmp_path / "d.yaml")
    (tmp_path / "e.yaml").write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(ConfigError, match=r"e.yaml:\d+: invalid YAML"):
        load_yaml(tmp_path / "e.yaml")


def test_merge_keys_share_settings_and_a_written_key_overrides(tmp_path):
    """``<<: *anchor`` (how the workflow templates share a stage's settings): a key written
    beside the merge overrides the merged one; a key written twice is still a duplicate."""
    (tmp_path / "m.yaml").write_text(
        "a: &d {root: /data, split: train}\n"
        "b: {<<: *d, split: test}\n"
        "c:\n  <<: *d\n  split: val\n  split: test\n")
    with pytest.raises(ConfigError, match="line 6: duplicate key 'split'"):
        load_yaml(tmp_path / "m.yaml")
    (tmp_path / "m.yaml").write_text("a: &d {root: /data, split: train}\nb: {<<: *d, split: test}\n")
    doc = load_yaml(tmp_path / "m.yaml")
    assert doc["a"] == {"root": "/data", "split": "train"}
    assert doc["b"] == {"root": "/data", "split": "test"} and doc["b"].lines["split"] == 2
