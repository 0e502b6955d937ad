"""Stages: one module per stage, and the one explicit registry (no plugin scanning)."""

from __future__ import annotations

from stages.extract import ExtractStage

#: stage kind -> stage class.
STAGES = {
    "extract": ExtractStage,
}
