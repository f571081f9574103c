"""Prometheus metrics and the dashboard feed, in process (LocalBackend: fake engine, real
decide): known traffic moves the counters and histograms by the expected amounts."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app import metrics
from app.api.observe import RequestMetrics, instrument
from app.api.streaming import ChunkStream
from app.config import AppConfig
from app.history import percentile
from app.protocol.generation import GenerationRequest, SamplingOptions
from app.server import create_app
from tests.fakes.local_backend import LocalBackend

MODEL = "org/fake-model"
CHAT = "/v1/chat/completions"
GENERATE = "/v1/generate/org__fake-model"
GENERATE_ROUTE = "/v1/generate/{model:path}"


class AutoscalingBackend(LocalBackend):
    """LocalBackend plus the read-only autoscaler accessor ServeBackend has."""

    status: dict[str, Any] = {"reasons": [], "replicas": {}}

    async def autoscaler_status(self) -> dict[str, Any]:
        return self.status


@pytest.fixture
def backend() -> AutoscalingBackend:
    config = AppConfig.model_validate(
        {
            "engine_adapter": "tests.fakes.fake_engine:FakeAdapter",
            "models": [{"id": MODEL}],
            "profiles": [{"name": "cpu"}],
        }
    )
    return AutoscalingBackend(config)


@pytest.fixture
def client(backend: LocalBackend) -> Iterator[TestClient]:
    with TestClient(instrument(create_app(backend.config, backend))) as test_client:
        test_client.portal.call(backend.start)  # type: ignore[union-attr]
        yield test_client


def value(name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(
        sample.value
        for family in metrics.REGISTRY.collect()
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def snapshot(names: list[tuple[str, dict[str, str]]]) -> list[float]:
    return [value(name, **labels) for name, labels in names]


def test_known_traffic_moves_counters_and_histograms(client: TestClient) -> None:
    route = {"route": GENERATE_ROUTE}
    watched = [
        ("poolserve_requests_total", {**route, "method": "POST", "status": "200", "code": "none"}),
        ("poolserve_generation_tokens_total", route),
        ("poolserve_prompt_tokens_total", route),
        ("poolserve_time_to_first_token_seconds_count", route),
        ("poolserve_engine_time_to_first_token_seconds_count", route),
        ("poolserve_queue_time_seconds_count", route),
        ("poolserve_time_per_output_token_seconds_count", route),
        ("poolserve_engine_time_per_output_token_seconds_count", route),
        (
            "poolserve_requests_total",
            {
                "route": GENERATE_ROUTE,
                "method": "POST",
                "status": "400",
                "code": "unsupported_field",
            },
        ),
    ]
    before = snapshot(watched)
    for stream in (False, True, False):
        response = client.post(
            GENERATE, json={"prompt": "one two three", "max_new_tokens": 5, "stream": stream}
        )
        assert response.status_code == 200
    bad = client.post(GENERATE, json={"prompt": "x", "max_new_tokens": 1, "bogus": 1})
    assert bad.status_code == 400
    missing = client.post("/v1/generate/no__such", json={"prompt": "x", "max_new_tokens": 1})
    missing_status, missing_code = missing.status_code, missing.headers["x-sie-error-code"]
    assert missing_status >= 400
    after = snapshot(watched)
    delta = [b - a for a, b in zip(before, after, strict=True)]
    assert delta[:8] == [3, 15, 9, 3, 3, 3, 3, 3]
    assert delta[8] == 1
    not_found = value(
        "poolserve_requests_total",
        **route,
        method="POST",
        status=str(missing_status),
        code=missing_code,
    )
    assert not_found >= 1
    assert value("poolserve_streams_in_flight", **route) == 0
    assert value("poolserve_time_to_first_token_seconds_sum", **route) > 0


def test_unmatched_routes_have_one_bounded_label(client: TestClient) -> None:
    before = value(
        "poolserve_requests_total", route="unmatched", method="GET", status="404", code="not_found"
    )
    for index in range(3):
        assert client.get(f"/no/such/path/{index}").status_code == 404
    after = value(
        "poolserve_requests_total", route="unmatched", method="GET", status="404", code="not_found"
    )
    assert after - before == 3


def test_closing_a_stream_early_counts_a_cancellation(backend: LocalBackend) -> None:
    async def run() -> None:
        await backend.start()
        request = GenerationRequest(
            request_id="r1", model=MODEL, prompt="hi", sampling=SamplingOptions(max_new_tokens=50)
        )
        stream = await ChunkStream.open(backend, request)
        batches = stream.batches()
        await anext(batches)
        assert value("poolserve_streams_in_flight", route="unmatched") == 1
        await batches.aclose()

    before = value("poolserve_generation_cancellations_total", route="unmatched")
    asyncio.run(run())
    assert value("poolserve_generation_cancellations_total", route="unmatched") - before == 1
    assert value("poolserve_streams_in_flight", route="unmatched") == 0


def test_client_disconnect_is_counted_once() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        message = await receive()
        assert message["type"] == "http.disconnect"
        raise asyncio.CancelledError

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        return None

    before = value("poolserve_client_disconnects_total", route="unmatched")
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(RequestMetrics(app)({"type": "http", "method": "GET"}, receive, send))
    assert value("poolserve_client_disconnects_total", route="unmatched") - before == 1


def test_metrics_route_exports_workers_kv_and_pools(
    client: TestClient, backend: AutoscalingBackend
) -> None:
    assert client.post("/v1/pools", json={"name": "bench", "gpus": {"cpu": 1}}).status_code == 200
    backend.status = {
        "reasons": [
            {"at": 10.0, "kind": "scale_up", "reason": "cpu: 1 -> 2 workers (default 1, bench 1)"},
            {
                "at": 10.0,
                "kind": "worker_assigned",
                "reason": "worker local-cpu (cpu) -> pool 'bench'",
            },
        ],
        "replicas": {"cpu": 2},
    }
    metrics.TALLY.seen_until = float("-inf")
    before = value("poolserve_autoscaler_decisions_total", kind="scale_up")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "poolserve_kv_blocks{" in response.text
    (worker,) = client.portal.call(backend.workers)  # type: ignore[union-attr]
    total = metrics.kv_view(worker).blocks_total
    kv = {
        s: value("poolserve_kv_blocks", worker="local-cpu", profile="cpu", state=s)
        for s in ("used", "free")
    }
    assert total > 0 and kv == {"used": 0, "free": total}
    assert value("poolserve_pool_workers", pool="bench", profile="cpu", state="ready") == 1
    assert value("poolserve_pools", state="active") == 1
    assert value("poolserve_autoscaler_target_replicas", profile="cpu") == 2
    assert value("poolserve_autoscaler_decisions_total", kind="scale_up") - before == 1
    client.get("/metrics")  # the same history is not counted twice
    assert value("poolserve_autoscaler_decisions_total", kind="scale_up") - before == 1


def test_dashboard_feed_and_page(client: TestClient) -> None:
    assert client.post("/v1/pools", json={"name": "bench", "gpus": {"cpu": 1}}).status_code == 200
    client.post(GENERATE, json={"prompt": "one", "max_new_tokens": 3})
    state = client.get("/dashboard/api/state").json()
    pools = {pool["name"]: pool for pool in state["pools"]}
    assert set(pools) == {"default", "bench"}
    bench = pools["bench"]
    assert bench["state"] == "active" and bench["assigned"] == {"cpu": 1}
    assert 0 < bench["expires_in_s"] <= bench["lease_seconds"]
    (worker,) = state["workers"]
    assert (worker["pool"], worker["state"]) == ("bench", "ready")
    assert worker["kv"]["blocks_total"] > 0 and worker["kv"]["engine_usage"] == 0
    assert state["latency"]["requests"] >= 1 and state["requests"]["total"] >= 2
    assert state["autoscaler"]["decisions"] == [] and state["problems"] == {}
    page = client.get("/dashboard")
    assert page.status_code == 200 and "dashboard/static/dashboard.js" in page.text
    assert (
        client.get("/dashboard/static/dashboard.js")
        .headers["content-type"]
        .startswith("text/javascript")
    )
    assert client.get("/dashboard/static/../state.py").status_code == 404


def test_dashboard_without_autoscaler_says_so() -> None:
    config = AppConfig.model_validate(
        {"engine_adapter": "tests.fakes.fake_engine:FakeAdapter", "models": [{"id": MODEL}]}
    )
    plain = LocalBackend(config)
    with TestClient(create_app(config, plain)) as test_client:
        state = test_client.get("/dashboard/api/state").json()
    assert state["autoscaler"] is None
    assert "autoscaler" in state["problems"]
    assert state["workers"][0]["state"] == "loading"  # never started: an honest state


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(map(float, range(1, 101))), 99) == 99.0


def test_unhandled_error_counts_as_internal_error() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        return None

    labels = {"route": "unmatched", "method": "GET", "status": "500", "code": "internal_error"}
    before = value("poolserve_requests_total", **labels)
    with pytest.raises(RuntimeError):
        asyncio.run(RequestMetrics(app)({"type": "http", "method": "GET"}, receive, send))
    assert value("poolserve_requests_total", **labels) - before == 1


def test_dashboard_collapses_repeated_decisions() -> None:
    from app.dashboard.state import collapse_repeats

    reasons = [
        {"at": 1.0, "kind": "worker_assigned", "reason": "worker w (cpu) -> pool 'bench'"},
        *(
            {"at": at, "kind": "scale_up", "reason": "cpu: 1 -> 2 workers (default 1, bench 1)"}
            for at in (1.0, 2.0, 3.0)
        ),
    ]
    rows = collapse_repeats(reasons)
    assert [(r["kind"], r["repeats"], r["first_at"], r["at"]) for r in rows] == [
        ("scale_up", 3, 1.0, 3.0),
        ("worker_assigned", 1, 1.0, 1.0),
    ]
