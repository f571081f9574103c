"""Pools as tenants through the whole stack (fake engine, 2 ingress replicas, API keys on, usage
in 2 ledger shards):

- usage equals what the clients counted from the `usage` blocks they received, exactly, after
  an ingress replica is killed mid-traffic and after both TenantLedger shards restart; the
  same numbers in `GET /v1/usage` (merged over the shards), `status.usage` and `/metrics`;
- a tokens-per-minute limit holds across both ingress replicas (the window is shortened to
  `WINDOW_S` by `tenancy.limit_window_seconds`: two windows of 10 s instead of two minutes);
- per-key limits (requests per window, concurrent streams) with their 429 codes and
  Retry-After, and `/v1/usage` needing an admin key;
- fair share at 3x overload: two shared pools of equal share on the default worker, one sending
  10x the other's traffic: the light one is admitted within 1.5x its unloaded TTFT p50 and the
  heavy one absorbs the refusals; the same with a high- and a low-priority class;
- a pool created with the real sie-sdk: traffic through it, then its `status.usage`.

Runs on the session cluster, or alone on its own (no real engine is loaded then)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.tenancy.keys import key_id
from app.tenancy.limits import estimate_tokens
from tests.conftest import FAKE_MODEL, Stack, _wait_ready
from tests.sie import SIERunner
from tests.support.local_serve import delete_app_in_background

pytestmark = pytest.mark.e2e

APP = "tenancy"
FAST_MODEL = "fake/fast"  # usage and token limits: short requests
SLOW_MODEL = FAKE_MODEL  # fairness: 100 ms to each token, 4 requests fit the KV cache
WINDOW_S = 10.0
API_KEY = "sk-tenant-a"
LIMITED_KEY = "sk-tenant-b"
ADMIN_KEY = "sk-operator"
TPM = 600
KEY_RPM = 4


@dataclass
class Tenancy:
    base_url: str

    def headers(self, key: str = API_KEY, pool: str | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {key}"}
        if pool is not None:
            headers["X-SIE-Pool"] = pool
        return headers

    def create_pool(self, name: str, **spec: Any) -> dict[str, Any]:
        response = httpx.post(
            f"{self.base_url}/v1/pools",
            json={"name": name, **spec},
            headers=self.headers(ADMIN_KEY),
            timeout=30,
        )
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def usage(self, **params: Any) -> dict[str, Any]:
        response = httpx.get(
            f"{self.base_url}/v1/usage", params=params, headers=self.headers(ADMIN_KEY), timeout=30
        )
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def pool(self, name: str) -> dict[str, Any]:
        response = httpx.get(f"{self.base_url}/v1/pools/{name}", headers=self.headers(), timeout=30)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]


def app_args(keys_dir: Path) -> dict[str, Any]:
    (keys_dir / "api").write_text(f"{API_KEY}\n{LIMITED_KEY}\n")
    (keys_dir / "admin").write_text(ADMIN_KEY + "\n")
    return {
        "engine_adapter": "tests.fakes.fake_engine:FakeAdapter",
        "models": [
            {"id": FAST_MODEL, "engine": {"extra_args": {"token_delay_s": 0.002}}},
            {
                "id": SLOW_MODEL,
                "engine": {"extra_args": {"token_delay_s": 0.1, "kv_blocks": 4}},
            },
        ],
        "profiles": [{"name": "cpu", "num_cpus": 0}],
        "ingress": {"num_replicas": 2},
        "kv": {"max_waiting_requests": 4, "max_wait_seconds": 3},
        "worker_heartbeat_seconds": 0.5,
        "pools": {"control_interval_seconds": 0.5, "provisioning_retry_after_seconds": 1},
        "tenancy": {
            "limit_window_seconds": WINDOW_S,
            "accrual_interval_seconds": 0.5,
            "stream_lease_seconds": 6,
            "usage_shards": 2,
            "key_limits": {
                key_id(LIMITED_KEY): {"requests_per_minute": KEY_RPM, "concurrent_streams": 1}
            },
        },
        "security": {
            "api_keys_file": str(keys_dir / "api"),
            "admin_keys_file": str(keys_dir / "admin"),
        },
    }


@pytest.fixture(scope="module")
def tenancy(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenancy]:
    from ray import serve

    from app.builder import build_app

    base = f"{stack.base_url}/{APP}"
    args = app_args(tmp_path_factory.mktemp("keys"))
    serve.run(
        build_app(args),
        name=APP,
        route_prefix=f"/{APP}",
        blocking=False,
        external_scaler_enabled=True,
    )
    try:
        _wait_ready_keyed(base)
        yield Tenancy(base)
    finally:
        with contextlib.suppress(Exception):
            delete_app_in_background(APP)


def _wait_ready_keyed(base: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            report = httpx.get(
                f"{base}/health", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5
            ).json()
            if len(report["models"]) == 2 and all(m["state"] == "loaded" for m in report["models"]):
                return
        time.sleep(1)
    _wait_ready(base)  # raises with the reason


# --- clients that count what they received --------------------------------------------------


@dataclass
class Tally:
    """What the clients counted from the usage blocks they received, per pool."""

    requests: Counter[str] = field(default_factory=Counter)
    prompt: Counter[str] = field(default_factory=Counter)
    completion: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)

    def add(self, pool: str, usage: dict[str, Any]) -> None:
        self.requests[pool] += 1
        self.prompt[pool] += usage["prompt_tokens"]
        self.completion[pool] += usage["completion_tokens"]


def sse_usage(text: str) -> dict[str, Any] | None:
    """The usage block of an SSE body (OpenAI's usage event or SIE's terminal event), if the
    stream ended properly."""
    usage = None
    if "data: [DONE]" not in text:
        return None
    for line in text.splitlines():
        if line.startswith("data: {"):
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                return None
            usage = event.get("usage") or usage
    return usage


async def one_request(
    client: httpx.AsyncClient, tenancy: Tenancy, kind: int, pool: str | None
) -> dict[str, Any] | None:
    """One of five request shapes; the usage block the client received, or None."""
    headers = tenancy.headers(pool=pool)
    prompt = "one two three " * (1 + kind)
    if kind == 0:
        body = {
            "model": FAST_MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 7,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        response = await client.post("/v1/chat/completions", json=body, headers=headers)
        return sse_usage(response.text) if response.status_code == 200 else None
    if kind == 1:
        body = {
            "model": FAST_MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 9,
        }
        response = await client.post("/v1/chat/completions", json=body, headers=headers)
    elif kind == 2:
        body = {"model": FAST_MODEL, "prompt": prompt, "max_tokens": 5}
        response = await client.post("/v1/completions", json=body, headers=headers)
    elif kind == 3:
        body = {"prompt": prompt, "max_new_tokens": 6}
        response = await client.post("/v1/generate/fake__fast", json=body, headers=headers)
    else:
        body = {"prompt": prompt, "max_new_tokens": 4, "stream": True}
        response = await client.post("/v1/generate/fake__fast", json=body, headers=headers)
        return sse_usage(response.text) if response.status_code == 200 else None
    if response.status_code != 200:
        return None
    usage: dict[str, Any] | None = response.json().get("usage")
    return usage


def kill_replica(deployment: str, index: int = 0) -> str:
    import ray

    names = sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{APP}#{deployment}#")
    )
    ray.kill(ray.get_actor(names[index], namespace="serve"), no_restart=True)
    return names[index]


def ledger_window(deployment: str) -> Any:
    """A TenantLedger shard's own all-time counts (`usage_window`), not merged."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=APP)
    return handle.usage_window.remote(None).result(timeout_s=30)


