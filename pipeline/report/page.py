"""The report page: findings first, figures, provenance collapsed at the bottom.

One HTML file with its figures embedded (SVG data URIs) and no scripts, so it opens
from a laptop, a cluster's file browser or a phone; ``findings.json`` beside it holds
the headline numbers as data.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from pathlib import Path

import pipeline
from pipeline.report import sections
from pipeline.report.findings import (
    CKAFinding,
    ClassifierFinding,
    ProbeFinding,
    cka_finding,
    classifier_finding,
    open_probe,
    probe_finding,
)
from pipeline.report.markup import CSS, Page, e
from pipeline.report.provenance import stage_record
from pipeline.store.location import as_location


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

    output = as_location(output)
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
        sections.probe_findings(page, found[probe], found.get(control), found.get(baseline), datasets)
        sections.probe_section(page, found[probe], found.get(control), found.get(baseline), datasets, labels, max_rows)
    for name in probes:
        if name not in (probe, control, baseline):
            page.section(f"section-{name}", f"Probe {name}",
                         sections.probe_table(found[name], datasets[name], "probe", confidence, max_rows))
    cka = [cka_finding(n, inputs[n]) for n, k in kinds.items() if k == "cka"]
    classifiers = [classifier_finding(n, inputs[n]) for n, k in kinds.items() if k == "classify"]
    if cka:
        sections.cka_section(page, cka)
    for f in classifiers:
        sections.classifier_section(page, f)
    sections.cka_findings(page, cka)
    records = [stage_record(n, p) for n, p in inputs.items()]
    page.toc.append(("provenance", "Provenance and cost"))

    toc = " · ".join(f'<a href="#{e(a)}">{e(t)}</a>' for a, t in page.toc)
    written = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    doc = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
        (f"<header><h1>{e(title)}</h1><p class=meta>diffprobe {e(pipeline.__version__)} · written {written}"
        f"{' · workflow ' + e(workflow.name) if workflow else ''} · {len(inputs)} stages</p>"
        f"<nav class=meta>{toc}</nav></header>"),
        '<section id="findings"><h2>Findings</h2><ul class="findings">' + "".join(page.findings)
        + "</ul></section>" if page.findings else "",
        *page.sections,
        '<section id="provenance"><h2>Provenance and cost</h2><details><summary>Stages, wall times, versions, '
        "host and store summaries</summary>" + sections.provenance_section(records, workflow) + "</details></section>",
        "</body></html>",
    ]
    path = output / "index.html"
    path.write_text("\n".join(doc))
    (output / "findings.json").write_text(json.dumps(findings_json(found, probe, control, baseline, classifiers,
                                                                    cka), indent=1, default=str) + "\n")
    return path


def findings_json(found: Mapping[str, ProbeFinding], probe, control, baseline,
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
