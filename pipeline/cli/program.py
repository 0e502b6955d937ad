"""The ``diffprobe`` program: the click commands in a process of their own.

The console script and ``python -m pipeline.cli`` start here; in-process callers
(``click.testing.CliRunner``) use ``pipeline.cli.main``, without what
``pipeline.cli.collector.start_program`` sets for a process.
"""

from __future__ import annotations

import sys

from pipeline.cli.collector import start_program
from pipeline.cli.commands import main as commands


def main() -> None:
    """Entry point of the ``diffprobe`` console script and ``python -m pipeline.cli``."""
    start_program(sys.argv)
    commands()