def eventually(check: Any, timeout_s: float = 40.0) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, AssertionError, KeyError):
            last = check()
            if last:
                return last
        time.sleep(0.5)
    return check()


# --- usage ----------------------------------------------------------------------------------


def test_usage_is_exact_after_an_ingress_replica_and_the_ledger_restart(tenancy: Tenancy) -> None:
    tenancy.create_pool("billing", gpus={"cpu": 1}, shared=True)
    tally = Tally()
    killed: list[str] = []

    async def worker(client: httpx.AsyncClient, index: int, stop: float) -> None:
        n = index
        while time.monotonic() < stop:
            pool = "billing" if n % 3 else None
            try:
                usage = await one_request(client, tenancy, n % 5, pool)
            except httpx.HTTPError:
                usage = None
            if usage is None:
                tally.failures[pool or "default"] += 1
            else:
                tally.add(pool or "default", usage)
            n += 7

    async def traffic() -> None:
        stop = time.monotonic() + 14
        async with httpx.AsyncClient(base_url=tenancy.base_url, timeout=60) as client:
            tasks = [asyncio.create_task(worker(client, i, stop)) for i in range(8)]
            await asyncio.sleep(5)
            killed.append(await asyncio.to_thread(kill_replica, "Ingress"))
            await asyncio.gather(*tasks)

    before = tenancy.usage()["pools"]
    asyncio.run(traffic())
    print(f"killed {killed}; client tally {dict(tally.requests)}, failures {dict(tally.failures)}")
    assert tally.requests["billing"] > 20 and tally.requests["default"] > 10

    def expected(pool: str) -> dict[str, int]:
        old = before.get(pool, {})
        return {
            "requests": old.get("requests", 0) + tally.requests[pool],
            "prompt_tokens": old.get("prompt_tokens", 0) + tally.prompt[pool],
            "completion_tokens": old.get("completion_tokens", 0) + tally.completion[pool],
        }

    def observed(report: dict[str, Any], pool: str) -> dict[str, int]:
        row = report["pools"].get(pool, {})
        return {
            name: row.get(name, 0) for name in ("requests", "prompt_tokens", "completion_tokens")
        }

    def counted(report: dict[str, Any], pool: str) -> bool:
        """Every usage block a client received is counted; the only extra requests are ones the
        kill cut after the ledger counted them (their tokens were generated, as billed by
        OpenAI for a dropped connection): at most the clients' failures, all at the kill."""
        got, want = observed(report, pool), expected(pool)
        extra = got["requests"] - want["requests"]
        if extra == 0:
            return got == want
        return 0 < extra <= tally.failures[pool] and all(got[k] > want[k] for k in want)

    def settled() -> dict[str, Any] | None:
        report = tenancy.usage()
        return report if all(counted(report, p) for p in ("billing", "default")) else None

    report = eventually(settled)
    for pool in ("billing", "default"):
        assert counted(report, pool), (pool, observed(report, pool), expected(pool))

    # the report is the shards' sum: the worker bills to one, worker-seconds are shard 0's
    windows = [ledger_window(name) for name in ("TenantLedger", "TenantLedger-1")]
    assert sum(sum(c.requests for c in w.counts.values()) for w in windows) == sum(
        row["requests"] for row in report["usage"]
    )
    assert not windows[1].seconds and windows[0].seconds

    # both shards restart: nothing acknowledged is lost
    kill_replica("TenantLedger")
    kill_replica("TenantLedger-1")
    restored = eventually(lambda: tenancy.usage(), 60)
    for pool in ("billing", "default"):
        assert observed(restored, pool) == observed(report, pool), pool
    assert restored["total"]["requests"] >= tally.requests.total()

    # the same numbers in status.usage (with per-model and per-key rows) and in /metrics
    billing = observed(report, "billing")
    status = tenancy.pool("billing")["status"]["usage"]
    assert {k: status[k] for k in billing} == billing
    assert set(status["models"]) == {FAST_MODEL}
    assert set(status["keys"]) == {key_id(API_KEY)}
    metrics = httpx.get(
        f"{tenancy.base_url}/metrics", headers=tenancy.headers(ADMIN_KEY), timeout=30
    ).text
    line = (
        f'poolserve_usage_completion_tokens_total{{key_id="{key_id(API_KEY)}",'
        f'model="{FAST_MODEL}",pool="billing"}}'
    )
    assert f"{line} {float(billing['completion_tokens'])}" in metrics, line
    assert API_KEY not in metrics
    # the default worker accrues worker-seconds; a shared pool holds no worker
    assert restored["pools"]["default"]["worker_seconds"] > 5
    assert restored["pools"]["billing"]["worker_seconds"] == 0
    # a `since` window after all of it is empty
    assert tenancy.usage(since=time.time() + 120)["total"]["requests"] == 0


