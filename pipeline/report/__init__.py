"""The report: one self-contained HTML page that states a workflow's findings.

Top to bottom: the findings (each number a link to the section it comes from),
the probe figures (accuracy vs timestep per head with the random-init control
dashed, heads at the best cell), CKA heatmaps on one 0-1 scale, the Diffusion
Classifier (confusion, accuracy vs forward passes), then provenance and cost in
a collapsed ``<details>``. Figures are SVG embedded as data URIs, so the page is
one file with no scripts.

- ``findings``: every headline number, computed from the stage outputs (numpy, xarray);
- ``figures``: the matplotlib figures, as SVG data URIs;
- ``provenance``: versions, git commit, host, and each input's hash, seed and wall time;
- ``markup``: the stylesheet, number formats, linked numbers, tables;
- ``sections``: what each kind of stage output adds to the page;
- ``page``: ``build_report``, the page top to bottom.

May import: ``pipeline.store``, ``pipeline.probing``, ``pipeline.cka``, ``pipeline.errors``;
never ``stages`` or the workflow machinery (``stages/report.py`` calls ``build_report``).
"""

from pipeline.report.page import build_report

__all__ = ["build_report"]
