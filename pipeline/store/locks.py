"""Files that belong to a process: the finalize lock and schema temp folders.

Both can be left behind by a process that was killed, so both say who made them
(pid, host, the process's start time) and are recognised as stale afterwards:

- on the same host, when that pid is gone or is another process now (its start
  time differs: the pid was reused);
- on another host (where the pid means nothing), when the owner stops showing
  signs of life: a lock's holder touches it every :data:`HEARTBEAT_S` seconds, and a
  lock unchanged for :data:`STALE_AFTER_S` seconds of watching is stale; a temp
  folder older than :data:`STALE_TEMP_S` is stale (a schema is built in seconds).

Finalizing is idempotent (see ``layout.finalize``), so the lock only keeps
finishers from doing the same work at the same time; a rare race where two take
over one stale lock costs a duplicate finalize, never a wrong store.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import StoreError

HEARTBEAT_S = 2.0
STALE_AFTER_S = 30.0
STALE_TEMP_S = 3600.0
#: How long a finisher waits for a live holder before giving up with a message.
WAIT_S = 900.0


@dataclass(frozen=True)
class Owner:
    """Who made a file: process id, host name, process start time (clock ticks since boot, Linux)."""

    pid: int
    host: str
    start: int | None
    time: float

    @classmethod
    def me(cls) -> Owner:
        return cls(os.getpid(), socket.gethostname(), process_start(os.getpid()), time.time())

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.time))
        return f"pid {self.pid} on host {self.host} since {when}"


def process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def alive(owner: Owner) -> bool | None:
    """True / False for a process of this host; None for another host (cannot tell)."""
    if owner.host != socket.gethostname():
        return None
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    start = process_start(owner.pid)
    return not (owner.start is not None and start is not None and start != owner.start)


# ----------------------------------------------------------------- finalize lock


def lock_path(store_path: str | Path) -> Path:
    """The finalize lock of a store: beside it, outside the Zarr hierarchy."""
    path = Path(store_path)
    return path.parent / f".{path.name}.finalize.lock"


def read_owner(path: Path) -> Owner | None:
    try:
        doc = json.loads(path.read_text())
        return Owner(int(doc["pid"]), str(doc["host"]), doc.get("start"), float(doc["time"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # gone, or being written this instant


class _Heartbeat:
    """Touches the lock file every HEARTBEAT_S seconds until stopped."""

    def __init__(self, path: Path):
        self.path = path
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="diffprobe-lock-heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


@contextlib.contextmanager
def finalize_lock(store_path: str | Path, finished, wait_s: float = WAIT_S):
    """Hold the finalize lock of ``store_path``; yields True, or False if ``finished()``
    became true while waiting for another holder (nothing left to do).

    A stale lock (its holder died: see the module docstring) is taken over; a live
    holder is waited for, up to ``wait_s`` seconds, then StoreError names it.
    """
    path = lock_path(store_path)
    me = Owner.me()
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    watched: tuple[float, float] | None = None  # (mtime seen, since when) for a foreign holder
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if finished():
                yield False
                return
            holder = read_owner(path)
            try:
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                continue
            state = alive(holder) if holder is not None else None
            if holder is None and time.time() - mtime > STALE_AFTER_S:
                state = False  # no owner record (an older diffprobe's empty lock), untouched for long
            if state is None:  # another host, or half-written: is it still being touched?
                now = time.monotonic()
                if watched is None or watched[0] != mtime:
                    watched = (mtime, now)
                state = now - watched[1] < STALE_AFTER_S
            if not state:
                path.unlink(missing_ok=True)  # dead holder: take over
                watched = None
                continue
            if time.monotonic() > deadline:
                who = holder.describe() if holder else "an unknown process"
                raise StoreError(f"{store_path}: finalize has been locked by {who} for over {wait_s:.0f} s; "
                                 f"if that process is gone, delete {path} and re-run")
            time.sleep(0.2)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(me) | {"token": token}, f)
            f.flush()
            os.fsync(f.fileno())
        break
    beat = _Heartbeat(path)
    try:
        yield True
    finally:
        beat.close()
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("token") == token:  # never remove a successor's lock
                path.unlink()


# ----------------------------------------------------------------- schema temp folders


def temp_path(path: Path) -> Path:
    """A fresh temp folder name beside ``path`` that records its owner."""
    me = Owner.me()
    host = me.host.replace("/", "_")
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}-{me.pid}-{me.start or 0}@{host}"


def _temp_owner(folder: Path, prefix: str) -> Owner | None:
    tag = folder.name[len(prefix):]
    ids, sep, host = tag.partition("@")
    parts = ids.split("-")
    if not sep or len(parts) != 3:
        return None
    try:
        return Owner(int(parts[1]), host, int(parts[2]) or None, folder.stat().st_mtime)
    except (ValueError, OSError):
        return None


def stale_temps(path: str | Path) -> list[Path]:
    """Temp folders of ``path``'s schema builds whose builder is gone."""
    path = Path(path)
    prefix = f".{path.name}.tmp-"
    if not path.parent.is_dir():
        return []
    stale = []
    for folder in path.parent.glob(f"{glob.escape(prefix)}*"):
        owner = _temp_owner(folder, prefix)
        state = alive(owner) if owner is not None else None
        if state is None:
            try:
                state = time.time() - folder.stat().st_mtime < STALE_TEMP_S
            except OSError:
                continue
        if not state:
            stale.append(folder)
    return stale


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Delete the temp folders :func:`stale_temps` finds; returns them."""
    found = stale_temps(path)
    for folder in found:
        shutil.rmtree(folder, ignore_errors=True)
    return found
