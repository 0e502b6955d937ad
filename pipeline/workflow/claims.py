"""Leases: one writer per unit (and per ``--shard``), surviving crashes, expiring.

Two processes on one output must never compute the same unit (zarr-python loses data
when two writers touch one shard, and GPU hours are spent twice), and a process that
dies must not block its units for ever. So every unit a process works on is *claimed*
with a lease, kept alive by a heartbeat and taken over once it expires.

Storage: a folder (on object storage: a prefix) beside the output,
``.<output name>.claims/`` (outside the store's hierarchy, so readers and
consolidation never see it), holding one small JSON object per lease generation::

    unit-00005.000000.json   {"owner", "pid", "host", "label", "created", "heartbeat"}
    shard-1-of-2.000000.json

The protocol uses only three primitives of the storage, which a local file system
and an object store (S3, GCS, Azure) both have:

- *put-if-absent*: a lease is taken by creating generation ``g`` of its name
  exclusively: ``O_CREAT | O_EXCL`` locally, a conditional PUT with
  ``If-None-Match: *`` on S3 (``pipeline.store.location.put_if_absent``). Exactly one
  of several racers succeeds. On object storage the creator also reads its object
  back and checks that it names it (a guard against a server whose conditional put
  is not atomic; S3's is).
- *overwrite own object*: the holder refreshes ``heartbeat`` in its own generation
  object (locally a temp file renamed over it; on S3 a plain PUT, atomic per object).
  No one else ever writes generation ``g``, so this needs no ``If-Match``. (moto 5
  honours ``If-Match`` on PutObject, but s3fs has no way to send it on a write, and
  GCS spells it differently; one new object per generation needs neither.)
- *list*: the generations of a lease are the names under the folder (S3 LISTs are
  strongly consistent with PUTs and DELETEs).

A lease is live while ``now - heartbeat < timeout`` (``DIFFPROBE_LEASE_TIMEOUT``
seconds, default 600; hosts must agree on the time to well within it). On the same
host a holder whose pid no longer exists is dead at once. An expired or dead
generation ``g`` is taken over by creating generation ``g + 1`` exclusively, so two
processes taking over the same lease cannot both win; a creator that then lists a
higher generation than its own backs off (it lost a race), and the winner deletes
the older generations. A holder learns it lost a lease (it stalled past the timeout) when a
higher generation exists; it checks before writing a unit (``confirm``) and stops.

Nothing here touches the store: the runner and the stages decide what a lease
guards (a unit of work, a shard's share, a whole stage run).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Self

from pipeline.store import location

TIMEOUT_ENV = "DIFFPROBE_LEASE_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


def lease_timeout() -> float:
    """Seconds without a heartbeat after which a lease is expired (``DIFFPROBE_LEASE_TIMEOUT``)."""
    value = os.environ.get(TIMEOUT_ENV)
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        from pipeline.errors import ConfigError

        raise ConfigError(f"{TIMEOUT_ENV}={value!r} must be a number of seconds") from None


def claims_folder(output: Path) -> Path:
    """Where the leases of ``output`` (a folder or a URL) live: beside it, outside its hierarchy."""
    output = location.as_location(output)
    return output.parent / f".{output.name}.claims"


#: Reads of a lease object that does not parse, before it counts as cut short by a crash.
READ_ATTEMPTS = 4


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as written in its object."""

    owner: str
    pid: int
    host: str
    label: str
    created: float
    heartbeat: float

    def alive(self, timeout: float, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if now - self.heartbeat >= timeout:
            return False
        if self.host == socket.gethostname() and self.pid > 0:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:  # a live process of another user
                pass
        return True

    def describe(self, timeout: float, now: float | None = None) -> str:
        now = time.time() if now is None else now
        state = "" if self.alive(timeout, now) else ", expired"
        if self.pid < 0:
            return (f"an unreadable lease object ({self.label}, written {now - self.heartbeat:.0f} s ago"
                    f"{state or f'; it expires {timeout:.0f} s after that'})")
        return f"pid {self.pid} on {self.host} ({self.label}, heartbeat {now - self.heartbeat:.0f} s ago{state})"


class Claims:
    """The leases of one output, from the point of view of one process.

    Parameters
    ----------
    output : the stage output the leases guard.
    timeout : seconds without heartbeat before a lease expires (default :func:`lease_timeout`).
    """

    def __init__(self, output: Path, timeout: float | None = None):
        self.folder = claims_folder(output)
        self.remote = location.is_remote(self.folder)
        self.timeout = lease_timeout() if timeout is None else float(timeout)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.owner = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:12]}"
        self._held: dict[str, tuple[int, str]] = {}  # name -> (generation, label)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: set[str] = set()

    # -- objects --------------------------------------------------------------
    def _path(self, name: str, gen: int) -> Path:
        return self.folder / f"{name}.{gen:06d}.json"

    def _entries(self) -> list[str]:
        if self.remote:
            return location.list_files(self.folder)
        try:
            return os.listdir(self.folder)
        except FileNotFoundError:
            return []

    def _generations(self, name: str) -> list[int]:
        entries = self._entries()
        gens = []
        for entry in entries:
            stem, _, ext = entry.rpartition(".")
            base, _, gen = stem.rpartition(".")
            if ext == "json" and base == name and gen.isdigit():
                gens.append(int(gen))
        return sorted(gens)

    def _read(self, name: str, gen: int) -> Holder | None:
        path = self._path(name, gen)
        for attempt in range(READ_ATTEMPTS):
            try:
                # One GET on object storage: a UPath file object pins the ETag of its first request, and a
                # heartbeat that replaces the object meanwhile would fail the read (s3fs FileExpired)
                text = location.read_object(path).decode() if self.remote else path.read_text()
            except FileNotFoundError:
                return None
            try:
                return Holder(**json.loads(text))
            except (ValueError, TypeError):
                # Caught between its creation and its first write (a local O_EXCL file), or a
                # read that overlapped a heartbeat's rewrite: read again before judging it.
                time.sleep(0.05 * (attempt + 1))
        # Still unreadable: cut short by a crash; live until it ages out.
        try:
            mtime = self._modified(path)
        except FileNotFoundError:
            return None
        return Holder("?", -1, "?", name, mtime, mtime)

    def _modified(self, path: Path) -> float:
        if self.remote:  # ask the server: s3fs would answer from a cached listing
            path.fs.invalidate_cache(path.path)
            return path.fs.info(path.path)["LastModified"].timestamp()
        return path.stat().st_mtime

    def _document(self, label: str, created: float) -> bytes:
        holder = Holder(self.owner, self.pid, self.host, label, created, time.time())
        return json.dumps(asdict(holder)).encode()

    # -- the protocol ---------------------------------------------------------
    def holder(self, name: str) -> Holder | None:
        """The current (highest-generation) holder of ``name``, live or not; None if unclaimed."""
        gens = self._generations(name)
        return self._read(name, gens[-1]) if gens else None

    def try_claim(self, name: str, label: str) -> Holder | None:
        """Take lease ``name``; None on success (or if already ours), else the live holder."""
        if name in self._held:
            return None
        gens = self._generations(name)
        gen = 0
        if gens:
            current = self._read(name, gens[-1])
            if current is not None:
                if current.alive(self.timeout):
                    return current
                gen = gens[-1] + 1
            else:
                gen = gens[-1] + 1  # released (or superseded) between listing and reading
        if not self._create(self._path(name, gen), self._document(label, time.time())):
            winner = self._read(name, gen)
            return winner or Holder("?", -1, "?", label, time.time(), time.time())
        now = self._generations(name)
        newest = now[-1] if now else None  # None: removed with the whole folder (the output completed)
        if newest != gen:
            # A racer created a higher generation meanwhile: it supersedes ours.
            self._delete(self._path(name, gen))
            winner = self._read(name, newest) if newest is not None else None
            return winner or Holder("?", -1, "?", label, time.time(), time.time())
        with self._lock:
            self._held[name] = (gen, label)
        for old in gens:
            if old < gen:
                self._delete(self._path(name, old))
        return None

    def _create(self, path: Path, body: bytes) -> bool:
        """Put-if-absent of a lease object; True if this process created it."""
        if self.remote:
            if not location.put_if_absent(path, body):
                return False
            held = self._read(*self._split(path))
            return held is not None and held.owner == self.owner
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _split(self, path: Path) -> tuple[str, int]:
        stem = path.name.rpartition(".")[0]
        base, _, gen = stem.rpartition(".")
        return base, int(gen)

    def _delete(self, path: Path) -> None:
        if self.remote:
            with contextlib.suppress(FileNotFoundError):
                path.fs.rm_file(path.path)
        else:
            path.unlink(missing_ok=True)

    def confirm(self, name: str) -> bool:
        """Whether this process still holds ``name`` (no one took it over after a stall)."""
        if name not in self._held or name in self.lost:
            return False
        return self.confirm_generation(name, self._held[name][0])

    def release(self, name: str) -> None:
        """Give ``name`` up (its work is done, or abandoned). Never deletes another's lease."""
        with self._lock:
            entry = self._held.pop(name, None)
        if entry is not None and self.confirm_generation(name, entry[0]):
            self._delete(self._path(name, entry[0]))

    def confirm_generation(self, name: str, gen: int) -> bool:
        """Generation ``gen`` of ``name`` is the newest and its object names this process."""
        gens = self._generations(name)
        if not gens or gens[-1] != gen:
            return False
        current = self._read(name, gen)
        return current is not None and current.owner == self.owner

    def heartbeat(self) -> None:
        """Refresh every held lease; a lease someone took over goes to ``lost``."""
        with self._lock:
            held = dict(self._held)
        for name, (gen, label) in held.items():
            if not self.confirm_generation(name, gen):
                self.lost.add(name)
                continue
            current = self._read(name, gen)
            path = self._path(name, gen)
            body = self._document(label, current.created if current else time.time())
            if self.remote:  # one PUT replaces the object whole
                path.write_bytes(body)
                continue
            tmp = path.with_name(f".{path.name}.{self.owner.rsplit(':', 1)[-1]}.tmp")
            tmp.write_bytes(body)
            os.replace(tmp, path)

    # -- lifetime -------------------------------------------------------------
    def start(self) -> Claims:
        """Heartbeat every ``timeout / 4`` seconds in a daemon thread until :meth:`close`."""
        if self._thread is None:
            interval = max(0.05, self.timeout / 4)

            def beat():
                from pipeline import faults

                while not self._stop.wait(interval):
                    if faults.stalled():  # an injected stall freezes the whole process
                        continue
                    with contextlib.suppress(Exception):  # a failed beat is retried; expiry covers the rest
                        self.heartbeat()

            self._thread = threading.Thread(target=beat, name="diffprobe-lease-heartbeat", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the heartbeat and release every lease still held."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for name in list(self._held):
            with contextlib.suppress(OSError):
                self.release(name)
        if not self.remote:  # a prefix has no folder object to remove
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only when empty

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- for messages and inspect --------------------------------------------
    def holders(self) -> dict[str, Holder]:
        """Every lease in the folder: name -> current holder (live or not)."""
        entries = self._entries()
        names = {e.rpartition(".")[0].rpartition(".")[0] for e in entries if e.endswith(".json")}
        out = {}
        for name in sorted(names):
            holder = self.holder(name)
            if holder is not None:
                out[name] = holder
        return out

    def live_others(self) -> dict[str, Holder]:
        """Leases held by other processes that are still alive."""
        return {n: h for n, h in self.holders().items() if h.owner != self.owner and h.alive(self.timeout)}


def unit_lease(unit: int) -> str:
    return f"unit-{unit:06d}"


def shard_lease(shard: tuple[int, int]) -> str:
    return f"shard-{shard[0]}-of-{shard[1]}"


def remove_claims(output: Path) -> None:
    """Delete the lease folder of a completed output (no one may hold a lease on it any more)."""
    with contextlib.suppress(OSError):
        location.remove(claims_folder(output))


class UnitClaims:
    """Units of one run, taken one at a time under a unit lease.

    ``take(units, is_done)`` yields each unit this process claimed and that is still
    not done (checked after the claim: another process may have finished it since
    the run started); units held by a live process are skipped and listed in
    ``skipped``. ``finish(unit)`` (after the unit's ``done`` is durable) releases the lease.

    Fencing: a holder that stalled past the lease timeout (a frozen process, a
    paused VM) may wake up after another process took its unit over. Before it writes
    a unit, and again just before it marks the unit done, it asks
    :meth:`still_holds`; once the lease is lost, it writes no ``done`` (the new holder
    does), ``log``s one line and goes on with the units it still can take.
    """

    def __init__(self, claims: Claims, label: str, log=None):
        self.claims = claims
        self.label = label
        self.log = log or (lambda message: None)
        self.skipped: dict[int, Holder] = {}
        self.fenced: list[int] = []

    def take(self, units: Iterable[int], is_done) -> Iterator[int]:
        for unit in units:
            holder = self.claims.try_claim(unit_lease(unit), f"{self.label}, unit {unit}")
            if holder is not None:
                if not is_done(unit):  # (a unit finished meanwhile is no one's any more)
                    self.skipped[unit] = holder
                continue
            if is_done(unit):
                self.claims.release(unit_lease(unit))
                continue
            yield unit

    def still_holds(self, unit: int) -> bool:
        """Whether this process still holds the unit's lease (its generation is the newest and
        names this process); if not, log one line (once per unit) and return False."""
        if self.claims.confirm(unit_lease(unit)):
            return True
        if unit not in self.fenced:
            self.fenced.append(unit)
            holder = self.claims.holder(unit_lease(unit))
            who = holder.describe(self.claims.timeout) if holder else "another process"
            self.log(f"lost the lease on unit {unit} to {who} after a stall longer than "
                     f"{self.claims.timeout:.0f} s; not marking it done (its new holder does)")
        return False

    def finish(self, unit: int) -> None:
        self.claims.release(unit_lease(unit))


def _ranges(units: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    parts, start = [], None
    for i, u in enumerate(units):
        if start is None:
            start = u
        if i + 1 == len(units) or units[i + 1] != u + 1:
            parts.append(str(start) if start == u else f"{start}-{u}")
            start = None
    return ", ".join(parts)


def lease_report(output: Path, pending: list[int]) -> list[str]:
    """Lines for ``diffprobe inspect``: which units are missing, and who held them.

    A shard that died leaves its ``shard-i-of-N`` lease behind (expired), so the units
    of its share are attributed to it; a unit lease left behind names the unit that
    was being computed.
    """
    claims = Claims(output)
    holders = claims.holders()
    if not pending and not holders:
        return []
    lines = []
    if pending:
        lines.append(f"missing   {len(pending)} unit(s) not done: {_ranges(pending)}")
    for name, holder in holders.items():
        if name.startswith("shard-"):
            i, n = (int(x) for x in name[len("shard-"):].split("-of-"))
            mine = [u for u in pending if u % n == i]
            lines.append(f"          shard {i}/{n} ({len(mine)} of them: {_ranges(mine) or 'none'}) "
                         f"held by {holder.describe(claims.timeout)}")
        elif name.startswith("unit-"):
            lines.append(f"          unit {int(name[len('unit-'):])} claimed by {holder.describe(claims.timeout)}")
        else:
            lines.append(f"          {name} held by {holder.describe(claims.timeout)}")
    if pending and not any(h.alive(claims.timeout) for h in holders.values()):
        lines.append("          no live process holds them: run the stage again (with the same --shard) to finish")
    return lines
