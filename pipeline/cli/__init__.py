"""The ``diffprobe`` command line: thin click commands over library functions.

The only importer of ``stages.STAGES`` (the stage registry): it hands the registry to
the workflow loader and the runner. Heavy imports happen inside commands, so
``diffprobe --help`` is instant.
"""

from pipeline.cli.commands import main

__all__ = ["main"]
