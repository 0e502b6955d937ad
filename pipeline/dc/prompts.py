"""Prompt sets for text-conditional classification: which prompts stand for which class.

A prompt set is a list of (prompt, class index) rows, as in the official Diffusion
Classifier's ``prompts/<dataset>_prompts.csv`` files (columns ``prompt,classname,classidx``).
Several rows may name one class: every row is a *candidate* of the classifier, and a
class scores as its best prompt (the lowest error over its prompts); the winning row
maps to its class.

Where prompts come from (``ClassifyConfig.prompt`` / ``prompt_file``):

- a shipped published set by name (``cifar10``, ``pets``, ...), package data in
  ``pipeline/dc/prompt_sets/<name>.csv``, identical to the reference's files;
- a CSV file of the same form (``prompt_file``);
- a template containing ``{}``, or the name of a shipped template
  (``prompt_sets/templates.csv``), applied to the dataset reader's class names.

Shipped files are read with ``importlib.resources``, so an installed wheel has them.

May import: ``pipeline.errors``.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pipeline.errors import ConfigError, did_you_mean

#: Columns of a prompt-set CSV; ``classname`` is optional (checked against the dataset when present).
COLUMNS = ("prompt", "classname", "classidx")


def _package_dir():
    return resources.files("pipeline.dc") / "prompt_sets"


def shipped_sets() -> list[str]:
    """Names of the shipped published prompt sets (``prompt_sets/<name>.csv``)."""
    return sorted(p.name[:-4] for p in _package_dir().iterdir()
                  if p.name.endswith(".csv") and p.name != "templates.csv")


def shipped_templates() -> dict[str, str]:
    """Template name -> template string, from ``prompt_sets/templates.csv``."""
    rows = csv.DictReader(io.StringIO((_package_dir() / "templates.csv").read_text(encoding="utf-8")))
    return {row["name"]: row["template"] for row in rows}


@dataclass(frozen=True)
class PromptSet:
    """The classifier's text candidates.

    prompts : (P,) prompt strings, one per candidate.
    class_index : (P,) the class each prompt stands for (0-based dataset class index).
    source : where the rows came from (``shipped:cifar10.csv``, a file path, or ``template:...``).
    sha256 : digest of the source text, so a changed file is a changed configuration.
    csv_names : (P,) the ``classname`` column, if the source had one.
    """

    prompts: tuple[str, ...]
    class_index: tuple[int, ...]
    source: str
    sha256: str
    csv_names: tuple[str, ...] | None = None

    def by_class(self, n_classes: int) -> list[list[str]]:
        """Every class's prompts, in row order: ``out[c]`` lists the prompts of class ``c``."""
        out: list[list[str]] = [[] for _ in range(n_classes)]
        for prompt, c in zip(self.prompts, self.class_index):
            out[c].append(prompt)
        return out

    def check(self, class_names: Sequence[str]) -> list[str]:
        """Raise ``ConfigError`` unless every class has a prompt and every index is a class.

        Returns the rows whose ``classname`` differs from the dataset's name for that
        index (after lower-casing and treating ``_`` and ``/`` as spaces, and accepting
        any comma-separated synonym of the dataset's name), as ``"csv name" vs "dataset
        name"`` strings: rows are matched by index, so a difference is reported, not fatal.
        """
        k = len(class_names)
        outside = sorted({c for c in self.class_index if not 0 <= c < k})
        if outside:
            raise ConfigError(f"prompt set {self.source}: class indices {outside[:5]} are outside the "
                              f"dataset's {k} classes (0..{k - 1}); use the set made for this dataset")
        missing = sorted(set(range(k)) - set(self.class_index))
        if missing:
            names = ", ".join(repr(class_names[c]) for c in missing[:3])
            raise ConfigError(f"prompt set {self.source} has no prompt for {len(missing)} of the {k} classes "
                              f"(e.g. {names}); give every class at least one row")
        if self.csv_names is None:
            return []
        mismatches = []
        for name, c in zip(self.csv_names, self.class_index):
            ours = class_names[c]
            if _norm(name) not in {_norm(ours), *(_norm(s) for s in str(ours).split(","))}:
                mismatches.append(f"{name!r} vs {ours!r}")
        return mismatches


def _norm(name: str) -> str:
    return " ".join(str(name).lower().replace("_", " ").replace("/", " ").split())


