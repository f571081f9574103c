"""Pool routes and pool routing over HTTP, in process (LocalBackend: fake engine, real decide)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import AppConfig
from app.server import create_app
from tests.fakes.local_backend import LocalBackend

MODEL = "org/fake-model"
GENERATE = "/v1/generate/org__fake-model"
MSGPACK = {"Content-Type": "application/msgpack", "Accept": "application/json"}


@pytest.fixture
def backend() -> LocalBackend:
    config = AppConfig.model_validate(
        {
            "engine_adapter": "tests.fakes.fake_engine:FakeAdapter",
            "models": [{"id": MODEL, "profiles": ["cpu", "l4"]}],
            "profiles": [{"name": "cpu"}, {"name": "l4", "num_replicas": 0}],
            "pools": {"lease_seconds": 100},
        }
    )
    return LocalBackend(config)


@pytest.fixture
def client(backend: LocalBackend) -> Iterator[TestClient]:
    with TestClient(create_app(backend.config, backend)) as test_client:
        test_client.portal.call(backend.start)  # type: ignore[union-attr]
        yield test_client


def create(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/pools", json=body)


def generate(client: TestClient, pool: str | None = None, profile: str | None = None) -> Any:
    headers = {}
    if pool:
        headers["X-SIE-Pool"] = pool
    if profile:
        headers["X-SIE-MACHINE-PROFILE"] = profile
    return client.post(GENERATE, json={"prompt": "hi", "max_new_tokens": 2}, headers=headers)


def test_create_get_list_renew_delete(client: TestClient, backend: LocalBackend) -> None:
    created = create(client, name="Eval-Bench", gpus={"cpu": 1}, gpu_caps={"cpu": 1})
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["name"] == "eval-bench"
    assert body["spec"]["gpus"] == {"cpu": 1} and body["spec"]["gpu_caps"] == {"cpu": 1}
    assert body["status"]["state"] == "active", "the loaded cpu worker was assigned at once"
    assert body["status"]["assigned_workers"] == [
        {"name": "local-cpu", "url": "serve://Generator-cpu/local-cpu", "gpu": "cpu", "bundle": ""}
    ]

    got = client.get("/v1/pools/EVAL-BENCH", headers=MSGPACK)
    assert got.status_code == 200 and got.json()["name"] == "eval-bench"
    listed = client.get("/v1/pools", headers=MSGPACK).json()
    assert listed == {
        "pools": [{"name": "eval-bench", "state": "active", "gpus": {"cpu": 1}, "worker_count": 1}]
    }

    backend.clock = lambda: body["status"]["created_at"] + 50
    renewed = client.post("/v1/pools/Eval-Bench/renew", headers=MSGPACK)
    assert renewed.status_code == 200, renewed.text
    assert renewed.json()["status"]["last_renewed"] == body["status"]["created_at"] + 50

    deleted = client.delete("/v1/pools/eval-bench", headers=MSGPACK)
    assert deleted.status_code == 200
    assert client.delete("/v1/pools/eval-bench").status_code == 404
    assert client.get("/v1/pools/eval-bench").status_code == 404
    assert backend.book.assignments["local-cpu"] == "default", "the worker went back"


@pytest.mark.parametrize(
    ("request_call", "status", "code"),
    [
        (lambda c: c.get("/v1/pools/nope"), 404, "POOL_NOT_FOUND"),
        (lambda c: c.delete("/v1/pools/nope"), 404, "POOL_NOT_FOUND"),
        (lambda c: c.post("/v1/pools/nope/renew", headers=MSGPACK), 404, "POOL_NOT_FOUND"),
        (lambda c: create(c, name="p", gpus={"h100": 1}), 400, "invalid_request"),
        (
            lambda c: create(c, name="p", gpus={"cpu": 2}, gpu_caps={"cpu": 1}),
            400,
            "invalid_request",
        ),
        (lambda c: create(c, name="p", surprise=1), 400, "unsupported_field"),
        (lambda c: create(c, gpus={"cpu": 1}), 400, "invalid_request"),
        (lambda c: create(c, name="default"), 400, "invalid_request"),
        (lambda c: c.delete("/v1/pools/default"), 400, "invalid_request"),
        (lambda c: create(c, name="p", minimum_worker_count=-1), 400, "invalid_request"),
    ],
)
def test_pool_errors_use_the_detail_shape(
    client: TestClient, request_call: Any, status: int, code: str
) -> None:
    response = request_call(client)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, dict)
    assert detail["code"] == code
    assert isinstance(detail["message"], str) and detail["message"]


def test_default_pool_is_the_base_capacity(client: TestClient) -> None:
    body = client.get("/v1/pools/default").json()
    assert body["status"]["state"] == "active"
    assert {w["name"] for w in body["status"]["assigned_workers"]} == {"local-cpu", "local-l4"}


def test_routing_by_pool_and_profile(client: TestClient, backend: LocalBackend) -> None:
    assert generate(client).status_code == 200
    unknown = generate(client, pool="ghost", profile="cpu")
    assert unknown.status_code == 404
    assert unknown.json()["detail"]["code"] == "POOL_NOT_FOUND"

    assert create(client, name="team", gpus={"cpu": 1}).json()["status"]["state"] == "active"
    served = generate(client, pool="TEAM", profile="cpu")
    assert served.status_code == 200, served.text
    # the only cpu worker belongs to 'team' now: the default pool must wait for a new one
    waiting = generate(client, profile="cpu")
    assert waiting.status_code == 503
    assert waiting.json()["detail"]["code"] == "PROVISIONING"
    assert waiting.headers["Retry-After"] == "2"
    assert backend.demand.get(("default", "cpu")) is not None, "demand reaches the autoscaler"
    outside = generate(client, pool="team", profile="l4")
    assert outside.status_code == 400
    assert outside.json()["detail"]["param"] == "X-SIE-MACHINE-PROFILE"


def test_lazy_pool_provisions_on_demand(client: TestClient, backend: LocalBackend) -> None:
    create(client, name="lazy", gpu_caps={"l4": 1})
    first = generate(client, pool="lazy", profile="l4")
    assert first.status_code == 503 and first.json()["detail"]["code"] == "PROVISIONING"
    backend.settle()  # the autoscaler's next step sees the demand and assigns the l4 worker
    assert backend.book.assignments["local-l4"] == "lazy"
    assert generate(client, pool="lazy", profile="l4").status_code == 200


def test_expired_pool(client: TestClient, backend: LocalBackend) -> None:
    created = create(client, name="short", gpus={"cpu": 1}).json()
    backend.clock = lambda: created["status"]["created_at"] + 101
    assert client.get("/v1/pools/short").json()["status"]["state"] == "expired"
    assert backend.book.assignments["local-cpu"] == "default"
    expired = generate(client, pool="short", profile="cpu")
    assert expired.status_code == 410
    assert expired.json()["detail"]["code"] == "POOL_EXPIRED"
    revived = create(client, name="short", gpus={"cpu": 1}).json()
    assert revived["status"]["state"] == "active"


def test_health_shows_pools_and_worker_pools(client: TestClient) -> None:
    create(client, name="team", gpus={"cpu": 1})
    body = client.get("/health", headers=MSGPACK).json()
    assert body["type"] == "gateway"
    pools = {w["name"]: w["pool"] for w in body["workers"]}
    assert pools == {"local-cpu": "team", "local-l4": "default"}
    assert all("memory_used_bytes" in w for w in body["workers"])
    assert body["pools"] == [
        {
            "name": "team",
            "state": "active",
            "gpus": {"cpu": 1},
            "worker_count": 1,
            "assigned_workers": ["local-cpu"],
        }
    ]
