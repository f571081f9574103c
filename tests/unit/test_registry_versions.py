"""The PoolAutoscaler's registry. Versioned pulls of its routing snapshot
(routing_snapshot_since): a pull while nothing an ingress routes by changed is a version only; a
new worker, a changed model state, a pool change or a worker back from stale is a new version;
and the version moves every worker_stale_seconds / 2 so no ingress judges liveness by times
older than that. After a restart, its waits for the workers' heartbeats count from when the
first call reached it, not from its constructor (Serve publishes a replica seconds later)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from app.config import AppConfig
from app.deployments import autoscaler, pool_store, worker_registry
from app.pools.model import PoolSpec
from app.protocol.workers import ModelStatus, WorkerStatus

CONFIG = AppConfig.model_validate(
    {
        "models": [{"id": "m", "source": "null", "profiles": ["gpu"]}],
        "profiles": [{"name": "gpu"}],
        "worker_stale_seconds": 10,
    }
)


@pytest.fixture
def scaler(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    saved: dict[str, Any] = {}
    monkeypatch.setattr(
        autoscaler.serve, "get_replica_context", lambda: SimpleNamespace(app_name="t")
    )
    monkeypatch.setattr(pool_store, "kv_get", lambda key, namespace: saved.get(key))
    monkeypatch.setattr(
        pool_store, "kv_put", lambda key, value, namespace: saved.__setitem__(key, value)
    )
    loop = asyncio.new_event_loop()

    async def make() -> Any:
        return autoscaler.PoolAutoscaler(CONFIG)

    def started() -> Any:
        created = loop.run_until_complete(make())
        created._loop.cancel()
        created.run = loop.run_until_complete
        created.restart = started
        return created

    created = started()
    # reached a heartbeat round ago: snapshots answer at once, and no decision runs (no Ray)
    created._registry.reached_at = time.time() - worker_registry.WARMUP_HEARTBEATS * 2.0
    yield created
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()


def status(worker_id: str, state: str = "loaded", active: int = 0) -> WorkerStatus:
    return WorkerStatus(
        worker_id=worker_id,
        deployment="Generator-gpu",
        profile="gpu",
        node_id="n",
        pool="default",
        models=(ModelStatus("m", state),),  # type: ignore[arg-type]
        active_requests=active,
        reported_at=time.time(),
    )


def test_a_pull_while_nothing_changed_is_a_version_only(scaler: Any) -> None:
    scaler.heartbeat(status("w1"))
    version, snapshot = scaler.run(scaler.routing_snapshot_since(None))
    assert snapshot is not None and [w.worker_id for w in snapshot[0]] == ["w1"]
    assert scaler.run(scaler.routing_snapshot_since(version)) == (version, None)
    scaler.heartbeat(status("w1", active=7))  # a heartbeat: new times and load only
    assert scaler.run(scaler.routing_snapshot_since(version)) == (version, None)


@pytest.mark.parametrize(
    "change",
    ["new worker", "model state", "pool created", "worker back from stale", "refresh"],
)
def test_what_moves_the_version(scaler: Any, change: str) -> None:
    scaler.heartbeat(status("w1"))
    version, _ = scaler.run(scaler.routing_snapshot_since(None))
    if change == "new worker":
        scaler.heartbeat(status("w2"))
    elif change == "model state":
        scaler.heartbeat(status("w1", state="loading"))
    elif change == "pool created":
        scaler.run(scaler.create_pool(PoolSpec(name="p")))
    elif change == "worker back from stale":
        late = dataclasses.replace(status("w1"), reported_at=time.time() + 11)
        scaler.heartbeat(late)
    else:
        scaler._version_at -= 6  # more than worker_stale_seconds / 2 ago
    new, snapshot = scaler.run(scaler.routing_snapshot_since(version))
    assert new != version and snapshot is not None
    assert snapshot == scaler.run(scaler.routing_snapshot())


def test_a_restarted_registry_never_matches_an_old_version(scaler: Any) -> None:
    scaler.heartbeat(status("w1"))
    version, _ = scaler.run(scaler.routing_snapshot_since(None))
    scaler._epoch = "restarted"
    assert scaler.run(scaler.routing_snapshot_since(version))[1] is not None


def test_a_restarted_autoscaler_waits_for_its_workers_from_when_it_is_first_reached(
    scaler: Any,
) -> None:
    scaler._book.assignments["w1"] = "p"
    scaler._store.save(scaler._book)
    restarted = scaler.restart()
    assert restarted._restored
    t0, grace, stale = restarted._started, 3 * 2.0, 10.0  # heartbeats every 2 s
    assert not restarted._may_decide(t0 + stale + 2)  # nothing reached it yet
    restarted._registry.reached(t0 + 12)  # Serve published it 12 s after it started
    assert not restarted._may_decide(t0 + 12 + grace + 1)  # w1 (assigned to p) not heard yet
    assert not restarted._may_decide(t0 + 12 + stale - 0.1)
    restarted.heartbeat(status("w1"))
    assert restarted._may_decide(t0 + 12 + grace + 1)
    assert restarted._may_decide(t0)  # once deciding, always


def test_a_silent_assigned_worker_is_waited_for_until_it_would_be_stale(scaler: Any) -> None:
    scaler._book.assignments["w1"] = "p"
    scaler._store.save(scaler._book)
    restarted = scaler.restart()
    t0, stale = restarted._started, 10.0
    restarted._registry.reached(t0 + 12)
    assert not restarted._may_decide(t0 + 12 + stale - 0.1)
    assert restarted._may_decide(t0 + 12 + stale)
    # a replica nothing ever reaches (no worker, no ingress) decides stale seconds later
    alone = scaler.restart()
    assert not alone._may_decide(alone._started + 2 * stale - 0.1)
    assert alone._may_decide(alone._started + 2 * stale)


def test_the_first_snapshot_waits_a_heartbeat_round_from_the_first_call() -> None:
    registry = worker_registry.WorkerRegistry("t", heartbeat_seconds=0.2)
    time.sleep(0.3)  # longer than the wait: published late
    started = time.monotonic()
    asyncio.run(registry.wait_until_full())
    assert time.monotonic() - started >= 0.2
    started = time.monotonic()
    asyncio.run(registry.wait_until_full())
    assert time.monotonic() - started < 0.1
