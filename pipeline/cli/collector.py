"""The garbage collector in the ``diffprobe`` program, set for one short process.

A ``diffprobe run`` imports torch, diffusers, zarr, ... and builds its models before
the first stage computes: ~570k objects that live until the process ends. Python's
cyclic collector walks that growing heap again and again while it is built (8 full
collections, ~1.5 CPU-s of a short run on the 2-core machine, finding a few hundred
objects), and once more, with the module teardown, at exit (~2 CPU-s). So
the program (``start_program``)

- pauses the collector from its start until the run's stages are validated (imports,
  workflow, hashes, models built; ``resume_collector``, called by the runner), then
  freezes what exists then (``gc.freeze``: those objects are never walked again) and
  resumes it: the stages' work (batches, tensors, stores) is collected as usual;
- freezes the whole heap at exit (an ``atexit`` handler), so the last collections skip
  it; other atexit handlers still run, and files are closed by their owners, never by
  the collector.

Cyclic garbage made while paused (a few hundred objects) is frozen with the rest and
never freed: the process ends soon after. Commands other than ``run`` only get the
frozen exit. In-process callers (``click.testing.CliRunner`` on
``pipeline.cli.main``) get none of this: it is the program's, not the library's.
"""

from __future__ import annotations

import atexit
import gc

_paused = False


def start_program(argv: list[str]) -> None:
    """Set the collector for the program whose arguments are ``argv`` (``sys.argv``)."""
    global _paused
    command = next((arg for arg in argv[1:] if not arg.startswith("-")), None)
    if command == "run" and gc.isenabled():
        gc.disable()
        _paused = True
    atexit.register(gc.freeze)


def resume_collector() -> None:
    """Freeze the heap built so far and resume the collector, if the program paused it (else nothing)."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()
