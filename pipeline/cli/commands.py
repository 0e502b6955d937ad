"""The ``diffprobe`` command line: thin click commands over library functions.

Heavy imports (torch, zarr, dask) happen inside commands so ``--help`` is instant.
Errors a user can fix print one line and exit 2; ``-v`` shows the traceback.
"""

from __future__ import annotations

import functools
import sys

import click


def _friendly(fn):
    """Turn DiffprobeError into one line + exit code; -v re-raises for the traceback.

    An interruption (SIGINT, SIGTERM, Ctrl-C) is one line too, exit 128 + signal."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline.errors import DiffprobeError
        from pipeline.interrupts import Interrupted

        ctx = click.get_current_context()
        verbose = (ctx.find_root().params or {}).get("verbose", False)
        try:
            return fn(*args, **kwargs)
        except DiffprobeError as exc:
            if verbose:
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            if verbose:
                raise
            code = exc.exit_code if isinstance(exc, Interrupted) else 130
            name = exc.args[0] if isinstance(exc, Interrupted) else "SIGINT"
            resume = (" finished units are kept; run the same command again to resume"
                      if ctx.command.name == "run" else "")
            click.echo(f"interrupted ({name}):{resume or ' nothing was changed'}", err=True)
            sys.exit(code)

    return wrapper


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="diffprobe")
def main(verbose: bool) -> None:
    """diffprobe: extract diffusion activations once, analyse them many times."""
    _one_line_warnings()


def _one_line_warnings() -> None:
    """Print diffprobe's own warnings as one ``warning: ...`` line each (others unchanged).

    Forked DataLoader workers inherit the hook, so their warnings read the same."""
    import warnings

    from pipeline.errors import DiffprobeWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DiffprobeWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


@main.command(short_help="Run a workflow's stages in order, skipping up-to-date outputs.")
@click.argument("workflow", type=click.Path(dir_okay=False))
@click.option("--only", metavar="STAGE", help="Run just this stage (its inputs must be complete).")
@click.option("--until", metavar="STAGE", help="Run stages up to and including this one.")
@click.option("--force", is_flag=True,
              help="Replace outputs written by another config (and the --only stage); never up-to-date inputs.")
@click.option("--dry-run", is_flag=True, help="Say what would run, skip or be refused; run nothing.")
@click.option("--shard", metavar="i/N", help="Do units u with u % N == i (default: RANK/WORLD_SIZE).")
@click.option("--strict", is_flag=True, help="Unreadable images are fatal instead of masked.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@_friendly
def run(workflow, only, until, force, dry_run, shard, strict, no_progress):
    """Run a workflow's stages in order, skipping up-to-date outputs."""
    from pipeline.interrupts import install_handlers

    install_handlers()
    from pipeline.cli.collector import resume_collector
    from pipeline.workflow.config import load_workflow
    from pipeline.workflow.runner import Runner, parse_shard
    from stages import STAGES

    wf = load_workflow(workflow, STAGES)
    runner = Runner(wf, force=force, shard=parse_shard(shard), strict=strict, progress=not no_progress,
                    on_validated=resume_collector)
    runner.run(only=only, until=until, dry_run=dry_run)


@main.command(short_help='Samples, bytes, forward passes and time, before any GPU time.')
@click.argument("workflow", type=click.Path(dir_okay=False))
@click.option("--only", metavar="STAGE", help="Plan just this stage.")
@_friendly
def plan(workflow, only):
    """Before spending GPU time: samples, shapes, forward passes, bytes, time."""
    from pipeline.workflow.config import load_workflow
    from pipeline.workflow.runner import Runner
    from stages import STAGES

    wf = load_workflow(workflow, STAGES)
    runner = Runner(wf, progress=False)
    for entry in runner.select(only=only):
        stage = runner.stages[entry.name]
        click.echo(f"== {entry.name} ({entry.kind}) -> {entry.output}")
        rows = stage.plan(entry.config, runner.context(entry))
        if not rows:
            click.echo("   (nothing to estimate for this stage)")
        width = max((len(k) for k, _ in rows), default=0)
        for key, value in rows:
            click.echo(f"   {key:<{width}}  {value}")


