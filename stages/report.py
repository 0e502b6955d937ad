"""report: one static HTML page + PNGs summarising a workflow's outputs.

Inputs are any earlier stages. For each, by the stage kind stamped in its attrs:
stores (extract, pool) get their inspect summary (shapes, completion, sizes,
compression, provenance); result folders (probe, cka, classify, ...) get every
CSV they hold as a table (best rows first where an ``accuracy`` / ``top1`` column
exists) and every PNG they hold, copied next to the page. The page is plain HTML
with no scripts, so it opens from a laptop or a cluster's file browser.
"""

from __future__ import annotations

import datetime
import html
import json
import io
from dataclasses import dataclass
from pathlib import Path

import pipeline
from pipeline import store
from pipeline.store.location import as_location, zarr_store
from pipeline.workflow.stage import RunContext, Stage, input_field

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
h1{border-bottom:2px solid #345}h2{margin-top:2em;color:#345}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:12px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#eef}img{max-width:100%;border:1px solid #ddd;margin:.5em 0}
.meta{color:#666;font-size:13px}
"""


@dataclass(frozen=True)
class ReportConfig:
    """inputs: the stages to report on, in page order. title: page heading. max_rows: rows per table."""

    inputs: tuple[str, ...] = input_field(default=())
    title: str = "diffprobe report"
    max_rows: int = 30


def _table(csv_path: Path, max_rows: int) -> str:
    import pandas as pd

    frame = pd.read_csv(io.StringIO(csv_path.read_text()))  # a URL's storage options stay in csv_path
    for key in ("accuracy", "top1", "test_top1"):
        if key in frame.columns:
            frame = frame.sort_values(key, ascending=False)
            break
    note = f"<p class=meta>{len(frame)} rows{'; best ' + str(max_rows) + ' shown' if len(frame) > max_rows else ''}</p>"
    return note + frame.head(max_rows).to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)


def build_report(inputs: dict[str, Path], output: Path, title: str, max_rows: int, attrs: dict) -> Path:
    """Write ``output/index.html`` (+ copied PNGs) for the given stage outputs; returns the page path."""
    from pipeline.store.describe import describe_store

    inputs = {name: as_location(path) for name, path in inputs.items()}
    output.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class=meta>diffprobe {pipeline.__version__}, written {datetime.datetime.now():%Y-%m-%d %H:%M}, "
             f"workflow {html.escape(str(attrs.get('workflow')))}</p>"]
    toc = []
    for name, path in inputs.items():
        sub = store.read_attrs(path) or {}
        kind = sub.get("stage", "?")
        anchor = f"s-{len(toc)}"
        toc.append(f"<li><a href='#{anchor}'>{html.escape(name)}</a> ({html.escape(kind)})</li>")
        parts.append(f"<h2 id='{anchor}'>{html.escape(name)} <small>({html.escape(kind)})</small></h2>")
        parts.append(f"<p class=meta>{html.escape(str(path))}; hash {html.escape(str(sub.get('stage_hash', ''))[:16])}"
                     f"; complete: {sub.get('complete')}</p>")
        if (path / "blocks").is_dir():
            parts.append(f"<pre>{html.escape(describe_store(path))}</pre>")
        for csv_path in sorted(path.rglob("*.csv")):
            parts.append(f"<h3>{html.escape(csv_path.name)}</h3>{_table(csv_path, max_rows)}")
        for png in sorted(path.rglob("*.png")):
            target = output / f"{name}-{png.name}"
            target.write_bytes(png.read_bytes())
            parts.append(f"<h3>{html.escape(png.stem)}</h3><img src='{html.escape(target.name)}' alt='{html.escape(png.stem)}'>")
        summary = sub.get("summary")
        if summary:
            parts.append(f"<pre>{html.escape(json.dumps(summary, indent=1, default=str))}</pre>")
    parts.insert(2, "<ul>" + "".join(toc) + "</ul>")
    page = output / "index.html"
    page.write_text(f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
                    f"<style>{CSS}</style>\n" + "\n".join(parts))
    return page


class ReportStage(Stage):
    kind = "report"
    Config = ReportConfig
    output_suffix = ""

    def run(self, cfg: ReportConfig, ctx: RunContext) -> None:
        import zarr

        inputs = ctx.inputs.get("inputs", ())
        names = cfg.inputs
        page = build_report(dict(zip(names, inputs, strict=True)), ctx.output, cfg.title, cfg.max_rows,
                            ctx.base_attrs())
        # Stamp the folder like every output, so the runner can skip an up-to-date report.
        with store.quiet_zarr():
            root = zarr.open_group(zarr_store(ctx.output), mode="a", zarr_format=3)
            root.attrs[store.ATTR_KEY] = ctx.base_attrs() | {"complete": True, "page": str(page)}
        ctx.log(f"report: {page}")
