"""Stages: one module per stage, and the one explicit registry (no plugin scanning)."""

from __future__ import annotations

from stages.cka import CKAStage
from stages.classify import ClassifyStage
from stages.extract import ExtractStage
from stages.report import ReportStage
from stages.pool import PoolStage
from stages.probe import ProbeStage

#: stage kind -> stage class.
STAGES = {
    "extract": ExtractStage,
    "report": ReportStage,
    "pool": PoolStage,
    "probe": ProbeStage,
    "cka": CKAStage,
    "classify": ClassifyStage,
}
