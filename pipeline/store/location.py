"""Where a store lives: a local path or an fsspec URL (``s3://``, ``gs://``, ``az://``, ``memory://``).

A *location* is a :class:`pathlib.Path` for local paths and a ``upath.UPath``
(universal-pathlib: the pathlib API over fsspec) for URLs, so code that joins,
tests and reads paths (``/``, ``.exists()``, ``.read_text()``, ``.mkdir()``) works
on both. universal-pathlib rather than bare fsspec because most of diffprobe's path
code then stays as it is; zarr opens the same locations through
``zarr.storage.FsspecStore`` (:func:`zarr_store`), whose reads are byte-range GETs,
so a (block, timestep) slice still reads only its inner chunks (the shard index
gives their ranges).

Reads and writes take different clients on ``s3://``: :func:`zarr_store` opens a store
for reading through obstore's ``ObjectStore`` where the options translate
(:func:`obstore_reader`: a Rust HTTP client, several times s3fs's throughput for the
same CPU), and for writing through s3fs, whose conditional puts carry the protocol below.

Config fields that name inputs (a dataset ``root``, a model ``path`` / ``config``) hold a
URL as :class:`URLText`: a ``str`` that carries the workflow's ``storage_options`` to where
it is opened, and is the bare URL everywhere else (hash, attrs, logs).

Credentials come from the backend's usual places (``AWS_*`` variables,
``~/.aws/credentials``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...) and from the
workflow's top-level ``storage_options:`` mapping (e.g. ``endpoint_url``). A
location's ``str()`` is its bare URL: storage options travel inside the UPath (it
pickles with them, so a dask worker opens the store itself) and are never written
into attrs, logs or reports, which only ever see ``str(location)``.

The write protocol on object storage, where there is no rename and no lock file
(the local protocol is described in ``pipeline/store/layout.py``):

1. **Atomic schema creation.** The schema is built in memory, then every object but
   the root ``zarr.json`` is uploaded, then the root ``zarr.json`` is put *if absent*
   (``If-None-Match: *``). That conditional put is the commit point: without the
   root ``zarr.json`` there is no group for zarr, xarray or diffprobe, and a racer
   whose put loses opens the winner's store. The objects a loser uploaded are the
   schema's metadata and coordinates, the same bytes as the winner's (a stage hash
   fixes them), never data. A build killed before its commit leaves only such
   objects, which the next build overwrites.
2. **One writer per shard**: units are split by ``--shard i/N`` and, within a run, by
   leases (``pipeline.workflow.claims``: one put-if-absent object per lease
   generation, beside the store); each unit's shards are written whole by one PUT
   each (no read-modify-write).
3. **``done`` after data**: ``done`` is chunked per unit (one object per unit), put
   after the unit's data PUTs have returned (S3 PUTs are durable and
   read-after-write consistent when they return).
4. **A single finalizer**: the process that finds every unit done puts a claim
   object beside the store if absent (``.<name>.finalize-claim``: owner + time);
   the winner stamps ``complete`` and writes consolidated metadata once, then
   deletes the claim. A claim older than :data:`STALE_CLAIM_S` (its owner died) is
   taken over by the next finalizer.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

from pipeline.errors import ConfigError, StoreError

#: A finalize claim older than this (seconds) belongs to a dead finalizer.
STALE_CLAIM_S = 600
CLOUD_HINT = "pip install 'diffprobe[cloud]'"

Location = Union[Path, "UPath"]  # noqa: F821 -- upath is imported lazily


#: Backends whose file systems cache directory listings. diffprobe turns the cache off: s3fs
#: answers ``exists``, ``info`` and even ``cat_file`` (which asks for the size first) from a
#: cached listing of the parent, so an object put after a listing (by another process, or
#: by this one while a second thread was listing) reads as missing. Seen as a lease just
#: taken that its own taker could not read back, which left a unit undone.
LISTING_CACHE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})


def is_url(text: str) -> bool:
    """True for ``scheme://...`` (not ``file://``, and not a Windows drive letter)."""
    scheme, sep, _ = str(text).partition("://")
    return bool(sep) and len(scheme) > 1 and scheme != "file"


