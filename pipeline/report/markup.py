"""HTML pieces of the report: the stylesheet, number formats, linked numbers, tables, figures.

Every headline number is an ``<a class="num" data-key=... data-value=...>`` that links
to the section it comes from; ``data-value`` holds the unrounded fraction or count, so a
test (or a reader's script) can check the page against the stores. Accuracies are
always written by :func:`pct` (one decimal, a no-break space before ``%``).
"""

from __future__ import annotations

import html
from collections.abc import Mapping

import numpy as np

from pipeline.report import figures
from pipeline.report.findings import Cell

CSS = """
*{box-sizing:border-box}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1b1f24;margin:0 auto;max-width:980px;
padding:0 16px 3em;overflow-wrap:break-word}
h1{font-size:1.5em;margin:.8em 0 .2em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #d0d7de;
padding-bottom:.2em}h3{font-size:1.02em;margin:1.4em 0 .3em}
.meta,.caption{color:#57606a;font-size:.88em}
.findings{background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:.6em 1em .6em 2.2em}
.findings li{margin:.35em 0}
a.num{font-weight:600;color:#0550ae;text-decoration:none;border-bottom:1px dotted #0550ae;white-space:nowrap}
figure{margin:1em 0}figure img{display:block;width:100%;height:auto}
.panels{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,380px),1fr));gap:.6em 1em}
.panels img{display:block;width:100%;height:auto}
.legend{font-size:.88em;margin:.3em 0}.legend span{display:inline-block;margin-right:1.1em;white-space:nowrap}
.legend i{display:inline-block;width:22px;border-top:2.5px solid #1b1f24;vertical-align:middle;margin-right:.35em}
.legend i.dashed{border-top-style:dashed}.legend i.dotted{border-top:2.5px dotted #7f7f7f}
figcaption{color:#57606a;font-size:.88em;margin-top:.3em}
.table-wrap{max-width:100%;overflow-x:auto}
table{border-collapse:collapse;font-size:.9em;margin:.4em 0}
th,td{padding:3px 9px;border-bottom:1px solid #d8dee4;text-align:right;vertical-align:top;white-space:nowrap}
td.text{white-space:normal}
th{background:#f6f8fa;font-weight:600;white-space:normal}th:first-child,td:first-child{text-align:left}
td.text,th.text{text-align:left}
details{margin:.6em 0}summary{cursor:pointer;font-weight:600}
pre{background:#f6f8fa;padding:.7em;overflow-x:auto;font-size:12px;max-width:100%}
@media (max-width:600px){body{font-size:14px;padding:0 10px 2em}th,td{padding:2px 5px}
.findings{padding-left:1.6em}}
"""


def e(value) -> str:
    return html.escape(str(value))


def pct(fraction: float) -> str:
    """0.99443 -> '99.4 %' (a no-break space before %); the one format of every accuracy on the page."""
    return "n/a" if not np.isfinite(fraction) else f"{100 * fraction:.1f}\u00a0%"


def pct_range(low: float, high: float) -> str:
    """An interval as '96.4-99.2 %' (en dash)."""
    return f"{100 * low:.1f}\u2013{pct(high)}"


def points(delta: float) -> str:
    """A difference of two fractions in percentage points, signed."""
    if not np.isfinite(delta):
        return "n/a"
    return f"{100 * delta:+.1f} points".replace("-", "\u2212")  # a real minus sign


def num(text: str, key: str, value, section: str) -> str:
    return (f'<a class="num" href="#{e(section)}" data-key="{e(key)}" data-value="{e(value)}">'
            f"{e(text)}</a>")


def ci(cell_or_finding, confidence: float, key: str, section: str) -> str:
    low, high = cell_or_finding.interval(confidence)
    return (f"({100 * confidence:.0f}&nbsp;% CI {num(pct(low), key + '.low', low, section)}"
            f"&ndash;{num(pct(high), key + '.high', high, section)})")


def table(header: list[str] | None, rows: list[list[str]], text_columns: int = 1) -> str:
    """A table (cells are HTML already); the first ``text_columns`` columns are left-aligned text."""
    def cls(i: int) -> str:
        return " class=text" if i < text_columns else ""

    head = ("<thead><tr>" + "".join(f"<th{cls(i)}>{h}</th>" for i, h in enumerate(header)) + "</tr></thead>"
            if header else "")
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{v}</td>" for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f'<div class="table-wrap"><table>{head}<tbody>{body}</tbody></table></div>'


def img(drawing: figures.Drawing, alt: str) -> str:
    return f'<img src="{drawing.uri}" alt="{e(alt)}" style="max-width:{drawing.width_px}px">'


def figure(drawing: figures.Drawing, alt: str, caption: str, fig_id: str) -> str:
    return f'<figure id="{e(fig_id)}">{img(drawing, alt)}<figcaption>{caption}</figcaption></figure>'


def legend(blocks: list[str], labels: Mapping[str, str], control: bool, baseline: bool) -> str:
    """The timestep panels' shared legend, in HTML (readable at any width).

    Line styles are named only when a second style is drawn (a control or a baseline):
    with the solid lines alone, a black "trained" entry names nothing the colours do not.
    """
    items = [f'<span><i style="border-color:{figures.block_colour(i)}"></i>{e(b)}</span>'
             for i, b in enumerate(blocks)]
    if control or baseline:
        items.append(f'<span><i></i>{e(labels["trained"])}</span>')
    if control:
        items.append(f'<span><i class=dashed></i>{e(labels["control"])}</span>')
    if baseline:
        items.append(f'<span><i class=dotted></i>{e(labels["baseline"])}</span>')
    return f'<p class="legend">{"".join(items)}</p>'



def cell_text(cell: Cell) -> str:
    return e(f"{cell.block} · t={cell.timestep} · p{cell.pool} · {cell.head}")




class Page:
    """Collects the findings (top) and the sections (below) while the report is built."""

    def __init__(self, confidence: float):
        self.confidence = confidence
        self.findings: list[str] = []
        self.sections: list[str] = []
        self.toc: list[tuple[str, str]] = []

    def section(self, anchor: str, title: str, body: str) -> None:
        self.toc.append((anchor, title))
        self.sections.append(f'<section id="{e(anchor)}"><h2>{e(title)}</h2>{body}</section>')


def probe_anchor(name: str) -> str:
    return f"probe-{name}"
