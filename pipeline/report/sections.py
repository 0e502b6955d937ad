"""The report's sections: what each kind of stage output contributes to the page.

Each function adds findings (the list at the top) and/or a section to a
:class:`~pipeline.report.markup.Page`: the probes (figures and best-cell tables), CKA,
the Diffusion Classifier, and the collapsed provenance and cost.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pipeline.report import figures
from pipeline.report.findings import (
    Cell,
    CKAFinding,
    ClassifierFinding,
    ProbeFinding,
    best_by_validation,
    cell_at,
    fill,
)
from pipeline.report.markup import (
    Page,
    cell_text,
    ci,
    e,
    figure,
    img,
    legend,
    num,
    pct,
    pct_range,
    points,
    probe_anchor,
    table,
)
from pipeline.report.provenance import git_commit, host_description, package_versions
from pipeline.store.describe import human_bytes


def probe_findings(page: Page, main: ProbeFinding, control: ProbeFinding | None,
                    baseline: ProbeFinding | None, datasets: Mapping[str, object]) -> None:
    c = page.confidence
    best = main.best
    anchor = probe_anchor(main.name)
    tied = f"; {main.n_tied} cells tie on validation, the first in grid order is taken" if main.n_tied > 1 else ""
    page.findings.append(
        f'<li id="finding-best"><b>Best probe</b> ({e(main.name)}, chosen on the validation split among '
        f"{main.n_cells} cells{tied}): <b>{e(best.where())}</b>, validation "
        f"{num(pct(best.val_accuracy), 'best.val', best.val_accuracy, anchor)}, test "
        f"{num(pct(best.accuracy), 'best.test', best.accuracy, anchor)} "
        f"{ci(best, c, 'best.ci', anchor)} on {best.n_test} test images.</li>")
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
        if role == "control" and has_cell(ds, best):
            at = cell_at(ds, best.block, best.timestep, best.pool, best.head)
            same = (f"; at the trained model's best cell it scores "
                    f"{num(pct(at.accuracy), role + '.same_cell', at.accuracy, o_anchor)}")
        page.findings.append(
            f'<li id="finding-{role}"><b>{what}</b> ({e(other.name)}): best on validation '
            f"{e(ob.where())}, test {num(pct(ob.accuracy), role + '.test', ob.accuracy, o_anchor)} "
            f"{ci(ob, c, role + '.ci', o_anchor)}{same}. Best against best: {e(main.name)} minus "
            f"{e(other.name)} = {num(points(delta), role + '.delta', delta, anchor)}; {resolved}.</li>")


def has_cell(ds, cell: Cell) -> bool:
    coords = {"block": cell.block, "timestep": cell.timestep, "pool": cell.pool, "head": cell.head}
    return all(v in ds[k].values for k, v in coords.items())


def probe_section(page: Page, main: ProbeFinding, control: ProbeFinding | None, baseline: ProbeFinding | None,
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
        + "".join(img(d, f"{h} head: test accuracy against timestep") for h, d in panels.items()) + "</div>"
        + legend([str(b) for b in trained["block"].values], labels, control is not None, baseline is not None)
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
            if control_ds is not None and has_cell(control_ds, cell):
                series.append(("control", cell_at(control_ds, cell.block, cell.timestep, cell.pool, h)))
        if baseline_best and h in baseline_best:
            series.append(("baseline", baseline_best[h]))
        if series:
            rows.append((f"{h} (p{series[0][1].pool})", series))
    body.append(figure(
        figures.cell_comparison(rows, c, labels),
        "test accuracy of every head at the best block and timestep",
        f"Every head at the best cell's block and timestep ({e(best.block)}, t={best.timestep}; each head at "
        f"its best pool on validation), with {100 * c:.0f} % Wilson intervals over {best.n_test} test images"
        f"{'; the control at the same cell' if control else ''}"
        f"{'; the raw-pixel probe at its own best cell for that head' if baseline else ''}.", "fig-heads"))
    page.section("probes", "Probes", "".join(body))
    role_words = {"trained": "the probe", "control": "control", "baseline": "baseline"}
    for finding, role in ((main, "trained"), (control, "control"), (baseline, "baseline")):
        if finding is not None:
            page.sections[-1] += probe_table(finding, datasets[finding.name], role_words[role], c, max_rows)


def probe_table(finding: ProbeFinding, ds, label: str, confidence: float, max_rows: int) -> str:
    val = ds["val_accuracy"].transpose("block", "timestep", "pool", "head").values
    order = [i for i in np.lexsort((np.arange(val.size), -np.nan_to_num(val.ravel(), nan=-1.0)))
             if np.isfinite(val.flat[i])][:max_rows]
    rows = []
    for flat in order:
        b, t, p, h = np.unravel_index(flat, val.shape)
        cell = cell_at(ds, ds["block"].values[b], ds["timestep"].values[t], ds["pool"].values[p],
                       ds["head"].values[h])
        low, high = cell.interval(confidence)
        rows.append([cell_text(cell), pct(cell.val_accuracy), pct(cell.accuracy), pct_range(low, high)])
    n = int(np.isfinite(val).sum())
    return (f'<h3 id="{e(probe_anchor(finding.name))}">{e(finding.name)} ({e(label)}): best {len(rows)} of {n} '
            f"cells on validation</h3>"
            + table(["cell (block · t · pool · head)", "validation", "test", f"test {100 * confidence:.0f} % CI"], rows)
            + f'<p class="caption">Ranked by validation accuracy (ties in grid order); the test column is never '
              f"used to choose. {finding.best.n_test} test images.</p>")


def cka_sentence(f: CKAFinding) -> str:
    """The finding's sentence with each number a link to its heatmap."""
    anchor = f"cka-{f.name}"
    links = {k: num(f"{v:.2f}", f"cka.{f.name}.{k}", v, anchor) for k, v in f.numbers.items()}
    return fill(e(f.template), links)