def is_remote(path: Any) -> bool:
    """True when ``path`` is a URL location (a UPath, or a URL string)."""
    return not isinstance(path, Path) and (is_url(str(path)) or hasattr(path, "storage_options"))


class URLText(str):
    """A URL from a workflow's config (a dataset ``root``, a model ``path``) that carries the
    workflow's ``storage_options`` to where it is opened (:func:`parse`).

    It is a plain ``str`` for everything else: it compares, hashes, prints and serialises
    (JSON, the stage hash, attrs) as the bare URL, so the options (credentials, say)
    never reach a hash, a store or a log; it pickles with them, for DataLoader workers.
    """

    storage_options: Mapping[str, Any]

    def __new__(cls, url: str, storage_options: Mapping[str, Any] | None = None):
        text = super().__new__(cls, url)
        text.storage_options = dict(storage_options or {})
        return text

    def __reduce__(self):
        return URLText, (str(self), self.storage_options)


def parse(text: str | os.PathLike, base_dir: Path | None = None,
          storage_options: Mapping[str, Any] | None = None) -> Location:
    """A config string -> a location: a UPath for URLs, else a Path relative to ``base_dir``.

    Raises ConfigError naming the extra to install when the URL's fsspec backend is
    missing (e.g. gcsfs for ``gs://``), or when the scheme is unknown.
    """
    if isinstance(text, URLText):
        storage_options = {**text.storage_options, **dict(storage_options or {})}
        text = str(text)
    elif hasattr(text, "storage_options"):
        return text
    text = os.fspath(text) if not isinstance(text, str) else text
    text = text.removeprefix("file://")
    if not is_url(text):
        p = Path(text).expanduser()
        return p if p.is_absolute() or base_dir is None else (base_dir / p).resolve()
    import fsspec
    from upath import UPath

    protocol = text.partition("://")[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        raise ConfigError(f"{text}: the fsspec backend for {protocol}:// is not installed "
                          f"({str(exc).splitlines()[0]}); {CLOUD_HINT}") from None
    except ValueError:
        raise ConfigError(f"{text}: unknown URL scheme {protocol}://; use a local path or "
                          f"s3://, gs://, az://, memory://") from None
    options = dict(storage_options or {})
    if protocol in LISTING_CACHE_PROTOCOLS:
        if options.get("use_listings_cache"):
            raise ConfigError(f"{text}: storage_options use_listings_cache must stay off: leases, claims and "
                              "commits are decided by what is on the server now; remove it")
        options["use_listings_cache"] = False
    return UPath(text, **options)


def as_location(path: str | os.PathLike | Location) -> Location:
    """``parse`` for values already resolved (a Path, UPath or absolute string); idempotent."""
    if isinstance(path, Path) or (hasattr(path, "storage_options") and not isinstance(path, URLText)):
        return path
    return parse(path)


def zarr_store(path: Location | str, read_only: bool = False, client: str | None = None):
    """What ``zarr.open_group`` / ``xr.open_zarr`` take for ``path``: a str locally; remotely a
    ``zarr.storage.ObjectStore`` (obstore) for reads from ``s3://`` where :func:`obstore_reader`
    can build one, else (or with ``client="fsspec"``) an ``FsspecStore``."""
    path = as_location(path)
    if not is_remote(path):
        return str(path)
    if read_only and client != "fsspec":
        reader = obstore_reader(path)
        if reader is not None:
            return reader
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(str(path), storage_options=dict(path.storage_options), read_only=read_only)


#: Choose the client of remote reads: ``obstore`` (default where it applies) or ``fsspec``.
READER_ENV = "DIFFPROBE_OBJECT_READER"
#: s3fs ``storage_options`` -> obstore ``S3Store`` config (the options obstore understands).
_S3_OPTIONS = {"key": "access_key_id", "secret": "secret_access_key", "token": "session_token",
               "endpoint_url": "endpoint", "anon": "skip_signature"}


def obstore_options(options: Mapping[str, Any]) -> dict | None:
    """s3fs ``storage_options`` as ``obstore.store.S3Store`` keyword arguments; None when one
    has no obstore equivalent (the read then goes through s3fs, which understands it)."""
    config: dict[str, Any] = {}
    for name, value in options.items():
        if name in _S3_OPTIONS:
            config[_S3_OPTIONS[name]] = value
        elif name == "client_kwargs" and set(value) <= {"region_name", "endpoint_url"}:
            if "region_name" in value:
                config["region"] = value["region_name"]
            if "endpoint_url" in value:
                config["endpoint"] = value["endpoint_url"]
        elif name not in ("skip_instance_cache", "use_listings_cache"):
            return None
    if config.get("skip_signature") is False:
        del config["skip_signature"]
    endpoint = config.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")
    client = {"allow_http": True} if str(endpoint).startswith("http://") else {}
    return {"config": config, "client_options": client}


def obstore_reader(path: Location):
    """A read-only ``zarr.storage.ObjectStore`` on ``path`` (an ``s3://`` UPath), or None.

    None (the caller falls back to FsspecStore) when obstore is not installed, the scheme
    is not ``s3``, a storage option has no obstore equivalent, no region is known for
    AWS itself (options, ``AWS_REGION``, ``~/.aws/config``: s3fs follows a bucket's region
    redirect, obstore does not), or :data:`READER_ENV` is ``fsspec``. obstore's Rust HTTP client fetches a byte range with a fraction of
    s3fs's CPU (benchmarks/s3_throughput.py). Credentials not given in the options come
    from botocore's chain (``AWS_*`` variables, ``~/.aws/credentials``, profiles,
    instance roles), as s3fs's would.
    """
    choice = os.environ.get(READER_ENV, "").strip().lower()
    if choice not in ("", "obstore", "fsspec"):
        raise ConfigError(f"{READER_ENV} must be 'obstore' or 'fsspec'; got {choice!r}")
    if choice == "fsspec" or str(path).partition("://")[0] not in ("s3", "s3a"):
        return None
    try:
        from obstore.store import S3Store
        from zarr.storage import ObjectStore
    except ImportError:
        return None
    options = obstore_options(path.storage_options)
    if options is None:
        return None
    config = options["config"]
    if "region" not in config and "endpoint" not in config:
        region = _configured_region()
        if region is None:
            return None  # s3fs finds a bucket's region itself; obstore would sign for us-east-1
        config["region"] = region
    bucket, _, prefix = str(path).partition("://")[2].partition("/")
    provider = None
    if "access_key_id" not in config and not config.get("skip_signature"):
        provider = _botocore_credentials()
    store = S3Store(bucket, prefix=prefix.rstrip("/") or None, client_options=options["client_options"],
                    credential_provider=provider, **config)
    return ObjectStore(store, read_only=True)


def _configured_region() -> str | None:
    """The AWS region from the environment or ``~/.aws/config`` (botocore's lookup), if any."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        return region
    try:
        import botocore.session
    except ImportError:
        return None
    return botocore.session.Session().get_config_variable("region")


def _botocore_credentials():
    """An obstore credential provider over botocore's credential chain, or None without botocore."""
    try:
        import botocore.session
    except ImportError:
        return None
    from datetime import UTC, datetime, timedelta

    credentials = botocore.session.Session().get_credentials()
    if credentials is None:
        return None

    def provide() -> dict:
        frozen = credentials.get_frozen_credentials()  # refreshes temporary credentials
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key,
                "token": frozen.token, "expires_at": datetime.now(UTC) + timedelta(minutes=10)}

    return provide


