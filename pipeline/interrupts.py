"""Interruptions (SIGINT, SIGTERM) as one exception, so no interrupted run looks like success.

``diffprobe run`` installs :func:`install_handlers` first thing: both signals raise
:class:`Interrupted` in the main thread, whatever the process inherited (a shell
starts background jobs with SIGINT ignored, which is why ``kill -INT`` used to be
ignored; SIGTERM's default ends the process without unwinding, so the unit writer
never drained). The stages' ``finally`` blocks then run (the unit being written is
finished, leases are released), and the CLI prints one line and exits ``128 + signum``
(130 for SIGINT, 143 for SIGTERM).

:func:`keep_handlers` protects them from libraries that install their own on import
(``dask_jobqueue`` turns SIGINT into ``sys.exit()``, i.e. exit status 0).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


def _raise(signum, frame):
    raise Interrupted(signum)


def install_handlers() -> None:
    """SIGINT and SIGTERM raise :class:`Interrupted` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        signal.signal(sig, _raise)


@contextlib.contextmanager
def keep_handlers() -> Iterator[None]:
    """Restore the SIGINT / SIGTERM handlers after the block (around imports that replace them)."""
    main = threading.current_thread() is threading.main_thread()
    saved = {sig: signal.getsignal(sig) for sig in SIGNALS} if main else {}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None and signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)


@contextlib.contextmanager
def children_ignore_sigint() -> Iterator[None]:
    """Processes started inside the block inherit SIGINT ignored (a terminal's Ctrl-C goes to
    the whole process group: dask workers should be stopped by their parent, not print
    tracebacks of their own)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, saved if saved is not None else signal.default_int_handler)
