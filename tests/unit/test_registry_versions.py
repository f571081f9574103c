"""Versioned pulls of the PoolAutoscaler's routing snapshot (routing_snapshot_since): a pull
while nothing an ingress routes by changed is a version only; a new worker, a changed model
state, a pool change or a worker back from stale is a new version; and the version moves every
worker_stale_seconds / 2 so no ingress judges liveness by times older than that."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from app.config import AppConfig
from app.deployments import autoscaler, pool_store
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

    created = loop.run_until_complete(make())
    created._loop.cancel()
    created._registry._full_at = 0.0
    created.run = loop.run_until_complete
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