@main.command(short_help="List a model's capturable blocks with their output shapes.")
@click.argument("model")
@click.option("--size", type=int, help="Input size in pixels (default: the model's own).")
@click.option("--kind", default=None, help="Model kind (unet2d, factory, sd, dit); guessed from MODEL.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="Factory option (repeatable).")
@_friendly
def blocks(model, size, kind, options):
    """List every capturable block of MODEL with its output shape and forward position.

    MODEL is a local diffusers folder, a config JSON, or a factory 'file.py:function'.
    """
    from pipeline.cli.support import model_config_from_cli
    from pipeline.models import load_model

    cfg = model_config_from_cli(model, size, kind, options)
    adapter = load_model(cfg)
    rows = adapter.blocks()
    click.echo(f"{'pos':>4}  {'paper':>5}  {'block':<40} shape (C, H, W)")
    for b in rows:
        paper = str(b.paper_number) if b.paper_number else ""
        click.echo(f"{b.position:>4}  {paper:>5}  {b.name:<40} {b.shape}")
    click.echo(f"{len(rows)} blocks; input {adapter.latent_channels}x{adapter.latent_size}x{adapter.latent_size}, "
               f"{adapter.num_train_timesteps} timesteps")


@main.command(short_help='Summarise a store: blocks, shapes, completion, codecs.')
@click.argument("store_path", metavar="STORE", type=click.Path())
@_friendly
def inspect(store_path):
    """Blocks, shapes, dtype, timesteps, completion, compression and provenance of a store."""
    from pipeline.store.describe import describe_store
    from pipeline.store.layout import read_attrs, unit_status
    from pipeline.store.location import as_location
    from pipeline.workflow.claims import lease_report

    click.echo(describe_store(store_path))
    attrs = read_attrs(store_path) or {}
    if "layout" in attrs and not attrs.get("complete"):
        pending = [int(u) for u in (~unit_status(store_path)).nonzero()[0]]
        for line in lease_report(as_location(store_path), pending):
            click.echo(line)


@main.command(short_help="Write a few samples' activations to one .npz file.")
@click.argument("store_path", metavar="STORE", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--rows", metavar="SEL", help="Sample rows: 0:10, 5,9,12 or a mix.")
@click.option("--ids", metavar="ID,...", help="Image ids (every view of each), comma-separated.")
@click.option("--ids-file", type=click.Path(dir_okay=False, exists=True),
              help="A text file of image ids, one per line.")
@click.option("--block", "blocks", multiple=True, metavar="NAME", help="Only this block (repeatable; default all).")
@click.option("--timesteps", metavar="T,...", help="Only these timesteps, e.g. 10,400 (default all).")
@click.option("--check", is_flag=True, help="Read whole chunks so every checksum is verified (slower).")
@_friendly
def samples(store_path, out, rows, ids, ids_file, blocks, timesteps, check):
    """Write the activations of a few samples of STORE (an extract or pool output) to OUT (.npz),
    reading about the bytes they hold rather than whole chunks."""
    from pathlib import Path

    from pipeline.dc.rescore import parse_ints, parse_trials
    from pipeline.errors import ConfigError
    from pipeline.store.samples import SampleReader, export_samples

    if sum(x is not None for x in (rows, ids, ids_file)) != 1:
        raise ConfigError("name the samples with exactly one of --rows, --ids or --ids-file")
    if not str(out).endswith(".npz"):
        raise ConfigError(f"OUT {out!r} must end in .npz")
    reader = SampleReader(store_path)
    if rows is not None:
        picked = parse_trials(rows, reader.n_samples(), what="--rows", item="sample")
    else:
        text = ids if ids is not None else Path(ids_file).read_text()
        picked = [s.strip() for s in text.replace("\n", ",").split(",") if s.strip()]
        if not picked:
            raise ConfigError("no image id given")
    for line in export_samples(reader, picked, out, blocks or None,
                               parse_ints(timesteps) if timesteps else None, check=check):
        click.echo(line)


@main.command(short_help="Print a probe stage's results table, best cells first.")
@click.argument("path", type=click.Path())
@click.option("--top", type=int, default=None, metavar="N", help="Show only the N best cells.")
@_friendly
def results(path, top):
    """Print a probe stage's results (PATH: its <name>.probe folder), best cells first."""
    from pipeline.probing.results import format_results

    click.echo(format_results(path, top=top))


@main.command(short_help='Re-score a classify store from its cached errors (no model).')
@click.argument("store_path", metavar="STORE", type=click.Path())
@click.option("--trials", metavar="SEL", help="Trial indices: 0:10, 0:20:2, 1,3,5 or a mix (default all).")
@click.option("--timesteps", metavar="T,...",
              help="Select trials by timestep instead (all their draws), e.g. 25,75,125.")
@click.option("--draws", metavar="D,...", help="Keep only these noise draws, e.g. 0 (default all).")
@click.option("--loss", type=click.Choice(["l2", "l1", "huber"]),
              help="Error array that ranks classes (default: the loss the run eliminated with).")
@click.option("--weighting", type=click.Choice(["uniform", "snr", "x0", "elbo"]), default="uniform",
              show_default=True, help="Per-trial weights of the class score.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Folder for confusion.png, score.json, per_class.csv (default: <STORE stem>-score).")
@_friendly
def score(store_path, trials, timesteps, draws, loss, weighting, out_dir):
    """Score a classify store from its cached errors: no model, no GPU."""
    from pipeline.store import error_tensor as errorstore
    from pipeline.dc import rescore
    from pipeline.store.location import as_location

    n_trials = errorstore.open_error_store(store_path)["trial"].shape[0]
    result = rescore.score_store(
        store_path, loss, rescore.parse_trials(trials, n_trials) if trials else None,
        rescore.parse_ints(timesteps) if timesteps else None, weighting,
        rescore.parse_ints(draws) if draws else None)
    click.echo(rescore.format_score(result))
    path = as_location(store_path)
    paths = rescore.write_score(result, as_location(out_dir) if out_dir else path.parent / f"{path.stem}-score")
    click.echo(f"wrote {paths['png']}, {paths['json'].name}, {paths['csv'].name}")


@main.command(short_help='Check every chunk of an output; --repair marks damage.')
@click.argument("store_path", metavar="STORE", type=click.Path())
@click.option("--repair", is_flag=True,
              help="Mark damaged units pending (rebuild a lost done mask from the data) so the next run "
                   "recomputes only them; rewrite lost metadata; remove leftovers of killed writers.")
@_friendly
def verify(store_path, repair):
    """Read every chunk of STORE (any stage's output) and name what is damaged.

    Exit 0 if nothing is damaged, 1 if something is (with --repair: 0 once everything
    found was repaired, 1 if something could not be)."""
    from pipeline.store.repair import repair_store
    from pipeline.store.verify import verify_store

    report = verify_store(store_path)
    for line in report.lines():
        click.echo(line)
    if not (repair and report.findings):
        sys.exit(1 if report.damage else 0)
    actions = repair_store(store_path, report)
    for line in actions:
        click.echo(f"repair      {line}")
    sys.exit(1 if any(line.startswith("cannot repair") for line in actions) else 0)


@main.command(short_help='Max abs / rel difference of two outputs, per block and t.')
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--atol", type=float, default=0.0, show_default=True, help="Absolute tolerance.")
@click.option("--rtol", type=float, default=0.0, show_default=True, help="Relative tolerance.")
@_friendly
def diff(a, b, atol, rtol):
    """Max abs / rel difference of two outputs per block and timestep (or per results variable);
    exit 0 if they agree within the tolerances, 1 otherwise."""
    from pipeline.store.diff import diff_outputs, format_rows

    rows = diff_outputs(a, b, atol, rtol)
    click.echo(format_rows(rows, atol, rtol))
    sys.exit(1 if any(r.n_outside for r in rows) else 0)


if __name__ == "__main__":  # pragma: no cover
    from pipeline.cli.collector import start_program

    start_program(sys.argv)
    main()
