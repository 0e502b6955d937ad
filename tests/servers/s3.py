"""A real S3-compatible server for the tests: moto's server mode in a child process on 127.0.0.1."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = 'S3 server not available: pip install "moto[server]" s3fs (or pip install -e ".[test]")'
#: Dummy credentials; moto accepts any, and they keep botocore away from the user's real ones.
# Not us-east-1: s3fs sends it as a LocationConstraint, which S3 (and moto) refuse for that region.
KEY, SECRET, REGION = "diffprobe-test", "diffprobe-test-secret", "us-west-2"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    """A running moto S3 server.

    Attributes
    ----------
    endpoint_url
        ``http://127.0.0.1:PORT``.
    key, secret, region
        Credentials and region to use with it.
    """

    endpoint_url: str
    key: str = KEY
    secret: str = SECRET
    region: str = REGION
    #: The server's log: one line per HTTP request (``"GET /bucket?list-type=2..." 200``).
    log_path: Path | None = None
    _process: subprocess.Popen | None = field(default=None, repr=False)

    def requests_since(self, offset: int) -> list[str]:
        """Request lines (``GET /bucket/key``, ``HEAD ...``) the server logged after byte ``offset``
        of its log (``offset = server.log_offset()`` before the code under test)."""
        # werkzeug logs a request once it has answered it: wait until the log stops growing
        size, deadline = -1, time.monotonic() + 3
        while size != self.log_path.stat().st_size and time.monotonic() < deadline:
            size = self.log_path.stat().st_size
            time.sleep(0.15)
        text = self.log_path.read_bytes()[offset:].decode(errors="replace")
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # werkzeug colours some statuses
        return [line.split('"')[1] for line in text.splitlines() if line.count('"') >= 2 and " HTTP/" in line]

    def log_offset(self) -> int:
        return self.log_path.stat().st_size

    @property
    def storage_options(self) -> dict:
        """fsspec/s3fs options: ``fsspec.filesystem("s3", **o)``, ``xr.open_zarr(url, storage_options=o)``."""
        return {"key": self.key, "secret": self.secret, "endpoint_url": self.endpoint_url,
                "client_kwargs": {"region_name": self.region}}

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point botocore/s3fs/obstore in a child process at this server."""
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_DEFAULT_REGION": self.region, "AWS_REGION": self.region,
                "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ENDPOINT_URL_S3": self.endpoint_url,
                "AWS_ALLOW_HTTP": "true"}

    def filesystem(self):
        """A fresh ``s3fs.S3FileSystem`` on this server (no instance cache, no listing cache)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **self.storage_options)

    def new_bucket(self, prefix: str = "test") -> str:
        """Create an empty bucket with a unique name starting with ``prefix``; returns its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.filesystem().mkdir(name)
        return name

    def obstore(self, bucket: str):
        """An ``obstore.store.S3Store`` on ``bucket`` (for ``zarr.storage.ObjectStore``)."""
        from obstore.store import S3Store

        return S3Store(bucket, endpoint=self.endpoint_url, access_key_id=self.key,
                       secret_access_key=self.secret, region=self.region,
                       client_options={"allow_http": True})

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means it is serving
    except OSError:
        return False


def start_s3_server(log_path: Path, timeout: float = 60, tries: int = 3) -> S3Server:
    """Start ``python -m moto.server`` on a free port of 127.0.0.1 and wait until it answers.

    A child process rather than moto's in-process thread: the test process's own work (and
    the GIL) then does not slow the server, and processes the test starts reach it the same way.
    Retries on another port if the chosen one was taken meanwhile; raises RuntimeError with the
    server's log when it does not come up.
    """
    for _ in range(tries):
        port = _free_port()
        log = open(log_path, "ab")
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            if _answers(url):
                return S3Server(endpoint_url=url, log_path=log_path, _process=process)
            time.sleep(0.1)
        if process.poll() is None:
            process.kill()
            process.wait()
    tail = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"moto server did not answer on 127.0.0.1 in {tries} tries; its log:\n{tail}")
