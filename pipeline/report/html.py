"""The report page: findings first, figures, provenance collapsed at the bottom.

One HTML file with its figures embedded (SVG data URIs) and no scripts, so it opens
from a laptop, a cluster's file browser or a phone. Every headline number is an
``<a class="num" data-key=... data-value=...>`` linking to the section it comes
from; ``data-value`` holds the unrounded fraction or count, so a test (or a reader's
script) can check the page against the stores.
"""

from __future__ import annotations

import datetime
import html
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

import pipeline
from pipeline.report import figures
from pipeline.report.findings import (
    Cell,
    CKAFinding,
    ClassifierFinding,
    ProbeFinding,
    best_by_validation,
    cell_at,
    cka_finding,
    classifier_finding,
    fill,
    open_probe,
    probe_finding,
)
from pipeline.report.provenance import git_commit, host_description, package_versions, stage_record
from pipeline.store.describe import human_bytes

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


def _e(value) -> str:
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


def _num(text: str, key: str, value, section: str) -> str:
    return (f'<a class="num" href="#{_e(section)}" data-key="{_e(key)}" data-value="{_e(value)}">'
            f"{_e(text)}</a>")


def _ci(cell_or_finding, confidence: float, key: str, section: str) -> str:
    low, high = cell_or_finding.interval(confidence)
    return (f"({100 * confidence:.0f}&nbsp;% CI {_num(pct(low), key + '.low', low, section)}"
            f"&ndash;{_num(pct(high), key + '.high', high, section)})")


def _table(header: list[str] | None, rows: list[list[str]], text_columns: int = 1) -> str:
    """A table (cells are HTML already); the first ``text_columns`` columns are left-aligned text."""
    def cls(i: int) -> str:
        return " class=text" if i < text_columns else ""

    head = ("<thead><tr>" + "".join(f"<th{cls(i)}>{h}</th>" for i, h in enumerate(header)) + "</tr></thead>"
            if header else "")
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{v}</td>" for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f'<div class="table-wrap"><table>{head}<tbody>{body}</tbody></table></div>'


def _img(drawing: figures.Drawing, alt: str) -> str:
    return f'<img src="{drawing.uri}" alt="{_e(alt)}" style="max-width:{drawing.width_px}px">'


def _figure(drawing: figures.Drawing, alt: str, caption: str, fig_id: str) -> str:
    return f'<figure id="{_e(fig_id)}">{_img(drawing, alt)}<figcaption>{caption}</figcaption></figure>'


def _legend(blocks: list[str], labels: Mapping[str, str], control: bool, baseline: bool) -> str:
    """The timestep panels' shared legend, in HTML (readable at any width)."""
    items = [f'<span><i style="border-color:{figures.block_colour(i)}"></i>{_e(b)}</span>'
             for i, b in enumerate(blocks)]
    items.append(f'<span><i></i>{_e(labels["trained"])}</span>')
    if control:
        items.append(f'<span><i class=dashed></i>{_e(labels["control"])}</span>')
    if baseline:
        items.append(f'<span><i class=dotted></i>{_e(labels["baseline"])}</span>')
    return f'<p class="legend">{"".join(items)}</p>'



def _cell_text(cell: Cell) -> str:
    return _e(f"{cell.block} · t={cell.timestep} · p{cell.pool} · {cell.head}")


# ----------------------------------------------------------------- sections


