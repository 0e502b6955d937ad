"""CPU seconds of one fresh ``diffprobe run``, phase by phase, for one or more checkouts.

    nice -n 19 .venv/bin/python benchmarks/run_phases.py --tree /path/to/main --tree . [--repeats 2] \\
        [--dataset synth10000] [--work /tmp/run-phases]

The workflow is ``benchmarks/rerun_vs_cache.py``'s (extract ``mid_block`` at t = 50 with
the shipped digits model, pool to 2x2, one linear probe, E = 1) on ``--dataset``. For
each checkout and repeat (interleaved), a child process with that checkout's code runs
the real command in-process, as the ``diffprobe`` program does (where the checkout has
``pipeline/cli/collector.py``, its collector policy from the first line), with a CPU
timer (``time.process_time``: all threads of the process) around the functions below,
and ``gc.callbacks`` timing every collection; ``/usr/bin/time`` gives the whole
process's user + sys, exit included. CPU time, not wall time, so that a loaded machine
moves the figures less (it still moves them: run it twice). A function that calls a
timed one includes its time.

Prints one Markdown table: per phase, the CPU seconds of each repeat, per checkout.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: (object path, attribute, phase label); a missing one (another checkout) is skipped.
TIMED = [
    ("pipeline.workflow.config", "load_workflow", "load: YAML -> configs"),
    ("pipeline.workflow.runner.Runner", "_hash", "hash: every stage (dataset listed, model files fingerprinted)"),
    ("pipeline.workflow.runner.Runner", "validate", "validate: every stage"),
    ("pipeline.models", "load_model", "  of which: load_model (diffusers import + build)"),
    ("stages.extract.ExtractStage", "run", "extract: run"),
    ("stages.extract.Extractor", "compute_unit", "  of which: compute_unit (forward; decode and writer threads)"),
    ("stages.pool.PoolStage", "run", "pool: run (in-process)"),
    ("stages.probe.ProbeStage", "run", "probe: run (in-process)"),
    ("pipeline.probing.results", "results_dataset", "  of which: results Dataset (xarray)"),
    ("pipeline.probing.results", "save_heatmaps", "  of which: heatmap PNG (matplotlib)"),
]


def child(workflow: Path) -> dict[str, float]:
    """Run ``diffprobe run WORKFLOW`` here; {phase: CPU seconds}."""
    start = time.process_time()
    program = (Path.cwd() / "pipeline" / "cli" / "collector.py").exists()
    if program:  # what pipeline.cli.collector.start_program does for `run`
        import atexit

        gc.disable()
        atexit.register(gc.freeze)
    out: dict[str, float] = {}
    collect: dict[str, float] = {}

    def on_gc(phase, info):
        if phase == "start":
            collect["t"] = time.process_time()
        else:
            out["cyclic garbage collection (all phases)"] = (out.get("cyclic garbage collection (all phases)", 0.0)
                                                             + time.process_time() - collect["t"])

    gc.callbacks.append(on_gc)
    t = time.process_time()
    for name in ("pipeline.cli.commands", "pipeline.workflow.runner", "stages.extract", "stages.pool",
                 "stages.probe", "pipeline.probing.results", "pipeline.models"):
        importlib.import_module(name)
    out["imports: CLI, runner, stage modules (torch)"] = time.process_time() - t
    if program:
        from pipeline.cli import collector

        collector._paused = True
    for path, attr, label in TIMED:
        parts = path.split(".")
        for i in range(len(parts), 0, -1):
            try:
                owner = importlib.import_module(".".join(parts[:i]))
                break
            except ImportError:
                continue
        for part in parts[i:]:
            owner = getattr(owner, part)
        if not hasattr(owner, attr):
            continue
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args, __original=original, __label=label, **kwargs):
            began = time.process_time()
            try:
                return __original(*args, **kwargs)
            finally:
                out[__label] = out.get(__label, 0.0) + time.process_time() - began

        setattr(owner, attr, timed)
        for module in list(sys.modules.values()):  # names imported elsewhere (``from x import f``)
            try:
                if module is not None and module is not owner and getattr(module, attr, None) is original:
                    setattr(module, attr, timed)
            except Exception:  # noqa: BLE001 -- a lazy module's __getattr__
                continue
    from pipeline.cli.commands import main

    sys.argv = ["diffprobe", "run", str(workflow), "--no-progress"]
    t = time.process_time()
    main(standalone_mode=False)
    out["the command (all of the above after imports)"] = time.process_time() - t
    out["process until exit"] = time.process_time() - start
    return out


def run_child(tree: Path, work: Path, label: str, workflow_text: str) -> dict[str, float]:
    folder = work / f"run-{label}"
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    folder.mkdir(parents=True)
    wf = folder / "wf.yaml"
    wf.write_text(workflow_text)
    result = folder / "phases.json"
    cmd = ["/usr/bin/time", "-f", "%U %S", "-o", str(folder / "time.txt"), sys.executable,
           str(Path(__file__).resolve()), "--child", str(wf), "--json", str(result)]
    proc = subprocess.run(cmd, cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)), capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        raise SystemExit(f"{tree}: {proc.stderr[-2000:]}")
    row = json.loads(result.read_text())
    user, system = (float(x) for x in (folder / "time.txt").read_text().split()[-2:])
    row["whole process, exit included (user + sys)"] = user + system
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, action="append")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dataset", default="synth10000")
    ap.add_argument("--work", type=Path, default=Path("/tmp/run-phases"))
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.json.write_text(json.dumps(child(args.child)))
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import rerun_vs_cache as rvc

    args.work.mkdir(parents=True, exist_ok=True)
    text = rvc.WORKFLOW.format(model=rvc.DIGITS, dataset=rvc.dataset_yaml(args.dataset, args.work), block=rvc.BLOCK,
                               t=rvc.TIMESTEP, fb=rvc.FORWARD_BATCH, pool=rvc.POOL, tf=rvc.TEST_FRACTION,
                               batch=rvc.BATCH, seed=rvc.SEED, lr=rvc.LR, mom=rvc.MOMENTUM, wd=rvc.WEIGHT_DECAY,
                               step=rvc.step_size(1), gamma=rvc.GAMMA, epochs=1)
    trees = [t.resolve() for t in (args.tree or [ROOT])]
    load = [subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()]
    rows: dict[int, list[dict]] = {i: [] for i in range(len(trees))}
    for r in range(args.repeats):
        for i, tree in enumerate(trees):
            rows[i].append(run_child(tree, args.work, f"{i}-{r}", text))
    load.append(subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip())
    keys = list(dict.fromkeys(k for runs in rows.values() for row in runs for k in row))
    print(f"{args.dataset}; load: {load[0]} / {load[-1]}\n")
    print("| phase (CPU s) | " + " | ".join(re.sub(r"^/.*/", "", str(t)) or str(t) for t in trees) + " |")
    print("|---|" + "---|" * len(trees))
    for key in keys:
        cells = [" / ".join(f"{row[key]:.2f}" if key in row else "—" for row in rows[i]) for i in range(len(trees))]
        print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
