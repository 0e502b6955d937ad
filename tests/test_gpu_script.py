"""benchmarks/gpu/run.sh in its CPU smoke mode: the one GPU call must not be spent debugging.

Runs the same script the GPU machine runs (``--cpu-smoke``: toy widths, batch 2, one
dtype) and checks that every section of the JSON and the Markdown table has the
columns and the rows the GPU run will have, and that no row failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_check_cpu_smoke_writes_the_full_table(tmp_path):
    from check import COLUMNS, CPU_SMOKE

    env = os.environ | {"OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--cpu-smoke"], env=env,
                          capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu-check.json").read_text())
    assert result["mode"] == "cpu-smoke"
    sections = result["sections"]
    assert set(sections) == set(COLUMNS)
    n_extract = len(CPU_SMOKE.dtypes) * len(CPU_SMOKE.batches) * 2 * 3  # dtypes x batches x models x modes
    expected_rows = {"tests": 1, "extract": n_extract, "truncate": 6, "classify": 1, "variants": 6}
    for name, cols in COLUMNS.items():
        rows = sections[name]
        assert len(rows) == expected_rows[name], name
        for row in rows:
            assert not row.get("note", "").startswith("error"), (name, row)
            if "skipped" not in row.get("note", ""):
                assert set(cols) <= set(row), (name, set(cols) - set(row))
    tests = sections["tests"][0]
    assert tests["failed"] == 0 and tests["skipped"] >= 1  # the gpu tests are collected, and skip on CPU
    extract = {(r["model"], r["blocks"].split()[0]): r for r in sections["extract"]}
    assert extract[("adm256", "all")]["blocks"] == "all (13)" and extract[("sd15", "all")]["blocks"] == "all (9)"
    for row in sections["extract"]:
        assert row["ratio"] > 0 and row["sample_t"] > 0
    assert [r["paper"] for r in sections["truncate"]] == [4, 10, 16, 18, 19, 24]
    md = (tmp_path / "gpu-check.md").read_text()
    for name, cols in COLUMNS.items():
        assert f"## {name}" in md
        assert "| " + " | ".join(cols + ["note"]) + " |" in md
    assert (tmp_path / "gpu-tests.log").exists()
