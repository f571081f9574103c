"""Billing on the worker (Generator._serve with app/tenancy/reports.py): a request is billed
with the engine's counts however it ends. A finished one's terminal batch goes out only once
the TenantLedger acknowledged its usage, and reports of requests that end while a call is out go
together in the next call; a ledger that does not answer does not hold the reply (the report is
retried behind it); a client that leaves is billed what the engine generated before it left; a
refusal before the engine bills nothing and releases the request's limits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.config import AppConfig
from app.deployments.calls import ENDED, WorkerItem
from app.deployments.generator import Generator
from app.deployments.kv_source import KVSource
from app.errors import InvalidRequest, QueueFull
from app.protocol.generation import (
    EngineCounts,
    GenerationChunk,
    GenerationRequest,
    SamplingOptions,
)
from app.tenancy.reports import UsageReports
from app.tenancy.usage import UsageRecord


class Ledger:
    """Stands in for `TenantLedger.record_usage`: each call waits for its gate (or fails)."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, UsageRecord | None]]] = []
        self.gates: list[asyncio.Future[None]] = []

    def __call__(self, sent: list[tuple[str, UsageRecord | None]]) -> Any:
        self.calls.append(list(sent))
        gate = asyncio.get_running_loop().create_future()
        self.gates.append(gate)
        return gate

    def ids(self) -> list[list[str]]:
        return [[request_id for request_id, _ in call] for call in self.calls]


class Engine:
    """A worker whose engine prefills 3 prompt tokens (1 cached), then makes one token per
    step: `tokens` steps, then the terminal batch; a request id starting with "refused" is
    refused before the engine, "broken" fails after its first token, "slow" waits forever
    after its second."""

    def __init__(self, tokens: int = 2) -> None:
        self.tokens = tokens
        self.counts: dict[str, EngineCounts] = {}  # request id -> what it counts into

    async def stream(
        self, request: GenerationRequest, counts: EngineCounts
    ) -> AsyncIterator[list[GenerationChunk]]:
        name = request.request_id
        self.counts[name] = counts
        if name.startswith("refused"):
            raise QueueFull("the queue is full")
        for step in range(self.tokens):
            await asyncio.sleep(0)
            counts.output(3, 1, 1, first=step == 0)
            yield [GenerationChunk("x", is_first=step == 0)]
            if name.startswith("broken"):
                raise RuntimeError("the engine died")
            if name.startswith("slow") and step == 1:
                await asyncio.Event().wait()
        yield [GenerationChunk("", done=True, finish_reason="stop", completion_tokens=self.tokens)]


class Replica(Generator):
    """The replica's request path, without Serve (nothing to shut down)."""

    def __del__(self) -> None:  # type: ignore[override]
        pass


def generator(ledger: Ledger, engine: Engine, releases: bool = True) -> Generator:
    worker = Replica.__new__(Replica)
    worker._worker = engine  # type: ignore[assignment]
    worker._billing = UsageReports(ledger, releases=releases)
    worker._running = {}
    worker._settling = set()
    worker._kv = KVSource(engine, AppConfig(), "test")  # type: ignore[arg-type]  # events off
    return worker


class Reader:
    """What the call's stream carries for each request (`put`)."""

    def __init__(self) -> None:
        self.items: dict[str, list[WorkerItem]] = {}

    def put(self, request_id: str, item: WorkerItem) -> None:
        self.items.setdefault(request_id, []).append(item)

    def ended(self, request_id: str) -> bool:
        items = self.items.get(request_id, [])
        return bool(items) and (items[-1] is ENDED or isinstance(items[-1], Exception))


def request(request_id: str) -> GenerationRequest:
    return GenerationRequest(
        request_id, "m", SamplingOptions(max_new_tokens=4), prompt="hi", pool="team"
    )


def usage(request_id: str, completion: int) -> UsageRecord:
    return UsageRecord(request_id, "team", "m", "none", 3, 1, completion)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_the_terminal_batch_waits_for_the_ledger_and_reports_travel_together() -> None:
    ledger, reader = Ledger(), Reader()
    worker = generator(ledger, Engine())
    first = asyncio.create_task(worker._serve(request("a"), reader.put))
    await settle()
    assert ledger.calls == [[("a", usage("a", 2))]]  # the engine's counts
    assert len(reader.items["a"]) == 2  # its tokens went out; not its terminal batch yet
    later = [asyncio.create_task(worker._serve(request(n), reader.put)) for n in ("b", "c")]
    await settle()
    ledger.gates[0].set_result(None)
    await first
    assert reader.ended("a") and len(reader.items["a"]) == 4  # tokens, terminal, ENDED
    await settle()
    assert ledger.ids() == [["a"], ["b", "c"]]  # ended meanwhile: one call
    ledger.gates[1].set_result(None)
    await asyncio.gather(*later)
    await settle()
    assert len(ledger.calls) == 2  # acknowledged before the reply: no report after it


