"""Headless Chromium (Debian's `chromium`) driven over the DevTools protocol, for the dashboard
tests. Installs Chromium with apt-get when it is missing; if that fails the test fails under CI
and skips (saying why) in a local run (`tests.needs.missing`)."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

from tests.conftest import ROOT
from tests.needs import missing

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--window-size=1400,1000",
]


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


class Page:
    """One browser tab over the Chrome DevTools Protocol (just what this test needs)."""

    def __init__(self, socket: ClientConnection) -> None:
        self.socket = socket
        self.ids = itertools.count(1)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        self.socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError:  # e.g. the document is still loading
                value = None
            if value:
                return value
            time.sleep(0.25)
        state = self.evaluate("document.querySelector('main').innerText.slice(0, 2000)")
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; page: {state}")

    def screenshot(self, name: str) -> Path:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        path.write_bytes(base64.b64decode(data["data"]))
        return path


@contextlib.contextmanager
def open_page() -> Iterator[Page]:
    """A fresh headless Chromium (own profile) and its first tab."""
    binary = ensure_chromium()
    with tempfile.TemporaryDirectory(prefix="poolserve-chromium-") as profile:
        process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its helpers (zygote, renderers, crashpad) in one group
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 60
            while not port_file.exists() or not port_file.read_text().strip():
                assert process.poll() is None, "chromium exited at startup"
                assert time.monotonic() < deadline, "chromium did not open its DevTools port"
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
            target = next(t for t in targets if t["type"] == "page")
            with connect(target["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024) as socket:
                tab = Page(socket)
                tab.send("Page.enable")
                tab.send("Runtime.enable")
                tab.send(
                    "Emulation.setDeviceMetricsOverride",
                    width=1400,
                    height=1000,
                    deviceScaleFactor=1,
                    mobile=False,
                )
                yield tab
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
            _stop_group(process.pid)  # helpers outlive the browser and still write the profile


def _stop_group(group: int) -> None:
    """SIGKILL every process left in the group, and wait until none is (so the profile
    directory can be removed)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.05)
