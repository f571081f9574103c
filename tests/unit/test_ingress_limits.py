"""Limits in the ingress replica with the TenantLedger unavailable, leased
(`app.tenancy.quota`) or decided at the ledger (`app.tenancy.ledger_limits`): as
`tenancy.on_ledger_unavailable` says (each limit divided among the replicas, no limit, or
refused), which /health shows and `poolserve_limit_decisions_total{mode="fallback"}` counts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from app import metrics
from app.config import AppConfig
from app.deployments.ingress import ServeBackend
from app.errors import LimitsUnavailable, RateLimited
from app.protocol.generation import GenerationChunk, GenerationRequest, SamplingOptions


def backend_with_ledger_down(leased: bool = True, fallback: str = "divide") -> ServeBackend:
    async def snapshot(version: str | None) -> tuple[str, tuple[list[Any], dict[str, Any]]]:
        return "1", ([], {})

    async def unavailable(*_: Any) -> Any:
        raise ConnectionError("the TenantLedger is restarting")

    async def recorded(records: Any) -> None:
        return None

    config = AppConfig.model_validate(
        {
            "tenancy": {
                "leased_limits": leased,
                "on_ledger_unavailable": fallback,
                "default_key_limits": {"requests_per_minute": 3},
            }
        }
    )
    backend = ServeBackend(
        config,
        {},
        SimpleNamespace(routing_snapshot_since=SimpleNamespace(remote=snapshot)),  # type: ignore[arg-type]
        SimpleNamespace(  # type: ignore[arg-type]
            sync=SimpleNamespace(remote=unavailable),
            admit=SimpleNamespace(remote=unavailable),
            record_usage=SimpleNamespace(remote=recorded),
        ),
    )

    async def generate(request: GenerationRequest) -> AsyncIterator[list[GenerationChunk]]:
        yield [
            GenerationChunk(
                "", done=True, finish_reason="stop", prompt_tokens=1, completion_tokens=1
            )
        ]

    backend._generate = generate  # type: ignore[method-assign]
    return backend


@pytest.mark.parametrize("leased", [True, False], ids=["leased", "at the ledger"])
async def test_without_the_ledger_limits_fall_back_are_counted_and_shown(leased: bool) -> None:
    metrics.LIMIT_DECISIONS.values.clear()
    backend = backend_with_ledger_down(leased)
    for index in range(3):
        request = GenerationRequest(
            f"r{index}", "m", SamplingOptions(max_new_tokens=1), prompt="hi", key_id="k1"
        )
        assert [batch async for batch in backend.stream(request)]
    with pytest.raises(RateLimited) as refused:
        request = GenerationRequest(
            "r3", "m", SamplingOptions(max_new_tokens=1), prompt="hi", key_id="k1"
        )
        [batch async for batch in backend.stream(request)]
    assert refused.value.status == 429 and refused.value.retry_after_s
    health = backend.limits_health()
    assert health is not None and health["mode"] == "fallback"
    assert health["ledger_unavailable_seconds"] is not None
    decided = metrics.LIMIT_DECISIONS.values
    assert decided.get(("fallback", "refused")) == 1
    assert sum(v for (mode, outcome), v in decided.items() if outcome == "admitted") == 3
    assert decided.get(("leased", "admitted")) is None


def limited(request_id: str) -> GenerationRequest:
    return GenerationRequest(
        request_id, "m", SamplingOptions(max_new_tokens=1), prompt="hi", key_id="k1"
    )


@pytest.mark.parametrize("leased", [True, False], ids=["leased", "at the ledger"])
async def test_on_ledger_unavailable_open_admits_and_closed_refuses(leased: bool) -> None:
    metrics.LIMIT_DECISIONS.values.clear()
    open_backend = backend_with_ledger_down(leased, "open")
    for index in range(5):  # past the limit of 3: nothing decides it
        assert [batch async for batch in open_backend.stream(limited(f"o{index}"))]
    decided = metrics.LIMIT_DECISIONS.values
    assert sum(v for (_, outcome), v in decided.items() if outcome == "admitted") == 5
    assert decided.get(("fallback", "admitted"), 0) >= 4  # (leased: the first while starting)
    closed = backend_with_ledger_down(leased, "closed")
    with pytest.raises(LimitsUnavailable) as refused:
        [batch async for batch in closed.stream(limited("c0"))]
    assert refused.value.status == 503 and refused.value.retry_after_s
    health = closed.limits_health()
    assert health is not None and health["mode"] == "fallback" and health["fallback"] == "closed"
    assert metrics.LIMIT_DECISIONS.values.get(("fallback", "refused")) == 1
