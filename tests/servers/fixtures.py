"""Session fixtures for real servers: ``slurm``, ``s3_server`` and ``chromium``.

Each skips with one line saying what to install when its server cannot be had here, and
cleans up what the session started. ``tests/conftest.py`` imports them.
"""

from __future__ import annotations

import importlib.util
import sys
import time

import pytest

from .browser import CHROMIUM_HINT, PLAYWRIGHT_HINT, find_chromium, launch_chromium
from .s3 import INSTALL_HINT as S3_HINT
from .s3 import start_s3_server
from .slurm import INSTALL_HINT as SLURM_HINT
from .slurm import can_start, find_slurm, start_slurm


def _report(text: str) -> None:
    # Shown with -s or in the captured output of the first test that uses the fixture.
    print(f"[servers] {text}", file=sys.stderr)


@pytest.fixture(scope="session")
def slurm():
    """A SLURM cluster with a usable node: :class:`tests.servers.slurm.Slurm`.

    Found running (``sinfo`` lists an idle/mixed node), else started with
    ``tests/servers/start-slurm.sh`` when the binaries are there and we are root, else skipped.
    At the end, every job of this user that appeared during the session is cancelled.
    """
    cluster = find_slurm()
    if cluster is None:
        why = can_start()
        if why is not None:
            pytest.skip(f"SLURM not available ({why}): {SLURM_HINT}")
        start = time.monotonic()
        cluster, output = start_slurm()
        if cluster is None:
            last = output.splitlines()[-1] if output else "no output"
            pytest.skip(f"SLURM not available (start-slurm.sh: {last}): {SLURM_HINT}")
        _report(f"started SLURM in {time.monotonic() - start:.1f}s: {output.splitlines()[-1]}")
    cluster._known_jobs = set(cluster.jobs())
    yield cluster
    left = cluster.cancel_new_jobs()
    if left:
        _report(f"cancelled {len(left)} SLURM job(s) the tests left: {' '.join(left)}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server on 127.0.0.1: :class:`tests.servers.s3.S3Server`.

    ``.endpoint_url``, ``.key``/``.secret``/``.region`` (dummies), ``.storage_options`` for
    fsspec/xarray, ``.env`` for child processes, ``.filesystem()`` (s3fs), ``.new_bucket()``
    (a fresh empty bucket's name) and ``.obstore(bucket)``. Stopped at the end of the session.
    """
    for module in ("moto.server", "flask", "s3fs"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            pytest.skip(f"{S3_HINT} ({module} missing)")
    start = time.monotonic()
    server = start_s3_server(tmp_path_factory.mktemp("moto") / "moto.log")
    _report(f"moto S3 server at {server.endpoint_url} in {time.monotonic() - start:.1f}s")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def chromium():
    """Headless Chromium: :class:`tests.servers.browser.Chromium`.

    ``.render(url_or_path, width, height, screenshot=None, wait_for=None) -> str`` gives the
    DOM after scripts ran (and saves a full-page PNG); ``.page(width, height)`` is a context
    manager yielding a Playwright page for locators and ``evaluate``; ``.path`` the executable.
    """
    path = find_chromium()
    if path is None:
        pytest.skip(CHROMIUM_HINT)
    if importlib.util.find_spec("playwright") is None:
        pytest.skip(PLAYWRIGHT_HINT)
    with launch_chromium(path) as browser:
        yield browser
