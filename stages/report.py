"""report: one self-contained HTML page stating a workflow's findings.

Inputs are earlier stages of any kind. The page (``<output>/index.html``, figures
embedded; see ``pipeline/report``) opens with the findings: the ``probe`` stage's
best cell chosen on validation with its test accuracy and a Wilson interval, the
same against the ``control`` (a random-init twin) and the ``baseline`` (e.g. a
probe on the raw pixels), each Diffusion Classifier's accuracy and cost, and the
CKA structure in a sentence. Figures and tables follow; the provenance and cost of
every input (hashes, seeds, wall times, versions, host) sit collapsed at the
bottom. ``findings.json`` beside the page holds the headline numbers as data.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import store
from pipeline.errors import ConfigError
from pipeline.store.location import zarr_store
from pipeline.workflow.stage import RunContext, Stage, input_field


@dataclass(frozen=True)
class ReportConfig:
    """inputs: the stages to report on, in page order. probe / control / baseline: probe stages
    the findings compare (default probe: the first probe in ``inputs``). title: page heading.
    confidence: level of the Wilson intervals. max_rows: rows of each probe's best-cells table."""

    inputs: tuple[str, ...] = input_field(default=())
    probe: str | None = input_field(default=None)
    control: str | None = input_field(default=None)
    baseline: str | None = input_field(default=None)
    title: str = "diffprobe report"
    confidence: float = 0.95
    max_rows: int = 10

    def __post_init__(self):
        if not 0.5 <= self.confidence < 1:
            raise ValueError(f"'confidence' must be in [0.5, 1), e.g. 0.95; got {self.confidence}")
        if self.max_rows < 1:
            raise ValueError(f"'max_rows' must be >= 1, got {self.max_rows}")
        roles = [r for r in (self.probe, self.control, self.baseline) if r is not None]
        if len(set(roles)) != len(roles):
            raise ValueError(f"probe, control and baseline must be different stages; got {roles}")


class ReportStage(Stage):
    kind = "report"
    Config = ReportConfig
    output_suffix = ""

    def run(self, cfg: ReportConfig, ctx: RunContext) -> None:
        import zarr

        from pipeline.report import build_report

        inputs = dict(zip(cfg.inputs, ctx.inputs.get("inputs", ()), strict=True))
        for role in ("probe", "control", "baseline"):
            name = getattr(cfg, role)
            if name is None:
                continue
            kind = (store.read_attrs(ctx.inputs[role]) or {}).get("stage")
            if kind != "probe":
                raise ConfigError(f"report: {role} {name!r} is a {kind} stage; give a probe stage")
            inputs.setdefault(name, ctx.inputs[role])
        page = build_report(inputs, ctx.output, title=cfg.title, probe=cfg.probe, control=cfg.control,
                            baseline=cfg.baseline, workflow=ctx.workflow.file, confidence=cfg.confidence,
                            max_rows=cfg.max_rows)
        # Stamp the folder like every output, so the runner can skip an up-to-date report.
        with store.quiet_zarr():
            root = zarr.open_group(zarr_store(ctx.output), mode="a", zarr_format=3)
            root.attrs[store.ATTR_KEY] = ctx.base_attrs() | {"complete": True, "page": str(page)}
        ctx.log(f"report: {page}")
