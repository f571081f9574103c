"""Faults over real HTTP: a Generator replica SIGKILLed mid-stream, and 1,000 clients that
disconnect at random points. Both run on `faults`, a fake-engine app of this module (tokens
10 ms apart, so streams last long enough to be cut), deleted at the end so later tests see the
session stack as it was. Timings are printed (run with -s to see them)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import pytest

from tests.conftest import FAKE_MODEL, Stack, fake_app_args
from tests.support.local_serve import delete_app_in_background
from tests.support.sse import data

pytestmark = pytest.mark.e2e

APP = "faults"
GENERATOR = "Generator-cpu"
TOKEN_DELAY_S = 0.01
ERROR_WITHIN_S = 2.0
RECOVERY_TIMEOUT_S = 120.0
DISCONNECTS = 1000
CONCURRENCY = 50
SEED = int(os.environ.get("POOLSERVE_FAULTS_SEED", "8"))
CHAT = "/v1/chat/completions"
GENERATE = "/v1/generate/" + FAKE_MODEL.replace("/", "__")
T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T], timeout_s: float = RECOVERY_TIMEOUT_S) -> T:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as error:  # a replica being replaced, a proxy still routing
            last = error
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@dataclass
class FaultApp:
    stack: Stack
    base_url: str
    port: int

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.base_url}/health", timeout=10).json()  # type: ignore[no-any-return]

    def replicas(self, deployment: str) -> list[Any]:
        """Serve's own view of a deployment's replicas (id, state, pid, actor name)."""
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        assert client is not None
        details = client._controller.get_deployment_details.remote(APP, deployment)
        import ray

        return list(ray.get(details, timeout=10).replicas)

    def running(self, deployment: str) -> list[Any]:
        return [r for r in self.replicas(deployment) if r.state == "RUNNING"]

    def ongoing(self, deployment: str) -> int:
        """Requests (Ray actor tasks) in flight in the deployment's replicas, as Serve counts."""
        import ray

        total = 0
        for replica in self.running(deployment):
            actor = ray.get_actor(replica.actor_name, namespace="serve")
            total += ray.get(actor.get_num_ongoing_requests.remote(), timeout=10)
        return total

    def autoscaler(self) -> dict[str, Any]:
        handle = self.stack.handle("PoolAutoscaler", APP)
        return handle.status.remote().result(timeout_s=10)  # type: ignore[no-any-return]

    def worker(self) -> Any:
        return self.stack.worker_status(APP)

    def ready(self) -> bool:
        report = self.health()
        workers = report["workers"]
        return (
            len(workers) == 1
            and workers[0]["state"] == "ready"
            and all(m["state"] == "loaded" for m in report["models"])
        )

    def idle(self) -> dict[str, Any] | None:
        """The books of the one worker when nothing at all is in flight, else None."""
        status = self.worker()
        stats = status.model_state(FAKE_MODEL).stats
        books = {
            "active_requests": status.active_requests,
            "engine_running": stats.running_requests,
            "kv_handles_open": stats.kv_handles_open,
            "kv_blocks_used": stats.kv_blocks_used,
            "kv_waiting": stats.kv_waiting,
            "generator_tasks": self.ongoing(GENERATOR),
            "ingress_tasks": self.ongoing("Ingress"),
        }
        return books if not any(books.values()) else None


@pytest.fixture(scope="module")
def faults(stack: Stack) -> Iterator[FaultApp]:
    from ray import serve

    from app.builder import build_app

    serve.run(
        build_app(fake_app_args(token_delay_s=TOKEN_DELAY_S)),
        name=APP,
        route_prefix=f"/{APP}",
        blocking=False,
    )
    port = httpx.URL(stack.base_url).port
    assert port is not None
    app = FaultApp(stack, f"{stack.base_url}/{APP}", port)
    try:
        wait_for("the faults app", app.ready, timeout_s=300)
        yield app
    finally:
        delete_app_in_background(APP)


def victim_handles(faults: FaultApp) -> int:
    (worker,) = faults.health()["workers"]
    return int(worker["kv_handles_open"])


