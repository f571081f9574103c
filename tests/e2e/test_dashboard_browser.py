"""The dashboard in a real headless Chromium (Debian's `chromium`, driven over the DevTools
protocol) against the running stack: a pool created over HTTP appears, a worker's KV bar appears
and moves under traffic, the latency charts fill in. Screenshots go to artifacts/.

Installs Chromium with apt-get when it is missing; skipped (with the reason) only if that fails."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from tests.conftest import REAL_MODEL, ROOT, Stack

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "artifacts"
POOL = "dash-e2e"
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
    """The Chromium binary; installs Debian's package when missing, or skips saying why."""
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.skip("chromium is not installed and apt-get is not available to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    started = time.monotonic()
    install = [apt, "install", "-y", "-q", "chromium"]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:  # stale package lists: refresh once and retry
        subprocess.run([apt, "update", "-q"], env=env, capture_output=True, timeout=600)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0 or not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"cannot install chromium with apt-get: {result.stderr.strip()[-400:]}")
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


@pytest.fixture
def page() -> Iterator[Page]:
    binary = ensure_chromium()
    with tempfile.TemporaryDirectory(prefix="poolserve-chromium-") as profile:
        process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
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


def traffic(base_url: str, limit: int, stop: threading.Event) -> Callable[[], None]:
    """Short streamed generations in the pool, back to back, until `stop` (at most `limit`):
    steady load whatever the machine's speed, so some heartbeat sees a live KV handle."""

    def run() -> None:
        prompt = "Tell me a story about a lighthouse keeper and the sea. " * 4
        path = f"/v1/generate/{REAL_MODEL.replace('/', '__')}"
        with httpx.Client(timeout=600) as client:
            for _ in range(limit):
                if stop.is_set():
                    return
                body = {"prompt": prompt, "max_new_tokens": 32, "stream": True}
                headers = {"X-SIE-Pool": POOL}
                with client.stream("POST", base_url + path, json=body, headers=headers) as r:
                    assert r.status_code == 200, r.read()
                    for _line in r.iter_lines():
                        pass

    return run


WORKER_KV = """(() => {
  const row = document.querySelector('tr[data-worker][data-state="ready"]');
  const kv = row && row.querySelector('.kv');
  if (!kv) return null;
  return {used: Number(kv.dataset.kvUsed), total: Number(kv.dataset.kvTotal),
          queue: Number(row.querySelector('td.queue').textContent),
          pool: row.children[3].textContent};
})()"""


def test_dashboard_shows_pool_workers_and_traffic(stack: Stack, page: Page) -> None:
    started = time.monotonic()
    base = stack.base_url
    created = httpx.post(
        f"{base}/v1/pools", json={"name": POOL, "gpus": {"cpu": 1}, "gpu_caps": {"cpu": 1}}
    )
    assert created.status_code == 200, created.text
    stop = threading.Event()
    worker_thread: threading.Thread | None = None
    try:
        page.send("Page.navigate", url=f"{base}/dashboard")
        page.wait_for("Number(document.body.dataset.updates || 0) >= 1", 30, "the first update")
        page.wait_for(
            f'document.querySelector(\'tr[data-pool="{POOL}"][data-state="active"]\') !== null',
            120,
            f"pool {POOL} to show as active",
        )
        lease = page.evaluate(
            f"document.querySelector('tr[data-pool=\"{POOL}\"] td.lease').textContent"
        )
        assert lease.endswith("s") and "m" in lease, lease
        assigned = page.evaluate(
            f'document.querySelector(\'tr[data-pool="{POOL}"] [data-profile="cpu"]\').textContent'
        )
        assert assigned.startswith("cpu: 1 assigned / 1 required"), assigned
        idle = page.wait_for(
            WORKER_KV + f" && ({WORKER_KV}).pool === '{POOL}' && {WORKER_KV}",
            60,
            f"a ready worker of pool {POOL} with a KV bar",
        )
        assert idle["total"] > 0, idle
        updates_before = page.evaluate("Number(document.body.dataset.updates)")
        page.screenshot("dashboard-pool.png")

        worker_thread = threading.Thread(target=traffic(base, 200, stop), daemon=True)
        worker_thread.start()
        busy = page.wait_for(
            f"(() => {{ const kv = {WORKER_KV}; return kv && (kv.used > 0 || kv.queue > 0) && kv; }})()",
            300,
            "the worker's KV bar or queue to move under traffic",
        )
        page.screenshot("dashboard-traffic.png")
        assert busy["used"] > 0, f"queue moved but the KV bar did not: {busy}"
        page.wait_for(
            "document.querySelector('[data-chart=\"TTFT (ingress)\"]') !== null",
            600,
            "the latency charts after the first finished generation",
        )
        time.sleep(3)  # one more heartbeat with traffic on
        page.screenshot("dashboard-charts.png")
        stop.set()
        worker_thread.join(timeout=600)
        page.wait_for(
            f"(() => {{ const kv = {WORKER_KV}; return kv && kv.used === 0 && kv.queue === 0; }})()",
            60,
            "the KV bar to return to empty after traffic",
        )
        assert page.evaluate("Number(document.body.dataset.updates)") > updates_before
        served = page.evaluate(
            "document.querySelector('[data-total=\"requests served\"] .value').textContent"
        )
        assert int(served) >= 2
        decisions = page.evaluate("document.querySelectorAll('ul.decisions li').length")
        assert decisions >= 1  # the worker's move to the pool, with its reason
        page.screenshot("dashboard-after.png")
        exported = httpx.get(f"{base}/metrics", timeout=30).text
        assert (
            f'poolserve_pool_workers{{pool="{POOL}",profile="cpu",state="ready"}} 1.0' in exported
        )
        assert 'poolserve_kv_blocks{profile="cpu",state="free",worker=' in exported
        assert "poolserve_generation_tokens_total" in exported
    finally:
        stop.set()
        if worker_thread is not None:
            worker_thread.join(timeout=300)
        httpx.delete(f"{base}/v1/pools/{POOL}", timeout=30)
    print(f"dashboard browser test: {time.monotonic() - started:.1f} s")
