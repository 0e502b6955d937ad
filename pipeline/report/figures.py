"""The report's figures, drawn with matplotlib and returned as SVG data URIs.

In the style of Mukhopadhyay et al. (arXiv 2307.08702, Figs. 2-3): accuracy against
timestep, one line per block, one panel per head, the random-init control dashed
in its block's colour. Figures meant to be compared share their scale: the probe
panels one accuracy axis, every CKA heatmap the 0-1 range, the confusion matrix
0-100 %. Accuracies are percentages throughout.

Every function takes plain values (Datasets, ``findings`` objects) and returns a
:class:`Drawing` (``data:image/svg+xml;base64,...`` and its width); text stays text
in the SVG (``svg.fonttype: none``), so it is sharp at any width.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.report.findings import Cell, CostPoint

BLOCK_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
                 "#bcbd22", "#7f7f7f")
SERIES = {"trained": ("#1f4e79", "o"), "control": ("#c0504d", "s"), "baseline": ("#7f7f7f", "D")}
STYLE = {"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
         "axes.titlesize": 10, "legend.fontsize": 8, "legend.frameon": False}


@dataclass(frozen=True)
class Drawing:
    """A rendered figure: an SVG data URI and its natural width in CSS pixels.

    The page caps each image at its natural width, so text is the same size in every
    figure and never larger than drawn (9 pt at 96 px per inch).
    """

    uri: str
    width_px: int


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def render(fig) -> Drawing:
    """The figure as an SVG data URI (no fixed pixel size: the page scales it)."""
    import matplotlib

    buffer = io.BytesIO()
    with matplotlib.rc_context(STYLE):
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    uri = "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return Drawing(uri, round(fig.get_figwidth() * 96))


def _percent_axis(ax, axis: str = "y") -> None:
    from matplotlib.ticker import FuncFormatter

    formatter = FuncFormatter(lambda v, _: f"{v:.0f} %")
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(formatter)


def accuracy_range(values: Sequence[float]) -> tuple[float, float]:
    """A shared accuracy axis (percent): from a round number below the lowest value to 100."""
    finite = [v for v in values if np.isfinite(v)]
    low = min(finite, default=0.0)
    low = max(0.0, np.floor((low - 3) / 5) * 5)
    return low, 101.0


def block_colour(i: int) -> str:
    return BLOCK_COLOURS[i % len(BLOCK_COLOURS)]


def head_pool(trained, head: str, pools: Mapping[str, int] | None) -> int:
    """The pool drawn for a head: the given one, else the smallest the head was trained at."""
    if pools and head in pools:
        return int(pools[head])
    acc = trained["accuracy"].sel(head=head)
    available = [int(p) for p in trained["pool"].values if np.isfinite(acc.sel(pool=p).values).any()]
    return available[0] if available else int(trained["pool"].values[0])


def _curves(trained, control, head: str, pool: int) -> list[tuple[int, np.ndarray, np.ndarray | None]]:
    """(block index, trained %, control % or None) per block for one head and pool."""
    out = []
    for i, block in enumerate(trained["block"].values):
        y = 100 * trained["accuracy"].sel(head=head, block=block, pool=pool).values
        yc = None
        if control is not None and head in control["head"].values and block in control["block"].values \
                and pool in control["pool"].values:
            yc = 100 * control["accuracy"].sel(head=head, block=block, pool=pool).reindex(
                timestep=trained["timestep"].values).values
        out.append((i, y, yc))
    return out


def timestep_panels(trained, control=None, baseline: Mapping[str, Cell] | None = None,
                    pools: Mapping[str, int] | None = None) -> dict[str, Drawing]:
    """One panel per head: test accuracy (%) against timestep, a line per block.

    Parameters
    ----------
    trained, control : probe results Datasets ``accuracy(block, timestep, pool, head)``;
        the control is drawn dashed in the same colours (missing cells are skipped).
    baseline : head -> the baseline's best cell for that head, drawn as a grey dotted line.
    pools : head -> the pool size drawn for that head (default: the smallest it has).

    Returns head -> drawing; every panel has the same accuracy axis. The legend
    (block colours, line styles) is the page's, in HTML.
    """
    import matplotlib

    heads = [str(h) for h in trained["head"].values]
    timesteps = trained["timestep"].values
    curves = {h: _curves(trained, control, h, head_pool(trained, h, pools)) for h in heads}
    shown = [v for h in heads for _, y, yc in curves[h] for v in (*y, *(yc if yc is not None else ()))]
    shown += [100 * c.accuracy for c in (baseline or {}).values()]
    limits = accuracy_range(shown)
    panels = {}
    with matplotlib.rc_context(STYLE):
        for head in heads:
            fig = _figure(4.2, 2.9)
            ax = fig.add_subplot()
            for i, y, yc in curves[head]:
                ax.plot(timesteps, y, "-o", color=block_colour(i), ms=3.5, lw=1.6)
                if yc is not None:
                    ax.plot(timesteps, yc, "--", color=block_colour(i), lw=1.2, alpha=0.85)
            if baseline and head in baseline and np.isfinite(baseline[head].accuracy):
                ax.axhline(100 * baseline[head].accuracy, color=SERIES["baseline"][0], ls=":", lw=1.6)
            pool = head_pool(trained, head, pools)
            ax.set_title(f"{head} head, pool {pool}x{pool}")
            ax.set_xlabel("timestep t")
            ax.set_ylabel("test accuracy")
            ax.set_xticks(timesteps)
            ax.tick_params(axis="x", labelrotation=45 if len(timesteps) > 4 else 0, labelsize=8)
            ax.set_ylim(*limits)
            ax.grid(alpha=0.3, lw=0.5)
            _percent_axis(ax)
            panels[head] = render(fig)
    return panels


def cell_comparison(rows: Sequence[tuple[str, Sequence[tuple[str, Cell]]]], confidence: float = 0.95,
                    labels: Mapping[str, str] | None = None) -> Drawing:
    """A dot plot with Wilson intervals: one row per group (e.g. head), one marker per series.

    ``rows``: (group label, [(series key in ``SERIES``, cell), ...]).
    """
    import matplotlib

    labels = {"trained": "trained", "control": "random-init control", "baseline": "pixels", **(labels or {})}
    with matplotlib.rc_context(STYLE):
        fig = _figure(5.0, 0.42 * len(rows) + 1.5)
        ax = fig.add_subplot()
        offsets = {"trained": -0.22, "control": 0.0, "baseline": 0.22}
        lows, seen = [], set()
        for y, (_, series) in enumerate(rows):
            for key, cell in series:
                if not np.isfinite(cell.accuracy):
                    continue
                low, high = cell.interval(confidence)
                x = 100 * cell.accuracy
                colour, marker = SERIES[key]
                ax.errorbar(x, y + offsets[key], xerr=[[x - 100 * low], [100 * high - x]], fmt=marker,
                            color=colour, ms=5, capsize=2, lw=1.2, label=None if key in seen else labels[key])
                seen.add(key)
                lows.append(100 * low)
        ax.set_yticks(range(len(rows)), [label for label, _ in rows])
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_xlim(*accuracy_range(lows))
        ax.set_xlabel(f"test accuracy ({100 * confidence:.0f} % Wilson interval)")
        _percent_axis(ax, "x")
        ax.grid(axis="x", alpha=0.3, lw=0.5)
        fig.legend(loc="outside lower center", ncols=3)
        return render(fig)


def _short_labels(labels: Sequence[str]) -> list[str]:
    stages = {label.split("/", 1)[0] for label in labels}
    return [label.split("/", 1)[1] if len(stages) == 1 and "/" in label else label for label in labels]


def _group_edges(keys: Sequence[tuple]) -> list[float]:
    """Positions between consecutive entries whose (stage, block) differ."""
    return [i - 0.5 for i in range(1, len(keys)) if keys[i] != keys[i - 1]]


def cka_heatmap(da, title: str) -> Drawing:
    """A CKA matrix on the fixed 0-1 scale, with lines between blocks (and stages)."""
    import matplotlib

    values = da.values
    m_r, m_c = values.shape
    with matplotlib.rc_context(STYLE):
        cell = 0.34 if max(m_r, m_c) <= 16 else max(0.1, 5.5 / max(m_r, m_c))
        fig = _figure(min(8.0, 2.9 + cell * m_c), min(8.0, 1.9 + cell * m_r))
        ax = fig.add_subplot()
        image = ax.imshow(np.clip(values, 0, 1), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto",
                          interpolation="nearest")
        if max(m_r, m_c) <= 16:
            for (i, j), v in np.ndenumerate(values):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5,
                            color="black" if v > 0.6 else "white")
        row_keys = list(zip(da["row_stage"].values, da["row_block"].values))
        col_keys = list(zip(da["col_stage"].values, da["col_block"].values))
        for y in _group_edges(row_keys):
            ax.axhline(y, color="white", lw=1.6)
        for x in _group_edges(col_keys):
            ax.axvline(x, color="white", lw=1.6)
        font = 7 if max(m_r, m_c) <= 24 else 5
        ax.set_yticks(range(m_r), _short_labels([str(v) for v in da["row"].values]), fontsize=font)
        ax.set_xticks(range(m_c), _short_labels([str(v) for v in da["col"].values]), fontsize=font,
                      rotation=90)
        ax.set_title(title)
        ax.spines[:].set_visible(False)
        fig.colorbar(image, ax=ax, label="CKA (0-1, same scale in every panel)", shrink=0.85)
        return render(fig)


def confusion_matrix(confusion: np.ndarray, class_names: Sequence[str], title: str) -> Drawing:
    """Row-normalised confusion (% of the true class) on a 0-100 % scale, counts in the cells."""
    import matplotlib

    confusion = np.asarray(confusion)
    n = len(class_names)
    rates = 100 * confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    with matplotlib.rc_context(STYLE):
        size = min(8.0, max(3.4, 0.26 * n + 1.9))
        fig = _figure(size + 0.9, size)
        ax = fig.add_subplot()
        image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=100)
        if n <= 25:
            for (i, j), count in np.ndenumerate(confusion):
                if count:
                    ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 50 else "black")
        if n <= 60:
            ax.set_xticks(range(n), [str(c) for c in class_names], rotation=90 if n > 12 else 0)
            ax.set_yticks(range(n), [str(c) for c in class_names])
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(title)
        ax.spines[:].set_visible(False)
        colourbar = fig.colorbar(image, ax=ax, shrink=0.85, label="% of the true class")
        _percent_axis(colourbar.ax)
        return render(fig)


def accuracy_vs_passes(curve: Sequence[CostPoint], exhaustive_per_image: int, n_trials: int) -> Drawing:
    """Accuracy (%) against forward passes per image: exhaustive re-scorings on fewer trials, and the run."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        fig = _figure(5.0, 3.4)
        ax = fig.add_subplot()
        subsets = [p for p in curve[:-1]]
        if subsets:
            ax.plot([p.passes_per_image for p in subsets], [100 * p.accuracy for p in subsets], "-o",
                    color=SERIES["trained"][0], ms=4, label="every class on k trials (re-scored)")
            for p in subsets:
                ax.annotate(f"k={p.n_trials}", (p.passes_per_image, 100 * p.accuracy), textcoords="offset points",
                            xytext=(4, -10), fontsize=7)
        run = curve[-1]
        ax.plot([run.passes_per_image], [100 * run.accuracy], "*", color=SERIES["control"][0], ms=11,
                label=run.label)
        ax.axvline(exhaustive_per_image, color="#555555", ls="--", lw=1)
        ax.annotate(f"exhaustive, {n_trials} trials:\n{exhaustive_per_image} passes", (exhaustive_per_image, 0.02),
                    xycoords=("data", "axes fraction"), xytext=(-4, 0), textcoords="offset points", ha="right",
                    fontsize=7, color="#555555")
        ax.set_xlim(0, exhaustive_per_image * 1.05)
        ax.set_ylim(*accuracy_range([100 * p.accuracy for p in curve]))
        ax.set_xlabel("denoiser forward passes per image")
        ax.set_ylabel("accuracy")
        _percent_axis(ax)
        ax.grid(alpha=0.3, lw=0.5)
        fig.legend(loc="outside lower center", ncols=2)
        return render(fig)