def put_if_absent(path: Location, data: bytes) -> bool:
    """Write ``data`` at ``path`` only if nothing is there; True if this call wrote it.

    Atomic on S3 (``If-None-Match: *``), GCS and Azure, and with ``O_EXCL`` locally.
    """
    if not is_remote(path):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    try:
        path.fs.pipe_file(path.path, data, mode="create")
    except FileExistsError:
        return False
    except OSError as exc:
        # Some servers answer a lost conditional put with 412 rather than the mapped error.
        if "PreconditionFailed" in str(exc) or "412" in str(exc):
            return False
        raise
    return True


def remove(path: Location) -> None:
    """Delete a store (folder or prefix) or a file."""
    import shutil

    if is_remote(path):
        if path.fs.exists(path.path):
            path.fs.rm(path.path, recursive=True)
    elif path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def stored_bytes(path: Location) -> int:
    """Bytes of every file (object) under ``path``."""
    if is_remote(path):
        return int(path.fs.du(path.path, total=True))
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def free_bytes(path: Location) -> int | None:
    """Free space where ``path`` would be written; None on object storage (unknown there)."""
    import shutil

    if is_remote(path):
        return None
    parent = Path(path)
    while not parent.exists():
        parent = parent.parent
    return shutil.disk_usage(parent).free


