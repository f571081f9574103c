"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright) against
the running stack: a pool created over HTTP appears, a worker's KV bar appears and moves under
traffic, the latency charts fill in. Screenshots go to artifacts/.

Chromium comes from `tests.browser` (installed with apt-get when missing); one that cannot be
installed fails the test under CI and skips it in a local run."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from playwright.sync_api import Page

from tests.browser import open_page, screenshot, wait_for
from tests.conftest import REAL_MODEL, Stack

pytestmark = pytest.mark.e2e

POOL = "dash-e2e"


@pytest.fixture
def page() -> Iterator[Page]:
    with open_page() as tab:
        yield tab


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
        page.goto(f"{base}/dashboard")
        wait_for(page, "Number(document.body.dataset.updates || 0) >= 1", 30, "the first update")
        wait_for(
            page,
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
        idle = wait_for(
            page,
            WORKER_KV + f" && ({WORKER_KV}).pool === '{POOL}' && {WORKER_KV}",
            60,
            f"a ready worker of pool {POOL} with a KV bar",
        )
        assert idle["total"] > 0, idle
        updates_before = page.evaluate("Number(document.body.dataset.updates)")
        screenshot(page, "dashboard-pool.png")

        worker_thread = threading.Thread(target=traffic(base, 200, stop), daemon=True)
        worker_thread.start()
        busy = wait_for(
            page,
            f"(() => {{ const kv = {WORKER_KV}; return kv && (kv.used > 0 || kv.queue > 0) && kv; }})()",
            300,
            "the worker's KV bar or queue to move under traffic",
        )
        screenshot(page, "dashboard-traffic.png")
        assert busy["used"] > 0, f"queue moved but the KV bar did not: {busy}"
        wait_for(
            page,
            "document.querySelector('[data-chart=\"TTFT (ingress)\"]') !== null",
            600,
            "the latency charts after the first finished generation",
        )
        time.sleep(3)  # one more heartbeat with traffic on
        screenshot(page, "dashboard-charts.png")
        stop.set()
        worker_thread.join(timeout=600)
        wait_for(
            page,
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
        screenshot(page, "dashboard-after.png")
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