def replica_pid(deployment: str) -> int:
    """The pid of the app's one replica of `deployment` (Ray's proctitle
    `ray::ServeReplica:<app>:<deployment>`, with `.<method>` while it runs one)."""
    for proc in Path("/proc").iterdir():
        try:
            argv0 = (proc / "cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, ValueError):
            continue
        if argv0.startswith(f"ray::ServeReplica:{APP}:") and (
            argv0.split(":")[-1].split(".")[0] == deployment
        ):
            return int(proc.name)
    raise AssertionError(f"no process of {deployment}")


def test_a_silent_usage_shard_makes_usage_reads_503_not_a_short_invoice(
    tenancy: Tenancy,
) -> None:
    """A usage shard alive but silent (SIGSTOP): GET /v1/usage answers 503 usage_unavailable
    with Retry-After once shard 0 gives up on it (4 s), never a report without that shard's
    counts; a pool still reads, its status.usage null; resumed, the reads are whole again."""
    tenancy.create_pool("audited", gpus={"cpu": 1}, shared=True)
    before = tenancy.usage()["total"]["requests"]
    pid = replica_pid("TenantLedger-1")
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        silent = httpx.get(
            f"{tenancy.base_url}/v1/usage", headers=tenancy.headers(ADMIN_KEY), timeout=30
        )
        waited = time.monotonic() - started
        pool = tenancy.pool("audited")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert silent.status_code == 503, silent.text
    assert silent.json()["detail"]["code"] == "usage_unavailable"
    assert float(silent.headers["retry-after"]) > 0
    assert 3 < waited < 10, waited
    assert pool["status"]["usage"] is None
    assert eventually(lambda: tenancy.usage())["total"]["requests"] >= before


def test_usage_needs_an_admin_key_and_refuses_bad_windows(tenancy: Tenancy) -> None:
    url = f"{tenancy.base_url}/v1/usage"
    denied = httpx.get(url, headers=tenancy.headers(API_KEY), timeout=30)
    assert denied.status_code == 403 and denied.json()["detail"]["code"] == "permission_denied"
    assert httpx.get(url, timeout=30).status_code == 401
    for since in ("yesterday", "-5", "2026-11-30T00:00:00"):
        bad = httpx.get(url, params={"since": since}, headers=tenancy.headers(ADMIN_KEY))
        assert bad.status_code == 400, since
        assert bad.json()["detail"]["param"] == "since"
    missing = httpx.get(url, params={"pool": "nope"}, headers=tenancy.headers(ADMIN_KEY))
    assert missing.status_code == 404 and missing.json()["detail"]["code"] == "POOL_NOT_FOUND"
    ok = httpx.get(
        url, params={"since": "2026-01-01T00:00:00Z"}, headers=tenancy.headers(ADMIN_KEY)
    )
    assert ok.status_code == 200 and ok.json()["since"] is not None


# --- limits ---------------------------------------------------------------------------------


def test_a_tokens_per_minute_limit_holds_across_two_ingress_replicas(tenancy: Tenancy) -> None:
    tenancy.create_pool("metered", gpus={"cpu": 1}, shared=True, tokens_per_minute=TPM)
    spec = tenancy.pool("metered")["spec"]
    assert spec["tokens_per_minute"] == TPM and spec["shared"] is True
    done: list[int] = []
    refusals: Counter[str] = Counter()
    retry_after: set[str] = set()
    body = {
        "model": FAST_MODEL,
        "messages": [{"role": "user", "content": "count"}],
        "max_tokens": 20,
    }

    async def worker(client: httpx.AsyncClient, stop: float) -> None:
        while time.monotonic() < stop:
            response = await client.post(
                "/v1/chat/completions", json=body, headers=tenancy.headers(pool="metered")
            )
            if response.status_code == 200:
                usage = response.json()["usage"]
                if time.monotonic() < stop:
                    done.append(usage["total_tokens"])
            else:
                refusals[response.headers.get("x-sie-error-code", str(response.status_code))] += 1
                retry_after.add(response.headers.get("retry-after", ""))
                await asyncio.sleep(0.1)

    async def traffic() -> None:
        stop = time.monotonic() + 2 * WINDOW_S
        async with httpx.AsyncClient(base_url=tenancy.base_url, timeout=60) as client:
            await asyncio.gather(*(worker(client, stop) for _ in range(6)))

    asyncio.run(traffic())
    used = sum(done)
    budget = 2 * TPM
    # a request is admitted while its reservation (an upper bound: body bytes + template
    # allowance + max_tokens, app/tenancy/limits.py) fits what the window has left
    raw = httpx.Request("POST", "http://x", json=body).content
    reserved = estimate_tokens(len(raw), 20, 1, None, 2048)
    print(
        f"tokens in 2 windows of {WINDOW_S:g} s: {used} (limit {budget}, a request reserves "
        f"{reserved}), refusals {refusals}"
    )
    assert used <= budget * 1.05, used
    # the limit, not something else, held the clients back: at a window's end each of the two
    # replicas can be left with less than one reservation it cannot use (2 windows x 2)
    assert used >= (budget - 4 * reserved) * 0.9, used
    assert set(refusals) == {"token_rate_limit_exceeded"}, refusals
    assert all(value.isdigit() and 1 <= int(value) <= WINDOW_S for value in retry_after)


def test_key_limits_requests_and_concurrent_streams(tenancy: Tenancy) -> None:
    headers = tenancy.headers(LIMITED_KEY)
    slow = {"model": SLOW_MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 8}

    async def scenario() -> tuple[list[httpx.Response], httpx.Response]:
        async with httpx.AsyncClient(base_url=tenancy.base_url, timeout=60) as client:
            first = asyncio.create_task(
                client.post("/v1/chat/completions", json=slow, headers=headers)
            )
            await asyncio.sleep(0.4)
            second = await client.post("/v1/chat/completions", json=slow, headers=headers)
            return [await first], second

    (ok,), busy = asyncio.run(scenario())
    assert ok.status_code == 200
    assert busy.status_code == 429
    assert busy.headers["x-sie-error-code"] == "concurrency_limit_exceeded"
    assert busy.json()["error"]["code"] == "concurrency_limit_exceeded"
    assert int(busy.headers["retry-after"]) >= 1
    fast = {"model": FAST_MODEL, "prompt": "hi", "max_tokens": 2}
    statuses = [
        httpx.post(f"{tenancy.base_url}/v1/completions", json=fast, headers=headers, timeout=30)
        for _ in range(KEY_RPM)
    ]
    codes = [r.status_code for r in statuses]
    assert codes[-1] == 429 and statuses[-1].headers["x-sie-error-code"] == "rate_limit_exceeded"
    # one of its window went to the slow request; the refused one counts nowhere
    assert codes.count(200) == KEY_RPM - 1
    assert 1 <= int(statuses[-1].headers["retry-after"]) <= WINDOW_S
    # another key is not limited by it
    other = httpx.post(
        f"{tenancy.base_url}/v1/completions", json=fast, headers=tenancy.headers(), timeout=30
    )
    assert other.status_code == 200


def test_bad_tenancy_inputs_are_clear_4xx(tenancy: Tenancy) -> None:
    url = f"{tenancy.base_url}/v1/pools"
    admin = tenancy.headers(ADMIN_KEY)
    for spec, param in (
        ({"tokens_per_minute": 0}, "tokens_per_minute"),
        ({"priority": "high"}, "priority"),
        ({"shared": True, "queue_pool": "same"}, "queue_pool"),
        ({"shared": True, "minimum_worker_count": 1}, "shared"),
    ):
        response = httpx.post(url, json={"name": "same", **spec}, headers=admin, timeout=30)
        assert response.status_code == 400, (spec, response.text)
        assert response.json()["detail"]["param"] == param, response.text
    chat = f"{tenancy.base_url}/v1/chat/completions"
    body = {"model": FAST_MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    bad = httpx.post(chat, json={**body, "priority": "urgent"}, headers=tenancy.headers())
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "priority"
    bad = httpx.post(chat, json=body, headers={**tenancy.headers(), "X-Vllm-Priority": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Vllm-Priority"
    tenancy.create_pool("tiny", gpus={"cpu": 1}, shared=True, tokens_per_minute=5)
    big = httpx.post(chat, json=body | {"max_tokens": 50}, headers=tenancy.headers(pool="tiny"))
    assert big.status_code == 400 and big.json()["error"]["param"] == "max_tokens"


# --- fair share and priority ----------------------------------------------------------------


async def _ttft(
    client: httpx.AsyncClient, headers: dict[str, str], priority: int | None
) -> float | str:
    """Seconds to the first content token, or the error code."""
    body: dict[str, Any] = {
        "model": SLOW_MODEL,
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 10,
        "stream": True,
    }
    if priority is not None:
        body["priority"] = priority
    started = time.monotonic()
    first: float | None = None
    async with client.stream(
        "POST", "/v1/chat/completions", json=body, headers=headers
    ) as response:
        if response.status_code != 200:
            await response.aread()
            return response.headers.get("x-sie-error-code", str(response.status_code))
        async for line in response.aiter_lines():
            if first is None and '"content": "' in line and '"content": ""' not in line:
                first = time.monotonic() - started
    return first if first is not None else "no_token"


def overload(
    tenancy: Tenancy,
    light: tuple[str | None, int | None],
    heavy: tuple[str | None, int | None],
    seconds: float = 15.0,
) -> tuple[float, list[float], Counter[str], Counter[str], int]:
    """Unloaded light TTFT p50, then 3x overload (capacity ~4 req/s: 4 requests of 1 s fit the
    KV cache) with heavy at 10x light: light's TTFTs and both sides' refusals."""

    async def run() -> tuple[float, list[float], Counter[str], Counter[str], int]:
        async with httpx.AsyncClient(base_url=tenancy.base_url, timeout=60) as client:
            light_headers = tenancy.headers(pool=light[0])
            heavy_headers = tenancy.headers(pool=heavy[0])
            unloaded = []
            for _ in range(8):
                result = await _ttft(client, light_headers, light[1])
                assert isinstance(result, float), result
                unloaded.append(result)
            light_tasks, heavy_tasks = [], []
            start = time.monotonic()
            n = 0
            while time.monotonic() - start < seconds:
                heavy_tasks.append(asyncio.create_task(_ttft(client, heavy_headers, heavy[1])))
                if n % 10 == 0:
                    light_tasks.append(asyncio.create_task(_ttft(client, light_headers, light[1])))
                n += 1
                await asyncio.sleep(1 / 11)  # 11 requests/s, ~3x what the worker serves
            light_results = await asyncio.gather(*light_tasks)
            heavy_results = await asyncio.gather(*heavy_tasks)
            return (
                statistics.median(unloaded),
                [r for r in light_results if isinstance(r, float)],
                Counter(r for r in light_results if isinstance(r, str)),
                Counter(r for r in heavy_results if isinstance(r, str)),
                sum(isinstance(r, float) for r in heavy_results),
            )

    return asyncio.run(run())


def _check_fairness(
    result: tuple[float, list[float], Counter[str], Counter[str], int], what: str
) -> None:
    unloaded, loaded, light_refused, heavy_refused, heavy_served = result
    loaded_p50 = statistics.median(loaded)
    print(
        f"{what}: light TTFT p50 unloaded {unloaded * 1000:.0f} ms, at 3x overload "
        f"{loaded_p50 * 1000:.0f} ms (max {max(loaded) * 1000:.0f} ms, n={len(loaded)}); "
        f"light refused {dict(light_refused)}; heavy served {heavy_served}, refused "
        f"{dict(heavy_refused)}"
    )
    assert not light_refused, light_refused
    assert len(loaded) >= 12
    assert loaded_p50 <= 1.5 * unloaded, (loaded_p50, unloaded)
    assert sum(heavy_refused.values()) > 20, heavy_refused  # the heavy tenant absorbs them
    assert set(heavy_refused) <= {"QUEUE_FULL", "rate_limit_exceeded"}, heavy_refused


def test_fair_share_keeps_a_light_pool_fast_under_a_heavy_pools_overload(tenancy: Tenancy) -> None:
    tenancy.create_pool("light", gpus={"cpu": 1}, shared=True)
    tenancy.create_pool("heavy", gpus={"cpu": 1}, shared=True)
    _check_fairness(overload(tenancy, ("light", None), ("heavy", None)), "fair share")


def test_priority_keeps_the_high_class_fast_under_the_low_class_overload(tenancy: Tenancy) -> None:
    tenancy.create_pool("urgent", gpus={"cpu": 1}, shared=True, priority=-5)
    assert tenancy.pool("urgent")["spec"]["priority"] == -5
    # the high class: the pool's default priority; the low class: an explicit body priority
    _check_fairness(overload(tenancy, ("urgent", None), ("urgent", 5)), "priority")


# --- the real sie-sdk -----------------------------------------------------------------------


def test_a_pool_created_with_the_sie_sdk_reports_its_usage(tenancy: Tenancy) -> None:
    sie = SIERunner(tenancy.base_url)
    code = """
    client.create_pool("sdk-team", gpus={"cpu": 1})
    out = []
    for _ in range(3):
        result = client.generate("fake/fast", "a b c", max_new_tokens=4, gpu="sdk-team/cpu")
        out.append(result["usage"])
    at_once = client.get_pool("sdk-team")  # right after the last response
    await asyncio.sleep(2)  # worker-seconds accrue every 0.5 s here
    pool = client.get_pool("sdk-team")
    client.delete_pool("sdk-team")
    return {"usage": out, "pool": pool, "at_once": at_once["status"]["usage"]["requests"]}
    """
    result = sie.run(code, timeout_s=300, client_kwargs={"api_key": ADMIN_KEY})
    usage = result["pool"]["status"]["usage"]
    assert result["at_once"] == 3  # counted as the last response went out
    assert usage["requests"] == 3
    assert usage["prompt_tokens"] == sum(u["prompt_tokens"] for u in result["usage"])
    assert usage["completion_tokens"] == sum(u["completion_tokens"] for u in result["usage"]) == 12
    assert usage["keys"] == {key_id(ADMIN_KEY): usage["keys"][key_id(ADMIN_KEY)]}
    assert usage["worker_seconds"] > 0  # it held a worker of its own
    assert result["pool"]["spec"]["shared"] is False