async def test_a_silent_ledger_does_not_hold_the_reply_and_the_report_is_retried() -> None:
    ledger, reader = Ledger(), Reader()
    worker = generator(ledger, Engine())
    worker._billing = UsageReports(ledger, before_reply_s=0.05)
    await asyncio.wait_for(worker._serve(request("a"), reader.put), 1.0)  # not held past it
    assert reader.ended("a")
    ledger.gates[0].set_exception(ConnectionError("ledger restarting"))
    await settle()
    assert ledger.ids() == [["a"], ["a"]]  # retried behind the reply (counted once by id)
    ledger.gates[1].set_result(None)
    await settle()
    assert not worker._billing._later  # acknowledged: nothing left to retry


async def test_a_client_that_leaves_is_billed_what_the_engine_generated() -> None:
    ledger, reader = Ledger(), Reader()
    worker = generator(ledger, Engine(tokens=400))
    task = asyncio.create_task(worker._serve(request("slow"), reader.put))
    await settle()
    assert len(reader.items["slow"]) == 2 and ledger.calls == []
    task.cancel()  # Generator.cancel, or the call closed: the client left
    with pytest.raises(asyncio.CancelledError):
        await task
    await settle()
    assert ledger.calls == [[("slow", usage("slow", 2))]]


async def test_a_client_that_leaves_is_billed_once_its_engine_requests_ended() -> None:
    """An engine request still open when the cancellation reaches the worker's task (vLLM's
    OpenAI layer aborts a completion list's prompts in tasks of their own) is counted as its
    abort ends: the bill waits for it."""
    ledger, reader = Ledger(), Reader()
    engine = Engine(tokens=400)
    worker = generator(ledger, engine)
    task = asyncio.create_task(worker._serve(request("slow"), reader.put))
    await settle()
    task.cancel()
    counts = engine.counts["slow"]
    counts.open_requests += 1  # an abort still under way
    with pytest.raises(asyncio.CancelledError):
        await task
    await settle()
    assert ledger.calls == []
    counts.output(3, 1, 1, first=False)  # what the abort found unread
    counts.open_requests -= 1
    await asyncio.sleep(0.05)
    await settle()
    assert ledger.calls == [[("slow", usage("slow", 3))]]


async def test_a_reply_cancelled_while_its_bill_is_out_is_still_billed() -> None:
    """The caller went away (an ingress replica killed) while the finished request waited for
    the ledger's acknowledgement: the cancellation ends the reply, not its report."""
    ledger, reader = Ledger(), Reader()
    worker = generator(ledger, Engine())
    task = asyncio.create_task(worker._serve(request("a"), reader.put))
    await settle()
    assert ledger.ids() == [["a"]]  # the bill is out, unacknowledged
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    ledger.gates[0].set_exception(ConnectionError("the call went with its caller"))
    await settle()
    assert ledger.ids() == [["a"], ["a"]]  # sent again behind it (counted once by id)
    ledger.gates[1].set_result(None)
    await settle()
    assert not worker._billing._later


async def test_a_failure_mid_way_is_billed_before_its_error_goes_out() -> None:
    ledger, reader = Ledger(), Reader()
    worker = generator(ledger, Engine())
    task = asyncio.create_task(worker._serve(request("broken"), reader.put))
    await settle()
    assert ledger.calls == [[("broken", usage("broken", 1))]]
    assert not reader.ended("broken")
    ledger.gates[0].set_result(None)
    await task
    assert reader.ended("broken") and reader.items["broken"][-1].status == 500  # type: ignore[union-attr]


async def test_a_refusal_before_the_engine_bills_nothing_and_releases_the_limits() -> None:
    ledger, reader = Ledger(), Reader()
    worker = generator(ledger, Engine())
    task = asyncio.create_task(worker._serve(request("refused"), reader.put))
    await settle()
    assert ledger.calls == [[("refused", None)]]  # counted nowhere; its limits released
    ledger.gates[0].set_result(None)
    await task
    assert isinstance(reader.items["refused"][-1], QueueFull)


async def test_with_leased_limits_a_refusal_before_the_engine_makes_no_ledger_call() -> None:
    """`tenancy.leased_limits` (the default): the ingress replica releases its own limits, so
    a report without usage would be a ledger call for nothing (under a flood, one per refusal);
    one with usage still goes."""
    ledger, reader = Ledger(), Reader()
    worker = generator(ledger, Engine(), releases=False)
    await asyncio.wait_for(worker._serve(request("refused"), reader.put), 5)
    assert ledger.calls == [] and isinstance(reader.items["refused"][-1], QueueFull)
    reports = UsageReports(ledger, releases=False)
    reports.later("gone", None)
    billed = asyncio.create_task(reports.before_reply("done", usage("done", 2)))
    await settle()
    assert ledger.calls == [[("done", usage("done", 2))]]
    ledger.gates[0].set_result(None)
    await billed


def test_engine_counts_add_every_engine_request() -> None:
    counts = EngineCounts()
    counts.output(10, 8, 1, first=True)
    counts.output(10, 8, 3, first=False)
    counts.output(6, 0, 2, first=True)
    assert counts == EngineCounts(16, 8, 6, 2)
    assert InvalidRequest("x").status == 400  # a refusal is a ServiceError: an item, not a crash
