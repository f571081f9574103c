"""Headless Chromium for the dashboard tests, driven by Playwright for Python (pinned in
requirements.lock) with Debian's `chromium` as the browser (`executable_path`: Playwright's own
browser download is never used). Installs Chromium with apt-get when it is missing; if that
fails the test fails under CI and skips (saying why) in a local run (`tests.needs.missing`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, ViewportSize, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests.conftest import ROOT
from tests.needs import missing

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "artifacts"
FLAGS = [
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT: ViewportSize = {"width": 1400, "height": 1000}


def ensure_chromium() -> str:
    """The Chromium binary; installs Debian's package when missing (`missing` otherwise)."""
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    apt = shutil.which("apt-get")
    if apt is None:
        missing("chromium is not installed and apt-get is not available to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    started = time.monotonic()
    install = [apt, "install", "-y", "-q", "chromium"]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:  # stale package lists: refresh once and retry
        subprocess.run([apt, "update", "-q"], env=env, capture_output=True, timeout=600)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0 or not os.access(CHROMIUM, os.X_OK):
        missing(f"cannot install chromium with apt-get: {result.stderr.strip()[-400:]}")
    print(f"installed chromium in {time.monotonic() - started:.1f} s")
    return CHROMIUM


@contextlib.contextmanager
def open_page() -> Iterator[Page]:
    """A fresh headless Chromium (its own profile, 1400x1000) and its first tab."""
    binary = ensure_chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=binary, headless=True, args=FLAGS)
        try:
            yield browser.new_context(viewport=VIEWPORT).new_page()
        finally:
            browser.close()


def wait_for(page: Page, expression: str, timeout_s: float, what: str) -> Any:
    """The first truthy value of a JavaScript expression, polled until `timeout_s` (an expression
    that throws, e.g. while a document loads, counts as not yet); on a timeout an AssertionError
    that says what was awaited and what the page showed."""
    predicate = f"() => {{ try {{ return ({expression}); }} catch (error) {{ return null; }} }}"
    try:
        return page.wait_for_function(predicate, timeout=timeout_s * 1000).json_value()
    except PlaywrightTimeout:
        shown = page.evaluate("(document.querySelector('main') || document.body).innerText")
        raise AssertionError(
            f"timed out after {timeout_s} s waiting for {what}; page: {str(shown)[:2000]}"
        ) from None


def screenshot(page: Page, name: str) -> Path:
    """The whole page as artifacts/NAME."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=path, full_page=True)
    return path
