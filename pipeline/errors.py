"""The DiffprobeError family: one-line messages that name the thing and the fix.

The CLI prints ``str(error)`` on one line and exits non-zero; ``-v`` shows the
traceback. Library code raises these for anything a user can get wrong; plain
builtin exceptions (``ValueError``, ``TypeError`` ...) mean misuse of an internal
function, i.e. a bug in diffprobe. As in zarr-python, each class also derives from
the builtin it refines, so ``except ValueError`` around a library call still works.
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable

#: errno values of an output file system a user fixes outside diffprobe (full, quota,
#: file-size limit, read-only, forbidden): never retried, always one line (the runner's).
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def is_storage_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an OSError of the file system being written (see :data:`STORAGE_ERRNOS`)."""
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


class DiffprobeError(Exception):
    """Base class: something the user can fix. The message says what and how."""

    exit_code = 2


class DiffprobeWarning(UserWarning):
    """Base class of warnings about the user's data or config; the CLI prints each as one
    ``warning: ...`` line (Python's default format adds a file, line number and source line)."""


class ConfigError(DiffprobeError, ValueError):
    """A workflow file or stage parameter is wrong."""


class StoreError(DiffprobeError, RuntimeError):
    """A store is missing, incomplete, corrupt or written by another config."""


class DatasetError(DiffprobeError, ValueError):
    """A dataset root, annotation file or image cannot be used."""


class ModelError(DiffprobeError, ValueError):
    """A model cannot be loaded, or a block / timestep / condition is invalid for it."""


class ImageReadError(DatasetError):
    """One image could not be decoded; carries the id so it can be recorded and masked."""

    def __init__(self, image_id: str, reason: str):
        super().__init__(f"cannot read image {image_id!r}: {reason}")
        self.image_id = image_id
        self.reason = reason


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def list_choices(choices: Iterable[str], limit: int = 12) -> str:
    """Abbreviate a long list of valid names as ``a, b, c ... y, z (N in all)``."""
    items = [str(c) for c in choices]
    if len(items) <= limit:
        return ", ".join(items)
    half = limit // 2
    return f"{', '.join(items[:half])} ... {', '.join(items[-half:])} ({len(items)} in all)"


def select_or_error(requested, available: list, what: str, where: str, stage: str) -> list:
    """``'all'`` -> every item of ``available``; else the requested items, or a ConfigError
    naming the first missing one, the closest valid name and the valid choices."""
    if requested == "all":
        return list(available)
    missing = [r for r in requested if r not in available]
    if missing:
        raise ConfigError(
            f"{stage}: {what} {missing[0]!r} is not in {where}"
            f"{did_you_mean(str(missing[0]), map(str, available))}; "
            f"valid: {list_choices(map(str, available))}"
        )
    return list(requested)


class ClusterError(DiffprobeError, RuntimeError):
    """Dask workers cannot be had or kept: a scheduler refused the jobs, they never start, or they run other code."""