def cka_section(page: Page, findings: list[CKAFinding]) -> None:
    body = [('<p class="caption">Every heatmap uses the same 0-1 colour scale; white lines separate blocks '
            "(and models).</p>")]
    for f in findings:
        body.append(f'<h3 id="cka-{e(f.name)}">{e(f.name)} ({e(f.mode)})</h3><p>{cka_sentence(f)}</p>')
        body.append(figure(figures.cka_heatmap(f.matrix, f.name), f"CKA matrix of {f.name}",
                            f"{e(f.name)}: {f.matrix.shape[0]} x {f.matrix.shape[1]} representations, "
                            f"{e(f.estimator)} CKA.", f"fig-cka-{f.name}"))
    page.section("cka", "Representation similarity (CKA)", "".join(body))


def cka_findings(page: Page, findings: list[CKAFinding]) -> None:
    if not findings:
        return
    chosen = next((f for f in findings if f.mode == "within"), findings[0])
    page.findings.append(f'<li id="finding-cka"><b>CKA</b> ({e(chosen.name)}): {cka_sentence(chosen)}</li>')


def _candidates(f: ClassifierFinding) -> str:
    if f.n_candidates == f.n_classes:
        return f"{f.n_classes} classes"
    return f"{f.n_candidates} prompts for {f.n_classes} classes"


