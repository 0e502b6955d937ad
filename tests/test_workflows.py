"""Every shipped workflow validates (paths need not exist until the stage runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.workflow.config import load_workflow
from stages import STAGES

WORKFLOWS = sorted((Path(__file__).resolve().parent.parent / "workflows").glob("*.yaml"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_shipped_workflow_validates(path):
    wf = load_workflow(path, STAGES)
    assert wf.stages
    for entry in wf.stages:
        assert entry.output.is_absolute()
