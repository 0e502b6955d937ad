"""Where the fixed cost of a ``diffprobe run`` goes, phase by phase, for one or two checkouts.

    .venv/bin/python benchmarks/fixed_cost.py --workflow workflows/demo.yaml [--tree A --tree B] \\
        [--stores runs/demo]

For each checkout (``--tree``, default this one) a child process with that
checkout's code measures, in the order a run meets them:

imports        the CLI, the workflow loader, the runner and the stage modules the
               workflow uses, then torch / dask + distributed / zarr / xarray / scipy /
               matplotlib where not imported yet (their cumulative ``-X importtime``,
               read from a second child)
load           the YAML, validated into frozen configs
hash           every stage's content hash (opens each dataset for its image ids,
               fingerprints the model files)
validate       every stage's ``validate`` on outputs that do not exist (models built on
               the CPU, datasets listed, inputs' shapes), as a fresh ``diffprobe run`` does
rebuild        what each extract / classify ``run`` builds again before computing
               (``Extractor`` / ``Classifier`` with the run's ``prepared`` objects where
               the checkout has them)
cluster        starting and stopping the workflow's ``cluster:`` once (a run pays it
               once per dask stage before one cluster per run, once or never after)
store opens    ``read_attrs`` + ``open_root`` of every output under ``--stores`` (a
               finished run of the same workflow), as the runner and each task do

Prints one Markdown table (seconds per phase and checkout) and the ``uptime`` load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "dask", "distributed", "zarr", "xarray", "scipy", "matplotlib", "pandas")


def child(workflow: Path, stores: Path | None) -> dict:
    out: dict[str, float] = {}
    t = time.perf_counter()
    from pipeline.workflow.config import load_workflow
    from pipeline.workflow.runner import Runner
    from stages import STAGES

    out["imports: CLI, runner, registry"] = time.perf_counter() - t
    t = time.perf_counter()
    wf = load_workflow(workflow, STAGES)
    out["load: YAML -> configs (imports the stages used)"] = time.perf_counter() - t
    runner = Runner(wf, progress=False)
    t = time.perf_counter()
    for entry in wf.stages:
        runner.hashes[entry.name]
    out["hash: every stage (datasets listed, model files fingerprinted)"] = time.perf_counter() - t
    by_kind: dict[str, float] = {}
    for entry in wf.stages:
        t = time.perf_counter()
        try:
            runner.stages[entry.name].validate(entry.config, runner.context(entry))
        except Exception as exc:  # noqa: BLE001 -- a stage whose input must exist first
            print(f"validate {entry.name}: {exc}", file=sys.stderr)
        by_kind[entry.kind] = by_kind.get(entry.kind, 0.0) + time.perf_counter() - t
    for kind, seconds in by_kind.items():
        out[f"validate: {kind} stages"] = seconds
    t = time.perf_counter()
    for entry in wf.stages:
        if entry.kind not in ("extract", "classify"):
            continue
        module = sys.modules[type(runner.stages[entry.name]).__module__]
        builder = getattr(module, "Extractor", None) or getattr(module, "Classifier")
        prepared = getattr(runner.context(entry), "prepared", None)
        if prepared is None:  # a checkout without prepared objects builds everything again
            builder(entry.config)
        else:
            builder(entry.config, prepared=prepared)
    out["rebuild: extract / classify run's model + dataset"] = time.perf_counter() - t
    t = time.perf_counter()
    from pipeline.cluster.client import get_client

    out["imports: dask + distributed (cluster client)"] = time.perf_counter() - t
    t = time.perf_counter()
    with get_client(wf.cluster, log=lambda _: None):
        pass
    out["cluster: start + stop once"] = time.perf_counter() - t
    if stores is not None:
        from pipeline.store.layout import open_root, read_attrs

        paths = [p for p in sorted(stores.iterdir()) if (p / "zarr.json").exists()]
        t = time.perf_counter()
        for path in paths:
            read_attrs(path)
            if (read_attrs(path) or {}).get("layout"):
                open_root(path)
        out[f"store opens: {len(paths)} outputs, attrs + root"] = time.perf_counter() - t
    return out


def import_times(tree: Path, workflow: Path) -> dict[str, float]:
    """Cumulative -X importtime seconds of the heavy packages a run of ``workflow`` imports up to validate."""
    code = (f"from pipeline.workflow.config import load_workflow; from stages import STAGES; "
            f"load_workflow({str(workflow)!r}, STAGES)")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(tree)), cwd=tree)
    seen: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        name = name.strip()
        if name in HEAVY and name not in seen:
            seen[name] = int(cumulative) / 1e6
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workflow", type=Path, required=True)
    ap.add_argument("--tree", type=Path, action="append")
    ap.add_argument("--stores", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.workflow.resolve(), args.stores)))
        return
    trees = args.tree or [ROOT]
    load = [subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
    columns = []
    for tree in trees:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--workflow", str(args.workflow.resolve())]
        if args.stores:
            cmd += ["--stores", str(args.stores.resolve())]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(tree)),
                              cwd=tree)
        if proc.returncode:
            raise SystemExit(proc.stderr)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row |= {f"of which -X importtime: {k}": v for k, v in import_times(tree, args.workflow.resolve()).items()}
        columns.append(row)
    load.append(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    keys = list(dict.fromkeys(k for row in columns for k in row))
    print(f"workflow: {args.workflow}; load: {load[0]} / {load[-1]}\n")
    print("| phase | " + " | ".join(str(t) for t in trees) + " |")
    print("|---|" + "---|" * len(trees))
    for key in keys:
        print(f"| {key} | " + " | ".join(f"{row[key]:.2f}" if key in row else "—" for row in columns) + " |")


if __name__ == "__main__":
    main()
