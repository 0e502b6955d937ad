"""A real browser for the tests: Debian's headless Chromium, driven by Playwright.

Playwright's Python package ships its own driver, so ``pip install playwright`` downloads no
browser; it is pointed at the system's Chromium with ``executable_path`` (``playwright
install`` is never needed). Pages are read after their scripts ran, at a given viewport.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

CHROMIUM_HINT = "Chromium not available: install with apt-get install chromium"
PLAYWRIGHT_HINT = 'playwright not installed: pip install playwright (or pip install -e ".[test]")'
#: Flags that let Chromium run headless as root in a container with no GPU and no network.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]


def find_chromium() -> str | None:
    """Path of a Chromium executable on PATH (Debian: /usr/bin/chromium), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _url(target: str | Path) -> str:
    text = str(target)
    if "://" in text:
        return text
    return Path(text).resolve().as_uri()


class Chromium:
    """One headless Chromium for a test session; open with :func:`launch_chromium`.

    Attributes
    ----------
    path
        The Chromium executable.
    """

    def __init__(self, path: str, browser) -> None:
        self.path = path
        self._browser = browser

    @contextlib.contextmanager
    def page(self, width: int = 1280, height: int = 800) -> Iterator:
        """A fresh Playwright ``Page`` (own context: no cookies or cache shared) at a viewport.

        Use its locators (``page.locator("#id").inner_text()``), ``page.evaluate(js)`` and
        ``page.screenshot(path=..., full_page=True)``.
        """
        context = self._browser.new_context(viewport={"width": width, "height": height})
        try:
            yield context.new_page()
        finally:
            context.close()

    def render(self, target: str | Path, width: int = 1280, height: int = 800,
               screenshot: str | Path | None = None, wait_for: str | None = None) -> str:
        """The DOM of ``target`` (a URL or a file path) after its scripts ran, as HTML text.

        Parameters
        ----------
        target
            ``http(s)://`` or ``file://`` URL, or a local path.
        width, height
            Viewport in CSS pixels (390 for a phone, 1280 for a desktop).
        screenshot
            If given, a full-page PNG is saved there (``width`` pixels wide).
        wait_for
            CSS selector to wait for before reading, for content scripts add late.
        """
        with self.page(width, height) as page:
            page.goto(_url(target), wait_until="load")
            if wait_for:
                page.wait_for_selector(wait_for)
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
            return page.content()


@contextlib.contextmanager
def launch_chromium(path: str) -> Iterator[Chromium]:
    """Start Chromium headless with :data:`CHROMIUM_ARGS`.

    Playwright gives each launch a fresh temporary profile and each page its own context.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        try:
            yield Chromium(path, browser)
        finally:
            browser.close()