def sse_events(response: httpx.Response) -> Iterator[tuple[float, str]]:
    """(arrival time, data) of each SSE data event."""
    for item in data(response):
        yield time.monotonic(), item


def test_generator_sigkill_mid_stream_errors_in_band_and_recovers(faults: FaultApp) -> None:
    (victim,) = faults.running(GENERATOR)
    assert victim.pid and victim.pid != os.getpid()
    events: list[tuple[float, str]] = []
    killed_at = 0.0
    body = {
        "model": FAKE_MODEL,
        "messages": [{"role": "user", "content": "count slowly"}],
        "max_tokens": 480,  # ~5 s of tokens: the kill lands mid-stream
        "stream": True,
    }
    started = time.monotonic()
    with httpx.stream("POST", f"{faults.base_url}{CHAT}", json=body, timeout=30) as response:
        assert response.status_code == 200
        for arrival, data in sse_events(response):
            events.append((arrival, data))
            if len(events) == 1:
                # the books show the request's KV handle on the victim before it dies
                wait_for("the handle in /health", lambda: victim_handles(faults) == 1, 4)
                os.kill(victim.pid, signal.SIGKILL)
                killed_at = time.monotonic()
    ended = time.monotonic()
    assert killed_at, "the stream ended before the kill"
    assert events[-1][1] == "[DONE]", "no [DONE] after the failure"
    error_at, error_data = events[-2]
    error = json.loads(error_data).get("error")
    assert error is not None, f"no in-band error event before [DONE]: {events[-3:]}"
    assert error["code"] == "transport_failure" and error["type"], error
    content = "".join(
        choice["delta"].get("content") or ""
        for _, data in events[:-2]
        for choice in json.loads(data).get("choices", [])
    )
    assert content, "no tokens before the kill"
    latency = error_at - killed_at
    print(
        f"\n[faults] SIGKILL pid {victim.pid} after {killed_at - started:.2f} s of stream; "
        f"in-band error {latency * 1000:.0f} ms later, [DONE] at +{(ended - killed_at) * 1000:.0f} ms"
    )
    assert latency <= ERROR_WITHIN_S, f"in-band error took {latency:.2f} s"

    # Serve replaces the replica; the registry forgets the dead worker; new requests succeed.
    new = wait_for(
        "a replacement replica",
        lambda: [r for r in faults.running(GENERATOR) if r.replica_id != victim.replica_id],
    )[0]
    replaced_at = time.monotonic()

    def only_the_new_worker() -> bool:
        workers = faults.health()["workers"]
        return [w["name"] for w in workers] == [new.replica_id] and workers[0]["state"] == "ready"

    # the registry drops it once Serve no longer runs it (it would stay listed as a stale worker
    # with an open handle for FORGET_AFTER_SECONDS otherwise)
    wait_for("/health to list only the new worker", only_the_new_worker, timeout_s=60)
    forgotten_at = time.monotonic()
    reasons = [r["reason"] for r in faults.autoscaler()["reasons"]]
    assert f"worker {victim.replica_id} forgotten: Serve no longer runs it" in reasons
    worker = faults.health()["workers"][0]
    assert worker["kv_handles_open"] == 0 and worker["kv_blocks_used"] == 0
    assert worker["queue_depth"] == 0

    def served() -> bool:
        reply = httpx.post(
            f"{faults.base_url}{CHAT}", json={**body, "stream": False, "max_tokens": 8}, timeout=30
        )
        return reply.status_code == 200 and bool(reply.json()["choices"][0]["message"]["content"])

    wait_for("a request served by the new replica", served)
    served_at = time.monotonic()
    wait_for("the new worker idle", faults.idle, timeout_s=15)
    print(
        f"[faults] replacement running at +{replaced_at - killed_at:.1f} s, dead worker gone "
        f"from /health at +{forgotten_at - killed_at:.1f} s, served at +{served_at - killed_at:.1f} s"
    )


# --- 1,000 disconnects --------------------------------------------------------------------------

MODES = ("before_first_byte", "partial_body", "mid_stream", "buffered_abandoned")


def http_request(path: str, body: dict[str, Any], host: str) -> tuple[bytes, bytes]:
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head, payload


