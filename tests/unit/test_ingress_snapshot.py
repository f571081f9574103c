"""The ingress's registry snapshot: refreshed behind the requests while it is merely old, waited
for only when it is stale or a caller asks to look again now."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest

from app.config import AppConfig
from app.deployments.ingress import SNAPSHOT_STALE_SECONDS, ServeBackend
from app.errors import Provisioning
from app.protocol.generation import GenerationRequest, SamplingOptions
from app.protocol.workers import ModelStatus, WorkerStatus


class SlowSnapshot:
    """Stands in for `PoolAutoscaler.routing_snapshot_since`: answers only when `gate` is open,
    each time with a new version (a whole snapshot)."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()

    def remote(self, version: str | None) -> Any:
        self.calls += 1
        return self._answer()

    async def _answer(self) -> tuple[str, tuple[list[Any], dict[str, Any]]]:
        await self.gate.wait()
        return str(self.calls), ([], {})


async def test_old_snapshot_is_served_while_it_refreshes_stale_one_is_awaited() -> None:
    snapshot = SlowSnapshot()
    backend = ServeBackend(AppConfig(), {}, SimpleNamespace(routing_snapshot_since=snapshot))  # type: ignore[arg-type]

    first = asyncio.create_task(backend._routing_snapshot())  # no snapshot yet: must wait
    await asyncio.sleep(0.05)
    assert not first.done() and snapshot.calls == 1
    snapshot.gate.set()
    assert await first == []

    snapshot.gate.clear()
    backend._snapshot_at = time.monotonic() - 1.0  # old, not stale
    assert await asyncio.wait_for(backend._routing_snapshot(), 0.5) == []  # answered at once
    assert snapshot.calls == 2  # ...with a refresh started behind it

    looking_again = asyncio.create_task(backend._routing_snapshot(max_age_s=0.0))
    await asyncio.sleep(0.05)
    assert not looking_again.done()  # "look again now" waits for the round trip
    snapshot.gate.set()
    await looking_again

    snapshot.gate.clear()
    backend._snapshot_at = time.monotonic() - SNAPSHOT_STALE_SECONDS - 1
    stale = asyncio.create_task(backend._routing_snapshot())
    await asyncio.sleep(0.05)
    assert not stale.done()
    snapshot.gate.set()
    await stale


async def test_an_unchanged_version_keeps_the_snapshot_and_sends_the_version_back() -> None:
    """A versioned pull (`routing_snapshot_since`): the ingress sends the version it holds, and
    an answer without a snapshot (nothing changed) keeps what it has, fresh again."""
    versions: list[str | None] = []

    async def answer(version: str | None) -> tuple[str, Any]:
        versions.append(version)
        if version == "7":
            return "7", None
        return "7", ([], {"eval": "record"})

    async def whole() -> Any:
        versions.append("whole")
        return [], {"eval": "record"}

    backend = ServeBackend(
        AppConfig(),
        {},
        SimpleNamespace(  # type: ignore[arg-type]
            routing_snapshot_since=SimpleNamespace(remote=answer),
            routing_snapshot=SimpleNamespace(remote=whole),
        ),
    )
    await backend._routing_snapshot(max_age_s=0.0)
    assert backend._pools == {"eval": "record"}
    before = backend._snapshot_at
    await backend._routing_snapshot(max_age_s=0.0)
    assert versions == [None, "7"]
    assert backend._pools == {"eval": "record"}  # kept
    assert backend._snapshot_at > before  # and counted as fresh
    # /health, the dashboard and /metrics read every figure fresh: the registry's current one
    backend._full_at = time.monotonic() - 1.0
    await backend.workers()
    assert versions == [None, "7", "whole"]


async def test_a_worker_stale_in_an_old_snapshot_is_looked_up_before_a_503() -> None:
    """A versioned pull keeps a snapshot while only heartbeat times change: after a pause its
    `reported_at` can be older than `worker_stale_seconds` while the worker reports on time.
    The ingress asks for the registry's current figures before it answers PROVISIONING, and
    asks the autoscaler for capacity only when the worker really is gone."""
    config = AppConfig.model_validate(
        {"models": [{"id": "org/m", "profiles": ["cpu"]}], "profiles": [{"name": "cpu"}]}
    )

    def status(age_s: float) -> WorkerStatus:
        return WorkerStatus(
            worker_id="w",
            deployment="Generator-cpu",
            profile="cpu",
            node_id="n",
            pool="default",
            models=(ModelStatus("org/m", "loaded"),),
            active_requests=0,
            reported_at=time.time() - age_s,
        )

    current = {"age": 1.0}
    demand: list[tuple[str, str]] = []

    async def since(version: str | None) -> tuple[str, Any]:
        return "1", ([status(config.worker_stale_seconds + 2)], {})  # heartbeats of long ago

    async def whole() -> Any:
        return [status(current["age"])], {}

    async def note_demand(pool: str, profile: str) -> None:
        demand.append((pool, profile))

    backend = ServeBackend(
        config,
        {},
        SimpleNamespace(  # type: ignore[arg-type]
            routing_snapshot_since=SimpleNamespace(remote=since),
            routing_snapshot=SimpleNamespace(remote=whole),
            note_demand=SimpleNamespace(remote=note_demand),
        ),
    )
    request = GenerationRequest("r", "org/m", SamplingOptions(max_new_tokens=4), prompt="x")
    target = await backend._target(request)
    assert target.ready_workers == ("w",) and demand == []

    current["age"] = config.worker_stale_seconds + 2  # the registry has not heard from it either
    backend._snapshot_at = float("-inf")
    backend._full_at = float("-inf")
    with pytest.raises(Provisioning):
        await backend._target(request)
    await asyncio.sleep(0)
    assert demand == [("default", "cpu")]