def classifier_section(page: Page, f: ClassifierFinding) -> None:
    c = page.confidence
    anchor = f"classify-{f.name}"
    saving = 1 - f.passes_per_image / f.exhaustive_per_image if f.exhaustive_per_image else float("nan")
    kind = f.schedule.get("kind", "exhaustive")
    page.findings.append(
        f'<li id="finding-classify-{e(f.name)}"><b>Diffusion Classifier</b> ({e(f.name)}): accuracy '
        f"{num(pct(f.accuracy), 'classify.accuracy', f.accuracy, anchor)} {ci(f, c, 'classify.ci', anchor)} "
        f"on {num(str(f.n_images), 'classify.n_images', f.n_images, anchor)} images, "
        f"{num(f'{f.passes_per_image:.0f}', 'classify.passes_per_image', f.passes_per_image, anchor)} forward "
        f"passes per image ({e(kind)}); exhaustive ({_candidates(f)} x {f.n_trials} trials) would be "
        f"{num(str(f.exhaustive_per_image), 'classify.exhaustive_per_image', f.exhaustive_per_image, anchor)}"
        f"{', ' + num(f'{100 * saving:.0f} %', 'classify.saving', saving, anchor) + ' fewer' if saving > 0 else ''}"
        ".</li>")
    low, high = f.interval(c)
    stats = [
        ["accuracy", f"{pct(f.accuracy)} ({f.correct} of {f.n_images})"],
        [f"{100 * c:.0f} % Wilson interval", pct_range(low, high)],
        ["unreadable images (excluded)", str(f.n_failed)],
        ["schedule", e(f"{kind}: timesteps_per_round {f.schedule.get('timesteps_per_round')}, "
                       f"keep_per_round {f.schedule.get('keep_per_round')}")],
        ["loss", e(f.loss)],
        ["forward passes per image", f"{f.passes_per_image:.1f} (exhaustive: {f.exhaustive_per_image})"],
    ]
    curve_rows = [[e(p.label), f"{p.passes_per_image:.0f}", pct(p.accuracy)] for p in f.curve]
    body = (table(None, stats)
            + figure(figures.confusion_matrix(f.confusion, f.class_names, f"{f.name}: {pct(f.accuracy)}"),
                      "confusion matrix", "Confusion matrix: rows are the true class, colour the share of it "
                      "(0-100 %), numbers the images.", f"fig-confusion-{f.name}")
            + figure(figures.accuracy_vs_passes(f.curve, f.exhaustive_per_image, f.n_trials),
                      "accuracy against forward passes per image",
                      "Accuracy against cost: the first elimination round's trials (every candidate was evaluated "
                      "on them) re-scored exhaustively with k of them, from the cached errors; the star is the run "
                      "as it was.", f"fig-passes-{f.name}")
            + table(["scoring", "passes / image", "accuracy"], curve_rows))
    page.section(anchor, f"Diffusion Classifier: {f.name}", body)


def provenance_section(records, workflow: Path | None) -> str:
    rows = []
    for r in records:
        wall = f"{r.wall_time_s:.1f} s" if r.wall_time_s is not None else "not recorded"
        rows.append([f'<a href="#stage-{e(r.name)}">{e(r.name)}</a>', e(r.kind), wall, human_bytes(r.bytes_on_disk),
                     "yes" if r.complete else "<b>NO</b>", f"<code>{e(r.stage_hash[:12])}</code>",
                     e(r.seed if r.seed is not None else "")])
    timed = [r.wall_time_s for r in records if r.wall_time_s is not None]
    total = (f"{sum(timed):.0f} s over the {len(timed)} stage(s) that recorded one (the run that completed each)"
             if timed else "not recorded (outputs written before diffprobe stamped wall_time_s)")
    env = [[e(k), e(v)] for k, v in package_versions().items()]
    env.append(["git commit", e(git_commit(workflow.parent if workflow else Path.cwd()))])
    env += [[e(k), e(v)] for k, v in host_description().items()]
    devices = sorted({r.device for r in records if r.device})
    env.append(["device(s)", e(", ".join(devices) or "n/a")])
    if workflow:
        env.append(["workflow", e(workflow)])
    details = "".join(
        f'<details id="stage-{e(r.name)}"><summary>{e(r.name)} ({e(r.kind)})</summary>'
        f"<pre>{e(r.summary)}</pre></details>" for r in records)
    return (f"<p>Wall time of the stages on this page: {total}.</p>"
            + table(["stage", "kind", "wall time", "on disk", "complete", "hash", "seed"], rows, text_columns=2)
            + "<h3>Environment</h3>" + table(None, env, text_columns=2) + "<h3>Store summaries</h3>" + details)
