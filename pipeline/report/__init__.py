"""The report: one self-contained HTML page that states a workflow's findings.

Top to bottom: the findings (each number a link to the section it comes from),
the probe figures (accuracy vs timestep per head with the random-init control
dashed, heads at the best cell), CKA heatmaps on one 0-1 scale, the Diffusion
Classifier (confusion, accuracy vs forward passes), then provenance and cost in
a collapsed ``<details>``. Figures are SVG embedded as data URIs, so the page is
one file with no scripts.

``findings`` computes every headline number from the stores (numpy only);
``figures`` draws them; ``provenance`` collects versions, hashes and timings;
``html`` writes the page.
"""

from pipeline.report.html import build_report

__all__ = ["build_report"]
