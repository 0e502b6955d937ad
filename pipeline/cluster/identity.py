"""Which diffprobe a process runs: version and a hash of the installed packages' sources.

Workers import ``pipeline`` and ``stages`` by name, from whatever is first on their
``sys.path``; a batch job started from a checkout may import that checkout while the
client imports the installed copy. :func:`code_identity` is computed in each process
(the client, and every worker through ``client.run``) and compared by
:func:`check_workers`, so a worker running other code is refused before it runs a task.
"""

from __future__ import annotations

import hashlib
import importlib
import socket
from pathlib import Path

from pipeline.errors import ClusterError

#: Packages whose ``*.py`` sources make up the identity (what workers import by name).
PACKAGES = ("pipeline", "stages")


def code_identity() -> dict:
    """``{"version", "hash", "where", "host"}`` of the diffprobe this process imports.

    ``hash`` is a sha256 over every ``*.py`` of :data:`PACKAGES` (relative path and
    bytes, in sorted order), so any edit, added or removed module changes it.
    """
    import pipeline

    digest = hashlib.sha256()
    where = []
    for name in PACKAGES:
        root = Path(importlib.import_module(name).__file__).resolve().parent
        where.append(str(root))
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{name}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return {"version": pipeline.__version__, "hash": digest.hexdigest()[:16],
            "where": where[0], "host": socket.gethostname()}


def check_workers(client, workers: list[str] | None = None) -> dict:
    """Refuse (:class:`ClusterError`) when any of ``workers`` (default all) runs other code.

    Returns the identities by worker address.
    """
    mine = code_identity()
    try:
        theirs = client.run(code_identity, workers=workers)
    except Exception as exc:  # noqa: BLE001 -- a worker that cannot import diffprobe at all
        raise ClusterError(
            f"dask workers cannot import diffprobe ({type(exc).__name__}: {exc}); install it "
            f"in the workers' environment (the client runs {mine['version']} from {mine['where']})"
        ) from None
    for address, ident in theirs.items():
        if (ident["version"], ident["hash"]) != (mine["version"], mine["hash"]):
            raise ClusterError(
                f"dask worker {address} runs diffprobe {ident['version']} (source hash "
                f"{ident['hash']}) from {ident['where']} on {ident['host']}, but this client runs "
                f"{mine['version']} ({mine['hash']}) from {mine['where']}; give the workers the "
                f"client's environment (same install, same PYTHONPATH)"
            )
    return theirs
