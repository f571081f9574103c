"""Leased limits in the ingress replica (`tenancy.leased_limits`: ServeBackend over
app.tenancy.quota): decided locally; with the TenantLedger unavailable they fall back to each limit divided among the replicas, which
/health shows and `poolserve_limit_decisions_total{mode="fallback"}` counts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from app import metrics
from app.config import AppConfig
from app.deployments.ingress import ServeBackend
from app.errors import RateLimited
from app.protocol.generation import GenerationChunk, GenerationRequest, SamplingOptions


def backend_with_ledger_down() -> ServeBackend:
    async def snapshot(version: str | None) -> tuple[str, tuple[list[Any], dict[str, Any]]]:
        return "1", ([], {})

    async def unavailable(*_: Any) -> Any:
        raise ConnectionError("the TenantLedger is restarting")

    async def reported(reports: Any) -> None:
        return None

    config = AppConfig.model_validate(
        {"tenancy": {"leased_limits": True, "default_key_limits": {"requests_per_minute": 3}}}
    )
    backend = ServeBackend(
        config,
        {},
        SimpleNamespace(routing_snapshot_since=SimpleNamespace(remote=snapshot)),  # type: ignore[arg-type]
        SimpleNamespace(  # type: ignore[arg-type]
            sync=SimpleNamespace(remote=unavailable),
            report_usage=SimpleNamespace(remote=reported),
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


async def test_without_the_ledger_limits_fall_back_are_counted_and_shown() -> None:
    metrics.LIMIT_DECISIONS.values.clear()
    backend = backend_with_ledger_down()
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