async def disconnect_once(
    port: int, prefix: str, mode: str, rng: random.Random, outcome: Counter[str]
) -> None:
    """One client that goes away at a random point of its request."""
    stream = mode in ("before_first_byte", "partial_body", "mid_stream")
    max_tokens = rng.randint(20, 300)
    if rng.random() < 0.5:
        path = prefix + CHAT
        body: dict[str, Any] = {
            "model": FAKE_MODEL,
            "messages": [{"role": "user", "content": "word " * rng.randint(1, 60)}],
            "max_tokens": max_tokens,
            "stream": stream,
        }
    else:
        path = prefix + GENERATE
        body = {"prompt": "word " * rng.randint(1, 60), "max_new_tokens": max_tokens}
        body["stream"] = stream
    head, payload = http_request(path, body, f"127.0.0.1:{port}")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if rng.random() < 0.5:  # half of them reset the connection instead of closing it
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    try:
        if mode == "partial_body":
            writer.write(head + payload[: rng.randint(0, len(payload) - 1)])
            await writer.drain()
            await asyncio.sleep(rng.uniform(0, 0.05))
        elif mode == "before_first_byte":
            writer.write(head + payload)
            await writer.drain()
            await asyncio.sleep(rng.uniform(0, 0.03))
        elif mode == "buffered_abandoned":
            writer.write(head + payload)
            await writer.drain()
            try:
                await asyncio.wait_for(reader.read(1), rng.uniform(0.01, 0.5))
                outcome["buffered_answered_first"] += 1
            except TimeoutError:
                pass
        else:
            writer.write(head + payload)
            await writer.drain()
            wanted = rng.randint(1, 30)
            seen = 0
            while seen < wanted:
                line = await asyncio.wait_for(reader.readline(), 30)
                if not line:
                    outcome["mid_stream_ended_first"] += 1
                    break
                if line.startswith(b"data: "):
                    seen += 1
                    if line.startswith(b"data: [DONE]"):
                        outcome["mid_stream_ended_first"] += 1
                        break
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    outcome[mode] += 1


async def disconnect_storm(port: int, prefix: str, count: int, seed: int) -> Counter[str]:
    rng = random.Random(seed)
    plan = [rng.choice(MODES) for _ in range(count)]
    seeds = [rng.randrange(2**32) for _ in range(count)]
    gate = asyncio.Semaphore(CONCURRENCY)
    outcome: Counter[str] = Counter()

    async def client(mode: str, client_seed: int) -> None:
        async with gate:
            try:
                await disconnect_once(port, prefix, mode, random.Random(client_seed), outcome)
            except (OSError, TimeoutError) as error:
                outcome[f"client_error:{type(error).__name__}"] += 1

    await asyncio.gather(*(client(m, s) for m, s in zip(plan, seeds, strict=True)))
    return outcome


def test_a_thousand_random_disconnects_leak_nothing(faults: FaultApp) -> None:
    wait_for("the faults app", faults.ready, timeout_s=60)
    started = time.monotonic()
    outcome: Counter[str] = Counter()
    error: list[BaseException] = []

    def run() -> None:  # own thread: pytest-asyncio's loop policy stays out of it
        try:
            outcome.update(asyncio.run(disconnect_storm(faults.port, f"/{APP}", DISCONNECTS, SEED)))
        except BaseException as failure:
            error.append(failure)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the disconnect storm hung"
    assert not error, error
    storm_s = time.monotonic() - started
    done = sum(outcome[mode] for mode in MODES)
    print(f"\n[faults] {done} disconnects (seed {SEED}) in {storm_s:.1f} s: {dict(outcome)}")
    assert done == DISCONNECTS, outcome
    books = wait_for("the worker to let go of every request", faults.idle, timeout_s=30)
    print(f"[faults] idle {time.monotonic() - started - storm_s:.1f} s after the storm: {books}")
    health = faults.health()
    assert health["status"] == "healthy", health
    reply = httpx.post(
        f"{faults.base_url}{GENERATE}", json={"prompt": "after", "max_new_tokens": 4}, timeout=30
    )
    assert reply.status_code == 200 and reply.json()["finish_reason"] == "length"