class Page:
    """Collects the findings (top) and the sections (below) while the report is built."""

    def __init__(self, confidence: float):
        self.confidence = confidence
        self.findings: list[str] = []
        self.sections: list[str] = []
        self.toc: list[tuple[str, str]] = []

    def section(self, anchor: str, title: str, body: str) -> None:
        self.toc.append((anchor, title))
        self.sections.append(f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>{body}</section>')


def probe_anchor(name: str) -> str:
    return f"probe-{name}"


def _probe_findings(page: Page, main: ProbeFinding, control: ProbeFinding | None,
                    baseline: ProbeFinding | None, datasets: Mapping[str, object]) -> None:
    c = page.confidence
    best = main.best
    anchor = probe_anchor(main.name)
    tied = f"; {main.n_tied} cells tie on validation, the first in grid order is taken" if main.n_tied > 1 else ""
    page.findings.append(
        f'<li id="finding-best"><b>Best probe</b> ({_e(main.name)}, chosen on the validation split among '
        f"{main.n_cells} cells{tied}): <b>{_e(best.where())}</b>, validation "
        f"{_num(pct(best.val_accuracy), 'best.val', best.val_accuracy, anchor)}, test "
        f"{_num(pct(best.accuracy), 'best.test', best.accuracy, anchor)} "
        f"{_ci(best, c, 'best.ci', anchor)} on {best.n_test} test images.</li>")
    for role, other, what in (("control", control, "Random-init control"), ("baseline", baseline, "Baseline")):
        if other is None:
            continue
        o_anchor = probe_anchor(other.name)
        ob = other.best
        delta = best.accuracy - ob.accuracy
        b_low, b_high = best.interval(c)
        o_low, o_high = ob.interval(c)
        resolved = ("the intervals overlap, so this test set does not resolve the difference"
                    if b_low <= o_high and o_low <= b_high else "the intervals do not overlap")
        same = ""
        ds = datasets[other.name]
        if role == "control" and _has_cell(ds, best):
            at = cell_at(ds, best.block, best.timestep, best.pool, best.head)
            same = (f"; at the trained model's best cell it scores "
                    f"{_num(pct(at.accuracy), role + '.same_cell', at.accuracy, o_anchor)}")
        page.findings.append(
            f'<li id="finding-{role}"><b>{what}</b> ({_e(other.name)}): best on validation '
            f"{_e(ob.where())}, test {_num(pct(ob.accuracy), role + '.test', ob.accuracy, o_anchor)} "
            f"{_ci(ob, c, role + '.ci', o_anchor)}{same}. Best against best: {_e(main.name)} minus "
            f"{_e(other.name)} = {_num(points(delta), role + '.delta', delta, anchor)}; {resolved}.</li>")


def _has_cell(ds, cell: Cell) -> bool:
    coords = {"block": cell.block, "timestep": cell.timestep, "pool": cell.pool, "head": cell.head}
    return all(v in ds[k].values for k, v in coords.items())


def _probe_section(page: Page, main: ProbeFinding, control: ProbeFinding | None, baseline: ProbeFinding | None,
                   datasets: Mapping[str, object], labels: Mapping[str, str], max_rows: int) -> None:
    c = page.confidence
    trained = datasets[main.name]
    control_ds = datasets[control.name] if control else None
    heads = [str(h) for h in trained["head"].values]
    head_best = {h: best_by_validation(trained, head=h)[0] for h in heads}
    baseline_best = ({h: best_by_validation(datasets[baseline.name], head=h)[0]
                      for h in heads if h in datasets[baseline.name]["head"].values} if baseline else None)
    pools = {h: cell.pool for h, cell in head_best.items()}
    panels = figures.timestep_panels(trained, control_ds, baseline_best, pools)
    body = [
        '<figure id="fig-timesteps"><div class="panels">'
        + "".join(_img(d, f"{h} head: test accuracy against timestep") for h, d in panels.items()) + "</div>"
        + _legend([str(b) for b in trained["block"].values], labels, control is not None, baseline is not None)
        + "<figcaption>Test accuracy against timestep, one line per block, one panel per head at the pool size "
        "of that head's best cell on validation; "
        + ("the random-init control dashed in the same colour; " if control else "")
        + ("the raw-pixel probe's best cell for that head dotted grey; " if baseline else "")
        + "one accuracy axis for every panel.</figcaption></figure>"]
    best = main.best
    rows = []
    for h in heads:
        series = []
        if np.isfinite(trained["val_accuracy"].sel(block=best.block, timestep=best.timestep, head=h)).any():
            cell, _ = best_by_validation(trained, block=best.block, timestep=best.timestep, head=h)
            series.append(("trained", cell))
            if control_ds is not None and _has_cell(control_ds, cell):
                series.append(("control", cell_at(control_ds, cell.block, cell.timestep, cell.pool, h)))
        if baseline_best and h in baseline_best:
            series.append(("baseline", baseline_best[h]))
        if series:
            rows.append((f"{h} (p{series[0][1].pool})", series))
    body.append(_figure(
        figures.cell_comparison(rows, c, labels),
        "test accuracy of every head at the best block and timestep",
        f"Every head at the best cell's block and timestep ({_e(best.block)}, t={best.timestep}; each head at "
        f"its best pool on validation), with {100 * c:.0f} % Wilson intervals over {best.n_test} test images"
        f"{'; the control at the same cell' if control else ''}"
        f"{'; the raw-pixel probe at its own best cell for that head' if baseline else ''}.", "fig-heads"))
    page.section("probes", "Probes", "".join(body))
    role_words = {"trained": "the probe", "control": "control", "baseline": "baseline"}
    for finding, role in ((main, "trained"), (control, "control"), (baseline, "baseline")):
        if finding is not None:
            page.sections[-1] += _probe_table(finding, datasets[finding.name], role_words[role], c, max_rows)


def _probe_table(finding: ProbeFinding, ds, label: str, confidence: float, max_rows: int) -> str:
    val = ds["val_accuracy"].transpose("block", "timestep", "pool", "head").values
    order = [i for i in np.lexsort((np.arange(val.size), -np.nan_to_num(val.ravel(), nan=-1.0)))
             if np.isfinite(val.flat[i])][:max_rows]
    rows = []
    for flat in order:
        b, t, p, h = np.unravel_index(flat, val.shape)
        cell = cell_at(ds, ds["block"].values[b], ds["timestep"].values[t], ds["pool"].values[p],
                       ds["head"].values[h])
        low, high = cell.interval(confidence)
        rows.append([_cell_text(cell), pct(cell.val_accuracy), pct(cell.accuracy), pct_range(low, high)])
    n = int(np.isfinite(val).sum())
    return (f'<h3 id="{_e(probe_anchor(finding.name))}">{_e(finding.name)} ({_e(label)}): best {len(rows)} of {n} '
            f"cells on validation</h3>"
            + _table(["cell (block · t · pool · head)", "validation", "test", f"test {100 * confidence:.0f} % CI"], rows)
            + f'<p class="caption">Ranked by validation accuracy (ties in grid order); the test column is never '
              f"used to choose. {finding.best.n_test} test images.</p>")


def _cka_sentence(f: CKAFinding) -> str:
    """The finding's sentence with each number a link to its heatmap."""
    anchor = f"cka-{f.name}"
    links = {k: _num(f"{v:.2f}", f"cka.{f.name}.{k}", v, anchor) for k, v in f.numbers.items()}
    return fill(_e(f.template), links)


def _cka_section(page: Page, findings: list[CKAFinding]) -> None:
    body = [('<p class="caption">Every heatmap uses the same 0-1 colour scale; white lines separate blocks '
            "(and models).</p>")]
    for f in findings:
        body.append(f'<h3 id="cka-{_e(f.name)}">{_e(f.name)} ({_e(f.mode)})</h3><p>{_cka_sentence(f)}</p>')
        body.append(_figure(figures.cka_heatmap(f.matrix, f.name), f"CKA matrix of {f.name}",
                            f"{_e(f.name)}: {f.matrix.shape[0]} x {f.matrix.shape[1]} representations, "
                            f"{_e(f.estimator)} CKA.", f"fig-cka-{f.name}"))
    page.section("cka", "Representation similarity (CKA)", "".join(body))


def _cka_findings(page: Page, findings: list[CKAFinding]) -> None:
    if not findings:
        return
    chosen = next((f for f in findings if f.mode == "within"), findings[0])
    page.findings.append(f'<li id="finding-cka"><b>CKA</b> ({_e(chosen.name)}): {_cka_sentence(chosen)}</li>')


def _classifier_parts(page: Page, f: ClassifierFinding) -> None:
    c = page.confidence
    anchor = f"classify-{f.name}"
    saving = 1 - f.passes_per_image / f.exhaustive_per_image if f.exhaustive_per_image else float("nan")
    kind = f.schedule.get("kind", "exhaustive")
    page.findings.append(
        f'<li id="finding-classify-{_e(f.name)}"><b>Diffusion Classifier</b> ({_e(f.name)}): accuracy '
        f"{_num(pct(f.accuracy), 'classify.accuracy', f.accuracy, anchor)} {_ci(f, c, 'classify.ci', anchor)} "
        f"on {_num(str(f.n_images), 'classify.n_images', f.n_images, anchor)} images, "
        f"{_num(f'{f.passes_per_image:.0f}', 'classify.passes_per_image', f.passes_per_image, anchor)} forward "
        f"passes per image ({_e(kind)}); exhaustive ({f.n_classes} classes x {f.n_trials} trials) would be "
        f"{_num(str(f.exhaustive_per_image), 'classify.exhaustive_per_image', f.exhaustive_per_image, anchor)}"
        f"{', ' + _num(f'{100 * saving:.0f} %', 'classify.saving', saving, anchor) + ' fewer' if saving > 0 else ''}"
        ".</li>")
    low, high = f.interval(c)
    stats = [
        ["accuracy", f"{pct(f.accuracy)} ({f.correct} of {f.n_images})"],
        [f"{100 * c:.0f} % Wilson interval", pct_range(low, high)],
        ["unreadable images (excluded)", str(f.n_failed)],
        ["schedule", _e(f"{kind}: n_samples {f.schedule.get('n_samples')}, to_keep {f.schedule.get('to_keep')}")],
        ["loss", _e(f.loss)],
        ["forward passes per image", f"{f.passes_per_image:.1f} (exhaustive: {f.exhaustive_per_image})"],
    ]
    curve_rows = [[_e(p.label), f"{p.passes_per_image:.0f}", pct(p.accuracy)] for p in f.curve]
    body = (_table(None, stats)
            + _figure(figures.confusion_matrix(f.confusion, f.class_names, f"{f.name}: {pct(f.accuracy)}"),
                      "confusion matrix", "Confusion matrix: rows are the true class, colour the share of it "
                      "(0-100 %), numbers the images.", f"fig-confusion-{f.name}")
            + _figure(figures.accuracy_vs_passes(f.curve, f.exhaustive_per_image, f.n_trials),
                      "accuracy against forward passes per image",
                      "Accuracy against cost: the first elimination stage's trials (every class was evaluated on "
                      "them) re-scored exhaustively with k of them, from the cached errors; the star is the run "
                      "as it was.", f"fig-passes-{f.name}")
            + _table(["scoring", "passes / image", "accuracy"], curve_rows))
    page.section(anchor, f"Diffusion Classifier: {f.name}", body)


def _provenance(records, workflow: Path | None) -> str:
    rows = []
    for r in records:
        wall = f"{r.wall_time_s:.1f} s" if r.wall_time_s is not None else "not recorded"
        rows.append([f'<a href="#stage-{_e(r.name)}">{_e(r.name)}</a>', _e(r.kind), wall, human_bytes(r.bytes_on_disk),
                     "yes" if r.complete else "<b>NO</b>", f"<code>{_e(r.stage_hash[:12])}</code>",
                     _e(r.seed if r.seed is not None else "")])
    timed = [r.wall_time_s for r in records if r.wall_time_s is not None]
    total = (f"{sum(timed):.0f} s over the {len(timed)} stage(s) that recorded one (the run that completed each)"
             if timed else "not recorded (outputs written before diffprobe stamped wall_time_s)")
    env = [[_e(k), _e(v)] for k, v in package_versions().items()]
    env.append(["git commit", _e(git_commit(workflow.parent if workflow else Path.cwd()))])
    env += [[_e(k), _e(v)] for k, v in host_description().items()]
    devices = sorted({r.device for r in records if r.device})
    env.append(["device(s)", _e(", ".join(devices) or "n/a")])
    if workflow:
        env.append(["workflow", _e(workflow)])
    details = "".join(
        f'<details id="stage-{_e(r.name)}"><summary>{_e(r.name)} ({_e(r.kind)})</summary>'
        f"<pre>{_e(r.summary)}</pre></details>" for r in records)
    return (f"<p>Wall time of the stages on this page: {total}.</p>"
            + _table(["stage", "kind", "wall time", "on disk", "complete", "hash", "seed"], rows, text_columns=2)
            + "<h3>Environment</h3>" + _table(None, env, text_columns=2) + "<h3>Store summaries</h3>" + details)


# ----------------------------------------------------------------- the page


def build_report(inputs: Mapping[str, Path], output: Path, *, title: str = "diffprobe report",
                 probe: str | None = None, control: str | None = None, baseline: str | None = None,
                 workflow: Path | None = None, confidence: float = 0.95, max_rows: int = 10,
                 labels: Mapping[str, str] | None = None) -> Path:
    """Write ``output/index.html`` for the given stage outputs; returns the page's path.

    Parameters
    ----------
    inputs : stage name -> output path, in page order (every kind: extract, pool, probe, cka, classify).
    probe, control, baseline : names (in ``inputs``) of the probe stage the findings are about, its
        random-init control and its baseline (e.g. raw pixels); default probe: the first probe input.
    confidence : level of the Wilson intervals.
    labels : legend names for ``trained``, ``control``, ``baseline``.
    """
    from pipeline import store

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    kinds = {name: (store.read_attrs(path) or {}).get("stage", "?") for name, path in inputs.items()}
    probes = [n for n, k in kinds.items() if k == "probe"]
    probe = probe or (probes[0] if probes else None)
    labels = {"trained": probe or "trained", "control": f"{control} (control)" if control else "control",
              "baseline": f"{baseline} (baseline)" if baseline else "baseline", **(labels or {})}
    page = Page(confidence)

    datasets = {n: open_probe(inputs[n]) for n in probes}
    found = {n: probe_finding(n, inputs[n]) for n in probes}
    if probe:
        _probe_findings(page, found[probe], found.get(control), found.get(baseline), datasets)
        _probe_section(page, found[probe], found.get(control), found.get(baseline), datasets, labels, max_rows)
    for name in probes:
        if name not in (probe, control, baseline):
            page.section(f"section-{name}", f"Probe {name}",
                         _probe_table(found[name], datasets[name], "probe", confidence, max_rows))
    cka = [cka_finding(n, inputs[n]) for n, k in kinds.items() if k == "cka"]
    classifiers = [classifier_finding(n, inputs[n]) for n, k in kinds.items() if k == "classify"]
    if cka:
        _cka_section(page, cka)
    for f in classifiers:
        _classifier_parts(page, f)
    _cka_findings(page, cka)
    records = [stage_record(n, p) for n, p in inputs.items()]
    page.toc.append(("provenance", "Provenance and cost"))

    toc = " · ".join(f'<a href="#{_e(a)}">{_e(t)}</a>' for a, t in page.toc)
    written = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    doc = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        (f"<header><h1>{_e(title)}</h1><p class=meta>diffprobe {_e(pipeline.__version__)} · written {written}"
        f"{' · workflow ' + _e(workflow.name) if workflow else ''} · {len(inputs)} stages</p>"
        f"<nav class=meta>{toc}</nav></header>"),
        '<section id="findings"><h2>Findings</h2><ul class="findings">' + "".join(page.findings)
        + "</ul></section>" if page.findings else "",
        *page.sections,
        '<section id="provenance"><h2>Provenance and cost</h2><details><summary>Stages, wall times, versions, '
        "host and store summaries</summary>" + _provenance(records, workflow) + "</details></section>",
        "</body></html>",
    ]
    path = output / "index.html"
    path.write_text("\n".join(doc))
    (output / "findings.json").write_text(json.dumps(_findings_json(found, probe, control, baseline, classifiers,
                                                                    cka), indent=1, default=str) + "\n")
    return path


def _findings_json(found: Mapping[str, ProbeFinding], probe, control, baseline,
                   classifiers: list[ClassifierFinding], cka: list[CKAFinding]) -> dict:
    """The headline numbers as data, beside the page (for scripts and tests)."""
    out: dict = {"probes": {}, "classify": {}, "cka": {}}
    for name, f in found.items():
        role = {probe: "probe", control: "control", baseline: "baseline"}.get(name, "other")
        out["probes"][name] = {"role": role, "best": vars(f.best), "n_tied": f.n_tied, "n_cells": f.n_cells}
    for f in classifiers:
        out["classify"][f.name] = {"accuracy": f.accuracy, "n_images": f.n_images,
                                   "passes_per_image": f.passes_per_image,
                                   "exhaustive_per_image": f.exhaustive_per_image}
    for f in cka:
        out["cka"][f.name] = {"mode": f.mode, "sentence": f.sentence,
                              "numbers": dict(f.numbers)}
    return out