def commit_remote_group(path: Location, memory) -> None:
    """Step 1 of the object-storage protocol: upload the schema built in the zarr
    ``MemoryStore`` ``memory``, the root ``zarr.json`` last and only if absent (the commit point)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    if (path / "zarr.json").exists():
        return  # committed by another process already
    proto = default_buffer_prototype()

    async def items():
        return {k: (await memory.get(k, prototype=proto)).to_bytes() async for k in memory.list()}

    objects = sync(items())
    root = objects.pop("zarr.json")
    fs, base = path.fs, path.path.rstrip("/")
    if objects:
        fs.pipe({f"{base}/{key}": value for key, value in objects.items()})
    if not put_if_absent(path / "zarr.json", root) and not (path / "zarr.json").exists():
        raise StoreError(f"{path}: lost the schema commit but no root zarr.json is there")


def finalize_claim(store_path: Location) -> Location:
    """Where the finalize claim of ``store_path`` lives (beside it, outside its hierarchy)."""
    return store_path.parent / f".{store_path.name}.finalize-claim"


def claim_is_stale(claim: Location) -> bool:
    """Whether a finalize claim is there and older than :data:`STALE_CLAIM_S` (its owner died)."""
    try:
        held = json.loads(claim.read_bytes())
    except (OSError, ValueError):  # gone, or not readable now: not known to be stale
        return False
    return time.time() - float(held.get("time", 0)) >= STALE_CLAIM_S


def claim_finalize(store_path: Location) -> Location | None:
    """Step 4: the claim object for finalizing ``store_path``, or None if another live process holds it."""
    claim = finalize_claim(store_path)
    body = json.dumps({"owner": f"{socket.gethostname()}:{os.getpid()}", "time": time.time()}).encode()
    if put_if_absent(claim, body):
        return claim
    if not claim_is_stale(claim):
        return None
    remove(claim)  # its owner died mid-finalize; finalizing is idempotent, so take over
    return claim if put_if_absent(claim, body) else None


def save_figure(fig, path: Location | str, dpi: int) -> Location:
    """``fig.savefig`` as PNG at a local path or URL (matplotlib writes only to local files)."""
    import io

    path = as_location(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    path.write_bytes(buf.getvalue())
    return path


def write_csv(frame, path: Location | str) -> None:
    """``frame.to_csv(path, index=False)`` at a local path or URL (pandas would drop the storage options)."""
    as_location(path).write_text(frame.to_csv(index=False))


def read_object(path: Location) -> bytes:
    """The whole object at ``path`` (a URL location) in one GET, as the server holds it now.

    ``start=0`` makes it one ranged GET: without a range s3fs first asks the size (a HEAD,
    or a listing cache) to decide whether to split the download."""
    return path.fs.cat_file(path.path, start=0)


def exists_now(path: Location) -> bool:
    """``path.exists()`` as the storage says now (s3fs would answer from its listing cache)."""
    if is_remote(path):
        path.fs.invalidate_cache(path.path)
        return bool(path.fs.exists(path.path))
    return path.exists()


def list_files(folder: Location) -> list[str]:
    """Every file (object) under ``folder`` (a folder, or a prefix on object storage), as
    ``/``-separated paths relative to it: one listing, no stat of each."""
    if is_remote(folder):
        fs, base = folder.fs, folder.path.rstrip("/")
        fs.invalidate_cache(base)  # s3fs caches listings: a listing must see what was just written
        try:
            found = fs.find(base)
        except FileNotFoundError:
            return []
        return [p[len(base) + 1:] for p in found if p.startswith(base + "/")]
    out = []
    for dirpath, _, files in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        out += [name if rel == "." else f"{rel}/{name}".replace(os.sep, "/") for name in files]
    return out
