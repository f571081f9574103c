"""The ingress's registry snapshot: refreshed behind the requests while it is merely old, waited
for only when it is stale or a caller asks to look again now."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from app.config import AppConfig
from app.deployments.ingress import SNAPSHOT_STALE_SECONDS, ServeBackend


class SlowSnapshot:
    """Stands in for `PoolAutoscaler.routing_snapshot`: answers only when `gate` is open."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()

    def remote(self) -> Any:
        self.calls += 1
        return self._answer()

    async def _answer(self) -> tuple[list[Any], dict[str, Any]]:
        await self.gate.wait()
        return [], {}


async def test_old_snapshot_is_served_while_it_refreshes_stale_one_is_awaited() -> None:
    snapshot = SlowSnapshot()
    backend = ServeBackend(AppConfig(), {}, SimpleNamespace(routing_snapshot=snapshot))  # type: ignore[arg-type]

    first = asyncio.create_task(backend.workers())  # no snapshot yet: must wait
    await asyncio.sleep(0.05)
    assert not first.done() and snapshot.calls == 1
    snapshot.gate.set()
    assert await first == []

    snapshot.gate.clear()
    backend._snapshot_at = time.monotonic() - 1.0  # old, not stale
    assert await asyncio.wait_for(backend.workers(), 0.5) == []  # answered at once
    assert snapshot.calls == 2  # ...with a refresh started behind it

    looking_again = asyncio.create_task(backend.workers(max_age_s=0.0))
    await asyncio.sleep(0.05)
    assert not looking_again.done()  # "look again now" waits for the round trip
    snapshot.gate.set()
    await looking_again

    snapshot.gate.clear()
    backend._snapshot_at = time.monotonic() - SNAPSHOT_STALE_SECONDS - 1
    stale = asyncio.create_task(backend.workers())
    await asyncio.sleep(0.05)
    assert not stale.done()
    snapshot.gate.set()
    await stale
