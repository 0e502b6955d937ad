"""Parsers for the annotation file formats the dataset readers share.

Whitespace tables (``<id> <value ...>`` lines, CUB / NABirds / Aircraft / Pets),
MATLAB ``.mat`` files (Cars, Flowers, Dogs, the ImageNet devkit) and reader options.
Every failure is a ``DatasetError`` naming the file (and line) so that a user with a
damaged download knows which file to replace.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pipeline.datasets.files import open_binary, open_text
from pipeline.errors import DatasetError, did_you_mean


def read_rows(path: Path, min_fields: int, max_split: int = -1) -> list[list[str]]:
    """Rows of a whitespace-separated text file, skipping blank and ``#`` lines.

    max_split: split each line at most this many times (so the last field may hold
    spaces, e.g. an Aircraft variant name); -1 splits on every run of whitespace.
    """
    rows = []
    with open_text(path) as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split(None, max_split) if max_split >= 0 else line.split()
            if len(fields) < min_fields:
                raise DatasetError(
                    f"{path}: line {number} has {len(fields)} field(s), expected at least {min_fields}: {line[:80]!r}"
                )
            rows.append(fields)
    return rows


def read_lines(path: Path) -> list[str]:
    """Non-blank lines of a text file, stripped (class-name lists)."""
    with open_text(path) as f:
        return [line.strip() for line in f if line.strip()]


def read_id_map(path: Path, convert=str) -> dict[str, object]:
    """``<id> <value>`` lines as {id: convert(value)}; the value may contain spaces."""
    out = {}
    for fields in read_rows(path, 2, max_split=1):
        try:
            out[fields[0]] = convert(fields[1])
        except ValueError:
            raise DatasetError(f"{path}: bad value {fields[1]!r} for id {fields[0]!r}") from None
    return out


def load_mat(path: Path) -> dict:
    """Load a MATLAB file with structs as records and singleton dimensions squeezed."""
    import scipy.io

    try:
        with open_binary(path) as f:
            return scipy.io.loadmat(f, squeeze_me=True, struct_as_record=True)
    except Exception as exc:  # scipy raises ValueError, TypeError, OSError... for damaged files
        raise DatasetError(f"cannot read MATLAB file {str(path)!r} ({type(exc).__name__}: {exc}); re-download it") from None


def mat_key(mat: Mapping, key: str, path: Path):
    if key not in mat:
        found = ", ".join(k for k in mat if not k.startswith("__"))
        raise DatasetError(f"{path}: no variable {key!r} (found: {found or 'none'})")
    return mat[key]


def mat_strings(value) -> list[str]:
    """A MATLAB cell array of strings (any shape, after squeeze) as a list of str."""
    out = []
    for v in np.atleast_1d(value).reshape(-1):
        if np.ndim(v):  # a nested cell, or an empty string that loadmat keeps as an empty array
            flat = np.asarray(v).reshape(-1)
            v = flat[0] if flat.size else ""
        out.append(str(v))
    return out


def mat_ints(value) -> list[int]:
    return [int(v) for v in np.atleast_1d(value).reshape(-1)]


def mat_struct_rows(value, fields: Sequence[str], path: Path) -> list[dict]:
    """A MATLAB struct array as one dict per element, holding the requested fields."""
    records = np.atleast_1d(value).reshape(-1)
    names = records.dtype.names or ()
    missing = [f for f in fields if f not in names]
    if missing:
        raise DatasetError(f"{path}: struct lacks field(s) {', '.join(missing)} (has: {', '.join(names)})")
    rows = []
    for item in records:
        row = {}
        for f in fields:
            v = item[f]
            row[f] = v.item() if isinstance(v, np.ndarray) and v.size == 1 else v
        rows.append(row)
    return rows


def check_options(reader: str, options: Mapping, allowed: Mapping[str, Sequence | None]) -> None:
    """Reject unknown option names, and values outside ``allowed[name]`` when it is a list."""
    for key, value in options.items():
        if key not in allowed:
            valid = ", ".join(sorted(allowed)) or "none"
            raise DatasetError(f"{reader}: unknown option {key!r}{did_you_mean(key, allowed)}; valid: {valid}")
        choices = allowed[key]
        if choices is not None and value not in choices:
            raise DatasetError(
                f"{reader}: option {key}={value!r} is not one of {', '.join(map(str, choices))}"
            )


def readable(name: str) -> str:
    """Folder-style class name as prose: ``Japanese_spaniel`` -> ``Japanese spaniel``."""
    return name.replace("_", " ").strip()


def xywh_to_box(x: float, y: float, w: float, h: float) -> tuple[float, float, float, float]:
    return (float(x), float(y), float(x) + float(w), float(y) + float(h))


def matlab_box(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float, float, float]:
    """A 1-based inclusive pixel box (MATLAB convention) as 0-based ``(x0, y0, x1, y1)`` edges."""
    return (float(x1) - 1.0, float(y1) - 1.0, float(x2), float(y2))