def read_prompt_csv(text: str, source: str) -> PromptSet:
    """Parse a prompt-set CSV (header with ``prompt`` and ``classidx``; ``classname`` optional)."""
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    if "prompt" not in header or "classidx" not in header:
        raise ConfigError(f"prompt file {source}: the header must name the columns prompt and classidx "
                          f"(e.g. '{','.join(COLUMNS)}'); got {header}")
    prompts, index, names = [], [], []
    for line, row in enumerate(reader, start=2):
        prompt, idx = (row.get("prompt") or "").strip(), (row.get("classidx") or "").strip()
        if not prompt:
            raise ConfigError(f"prompt file {source}, line {line}: empty prompt")
        try:
            index.append(int(idx))
        except ValueError:
            raise ConfigError(f"prompt file {source}, line {line}: classidx {idx!r} is not "
                              "an integer") from None
        prompts.append(prompt)
        names.append(row.get("classname") or "")
    if not prompts:
        raise ConfigError(f"prompt file {source} has no rows")
    seen: dict[str, int] = {}
    for line, prompt in enumerate(prompts, start=2):
        if prompt in seen:
            raise ConfigError(f"prompt file {source}, line {line}: prompt {prompt!r} repeats line "
                              f"{seen[prompt]}; each prompt may appear once")
        seen[prompt] = line
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return PromptSet(tuple(prompts), tuple(index), source, digest,
                     tuple(names) if "classname" in header else None)


def from_template(template: str, class_names: Sequence[str], source: str | None = None) -> PromptSet:
    """One prompt per class: ``template.format(name)`` with underscores in names as spaces."""
    prompts = tuple(template.format(str(name).replace("_", " ")) for name in class_names)
    digest = hashlib.sha256(template.encode("utf-8")).hexdigest()
    return PromptSet(prompts, tuple(range(len(class_names))), source or f"template:{template}", digest)


def resolve(prompt: str | None, prompt_file: str | None) -> tuple[str, str]:
    """Where the prompts come from, before any dataset is read: ``(kind, value)``.

    kind ``shipped`` (value: set name), ``file`` (a CSV path) or ``template`` (a string
    with ``{}``). ``ConfigError`` names the valid choices for anything else.
    """
    if prompt is not None and prompt_file is not None:
        raise ConfigError("give 'prompt' (a shipped set or template) or 'prompt_file' (a CSV), not both")
    if prompt_file is not None:
        return "file", prompt_file
    if prompt is None:
        raise ConfigError("a text-conditional model needs 'prompt': a published set "
                          f"({', '.join(shipped_sets())}), a template such as 'a photo of a {{}}.', "
                          "or 'prompt_file: my_prompts.csv'")
    if "{}" in prompt:
        return "template", prompt
    if prompt in shipped_sets():
        return "shipped", prompt
    templates = shipped_templates()
    if prompt in templates:
        return "template", templates[prompt]
    choices = [*shipped_sets(), *templates]
    raise ConfigError(f"unknown prompt set {prompt!r}{did_you_mean(prompt, choices)}; valid: "
                      f"{', '.join(choices)}, a string containing '{{}}', or prompt_file: <csv>")


def source_digest(prompt: str | None, prompt_file: str | None) -> str | None:
    """sha256 of the text the prompts come from (for the stage hash); None if there are none."""
    if prompt is None and prompt_file is None:
        return None
    kind, value = resolve(prompt, prompt_file)
    if kind == "template":
        return hashlib.sha256(value.encode("utf-8")).hexdigest()
    return hashlib.sha256(_read(kind, value).encode("utf-8")).hexdigest()


def _read(kind: str, value: str) -> str:
    if kind == "shipped":
        return (_package_dir() / f"{value}.csv").read_text(encoding="utf-8")
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"prompt_file {value!r} does not exist; give a CSV with columns "
                          f"{','.join(COLUMNS)}")
    return path.read_text(encoding="utf-8")


def load_prompt_set(prompt: str | None, prompt_file: str | None, class_names: Sequence[str]) -> PromptSet:
    """The prompt set a classify stage uses for a dataset with ``class_names``, checked against it."""
    kind, value = resolve(prompt, prompt_file)
    if kind == "template":
        source = f"template:{prompt}" if prompt == value else f"template:{prompt} ({value})"
        out = from_template(value, class_names, source)
    else:
        out = read_prompt_csv(_read(kind, value), f"shipped:{value}.csv" if kind == "shipped" else value)
    out.check(class_names)
    return out
