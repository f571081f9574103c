"""The ingress's usage reports (ServeBackend.stream): a request's terminal batch reaches its
client only once the TenantLedger acknowledged its usage; reports of requests that end while a
call is out go together in the next call; a ledger that does not answer does not hold the reply
(the report is retried behind it); a request without usage makes no call before its reply."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from app.config import AppConfig
from app.deployments import ingress
from app.deployments.ingress import ServeBackend
from app.protocol.generation import GenerationChunk, GenerationRequest, SamplingOptions


class Ledger:
    """Stands in for `TenantLedger.report_usage`: each call waits for its gate (or fails)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gates: list[asyncio.Future[None]] = []

    def remote(self, reports: list[tuple[str, Any]]) -> Any:
        self.calls.append([request_id for request_id, _ in reports])
        gate = asyncio.get_running_loop().create_future()
        self.gates.append(gate)
        return gate


def backend_with(ledger: Ledger) -> ServeBackend:
    async def snapshot(version: str | None) -> tuple[str, tuple[list[Any], dict[str, Any]]]:
        return "1", ([], {})

    registry = SimpleNamespace(routing_snapshot_since=SimpleNamespace(remote=snapshot))
    backend = ServeBackend(
        AppConfig(),
        {},
        registry,  # type: ignore[arg-type]
        SimpleNamespace(report_usage=ledger),  # type: ignore[arg-type]
    )

    async def generate(request: GenerationRequest) -> AsyncIterator[list[GenerationChunk]]:
        yield [GenerationChunk("hello", is_first=True)]
        if request.request_id.startswith("failed"):
            yield [GenerationChunk("", done=True, finish_reason="error", error_code="x")]
        else:
            yield [
                GenerationChunk(
                    "", done=True, finish_reason="stop", prompt_tokens=3, completion_tokens=1
                )
            ]

    backend._generate = generate  # type: ignore[method-assign]
    return backend


def request(request_id: str) -> GenerationRequest:
    return GenerationRequest(request_id, "m", SamplingOptions(max_new_tokens=4), prompt="hi")


async def drain(backend: ServeBackend, request_id: str) -> list[list[GenerationChunk]]:
    return [batch async for batch in backend.stream(request(request_id))]


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_the_terminal_batch_waits_for_the_ledger_and_reports_travel_together() -> None:
    ledger = Ledger()
    backend = backend_with(ledger)
    first = asyncio.create_task(drain(backend, "a"))
    await settle()
    assert ledger.calls == [["a"]]
    later = [asyncio.create_task(drain(backend, name)) for name in ("b", "c")]
    await settle()
    assert not first.done()  # its usage block is not sent before the ledger has it
    ledger.gates[0].set_result(None)
    assert len(await first) == 2
    await settle()
    assert ledger.calls == [["a"], ["b", "c"]]  # ended meanwhile: one call
    ledger.gates[1].set_result(None)
    await asyncio.gather(*later)
    await settle()
    assert len(ledger.calls) == 2  # acknowledged before the reply: no report after it


async def test_a_silent_ledger_does_not_hold_the_reply_and_the_report_is_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ingress, "REPORT_BEFORE_REPLY_SECONDS", 0.05)
    ledger = Ledger()
    backend = backend_with(ledger)
    batches = await asyncio.wait_for(drain(backend, "a"), 1.0)  # not held past the limit
    assert len(batches) == 2
    ledger.gates[0].set_exception(ConnectionError("ledger restarting"))
    await settle()
    assert ledger.calls == [["a"], ["a"]]  # retried behind the reply (counted once by id)
    ledger.gates[1].set_result(None)
    await settle()
    assert not backend._reports  # acknowledged: nothing left to retry


async def test_a_request_without_usage_is_reported_after_its_reply() -> None:
    ledger = Ledger()
    backend = backend_with(ledger)
    ledger_free = await asyncio.wait_for(drain(backend, "failed"), 1.0)
    assert len(ledger_free) == 2 and ledger.calls == []  # no call before the reply
    # nothing was admitted against a limit (no limits configured) and nothing is counted
    await settle()
    assert ledger.calls == []
