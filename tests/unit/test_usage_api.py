"""`GET /v1/usage?pool=` over HTTP, in process (LocalBackend): a deleted pool's usage can still
be asked for by name (an invoice outlives its pool); a name that never was a pool nor used
anything is 404 POOL_NOT_FOUND."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.config import AppConfig
from app.server import create_app
from tests.fakes.local_backend import LocalBackend

GENERATE = "/v1/generate/org__fake-model"


@pytest.fixture
def client() -> Iterator[TestClient]:
    config = AppConfig.model_validate(
        {
            "engine_adapter": "tests.fakes.fake_engine:FakeAdapter",
            "models": [{"id": "org/fake-model"}],
            "profiles": [{"name": "cpu"}],
        }
    )
    backend = LocalBackend(config)
    with TestClient(create_app(config, backend)) as test_client:
        test_client.portal.call(backend.start)  # type: ignore[union-attr]
        yield test_client


def test_a_deleted_pools_usage_is_answered_by_name(client: TestClient) -> None:
    created = client.post("/v1/pools", json={"name": "team-a", "gpus": {"cpu": 1}, "shared": True})
    assert created.status_code == 200, created.text
    reply = client.post(
        GENERATE, json={"prompt": "hi", "max_new_tokens": 3}, headers={"X-SIE-Pool": "team-a"}
    )
    assert reply.status_code == 200, reply.text
    assert client.delete("/v1/pools/team-a").status_code == 200
    assert client.get("/v1/pools/team-a").status_code == 404

    listed = client.get("/v1/usage").json()["pools"]["team-a"]
    by_name = client.get("/v1/usage", params={"pool": "Team-A"})
    assert by_name.status_code == 200, by_name.text
    report = by_name.json()
    assert report["pools"] == {"team-a": listed}
    assert report["pools"]["team-a"]["requests"] == 1
    assert report["pools"]["team-a"]["completion_tokens"] == 3
    assert [row["pool"] for row in report["usage"]] == ["team-a"]
    assert report["total"]["requests"] == 1

    # a window after its last request: the pool existed, so an empty report rather than 404
    later = client.get("/v1/usage", params={"pool": "team-a", "since": time.time() + 120})
    assert later.status_code == 200, later.text
    assert later.json()["pools"]["team-a"]["requests"] == 0


def test_a_pool_that_never_was_is_404(client: TestClient) -> None:
    missing = client.get("/v1/usage", params={"pool": "never-was"})
    assert missing.status_code == 404
    assert missing.json()["detail"]["code"] == "POOL_NOT_FOUND"
    # deleted before anything ran in it: no usage either
    assert client.post("/v1/pools", json={"name": "idle", "shared": True}).status_code == 200
    assert client.delete("/v1/pools/idle").status_code == 200
    assert client.get("/v1/usage", params={"pool": "idle"}).status_code == 404
