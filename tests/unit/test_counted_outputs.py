"""`counted_outputs`: a request counts what vLLM's stat logger counts for it, however it ends,
against an engine that counts as AsyncLLM does (an output's tokens when its output handler puts
it in the request's collector, vLLM's own `RequestOutputCollector`; none after an abort)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.output_processor import RequestOutputCollector

from app.engine.openai_frontend import counted_outputs
from app.protocol.generation import EngineCounts

PROMPT = [1, 2, 3, 4, 5]


@dataclass
class Live:
    queue: RequestOutputCollector
    prompt_tokens: int
    prefilling: bool = True
    tokens: list[int] = field(default_factory=list)


class CountingEngine:
    """AsyncLLM's add_request / abort and, in `step`, its output handler's counting; in
    FINAL_ONLY mode (a buffered reply) an output only at the end, with every token."""

    def __init__(self, final_only: bool = False) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.live: dict[str, Live] = {}
        self.final_only = final_only

    async def add_request(
        self, request_id: str, prompt: dict[str, Any], params: Any, **options: Any
    ) -> RequestOutputCollector:
        queue = RequestOutputCollector(RequestOutputKind.DELTA, request_id)
        self.live[request_id] = Live(queue, len(prompt["prompt_token_ids"]))
        return queue

    def step(self, request_id: str, tokens: list[int], finished: bool = False) -> None:
        live = self.live.get(request_id)
        if live is None:  # aborted: not counted
            return
        if live.prefilling:
            self.prompt_tokens += live.prompt_tokens
            live.prefilling = False
        self.generation_tokens += len(tokens)
        live.tokens += tokens
        if finished or not self.final_only:
            live.queue.put(output(request_id, live.tokens if self.final_only else tokens, finished))
        if finished:
            del self.live[request_id]

    async def abort(self, request_id: str, internal: bool = False) -> None:
        live = self.live.pop(request_id, None)
        if live is not None:
            live.queue.put(output(request_id, live.tokens if self.final_only else [], True))
        await asyncio.sleep(0)  # the message to the engine core

    def totals(self) -> tuple[int, int]:
        return self.prompt_tokens, self.generation_tokens


def output(request_id: str, tokens: list[int], finished: bool) -> RequestOutput:
    completion = CompletionOutput(0, "x" * len(tokens), list(tokens), None, None)
    return RequestOutput(request_id, None, PROMPT, None, [completion], finished, None, None)


def billed(counts: EngineCounts) -> tuple[int, int]:
    return counts.prompt_tokens, counts.completion_tokens


def outputs_of(engine: CountingEngine, counts: EngineCounts) -> AsyncGenerator[Any, None]:
    return counted_outputs(engine, {"prompt_token_ids": PROMPT}, None, "r", counts, len(PROMPT), {})


async def reading(
    engine: CountingEngine, counts: EngineCounts
) -> tuple[AsyncGenerator[Any, None], asyncio.Future[Any]]:
    """The request's outputs, with a reader already waiting for the first."""
    outputs = outputs_of(engine, counts)
    pending = asyncio.ensure_future(anext(outputs))
    await asyncio.sleep(0)
    return outputs, pending


async def test_an_output_put_just_before_its_reader_is_cancelled_is_counted() -> None:
    """The race: the output handler puts an output (vLLM counts it) and wakes the reader, but
    the reader's task is cancelled before it runs; it then wakes to the cancellation."""
    engine, counts = CountingEngine(), EngineCounts()
    read: list[Any] = []

    async def reader() -> None:
        async for each in outputs_of(engine, counts):
            read.append(each)

    task = asyncio.create_task(reader())
    await asyncio.sleep(0)
    engine.step("r", [7])
    await asyncio.sleep(0)
    assert len(read) == 1
    engine.step("r", [8])  # counted by the engine, the reader woken ...
    task.cancel()  # ... and cancelled before it ran
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert len(read) == 1
    assert engine.totals() == (5, 2)
    assert billed(counts) == (5, 2)
    assert counts.engine_requests == 1 and counts.open_requests == 0
    assert not engine.live  # aborted


async def test_outputs_made_while_the_reader_was_away_are_counted_when_it_closes() -> None:
    engine, counts = CountingEngine(), EngineCounts()
    outputs, pending = await reading(engine, counts)
    engine.step("r", [7])
    await pending
    engine.step("r", [8, 9])  # merged in the collector: nobody reads them
    engine.step("r", [10])
    await outputs.aclose()
    assert engine.totals() == billed(counts) == (5, 4)
    assert counts.open_requests == 0


async def test_a_request_cancelled_before_its_prefill_bills_nothing() -> None:
    engine, counts = CountingEngine(), EngineCounts()
    _outputs, pending = await reading(engine, counts)
    pending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await pending
    engine.step("r", [7])  # too late: aborted
    assert engine.totals() == billed(counts) == (0, 0)
    assert counts.engine_requests == 0 and counts.open_requests == 0


async def test_a_finished_output_nobody_read_is_counted() -> None:
    engine, counts = CountingEngine(), EngineCounts()
    outputs, pending = await reading(engine, counts)
    engine.step("r", [7])
    await pending
    engine.step("r", [8], finished=True)
    pending = asyncio.ensure_future(anext(outputs))
    pending.cancel()  # before it ran
    with contextlib.suppress(asyncio.CancelledError):
        await pending
    assert engine.totals() == billed(counts) == (5, 2)
    assert counts.open_requests == 0


async def test_a_request_read_to_its_end_is_counted_once_and_closed_at_its_last_output() -> None:
    engine, counts = CountingEngine(), EngineCounts()
    outputs = outputs_of(engine, counts)
    engine_steps = [[7], [8, 9], [10]]

    async def drive() -> None:
        for n, tokens in enumerate(engine_steps):
            await asyncio.sleep(0)
            engine.step("r", tokens, finished=n == len(engine_steps) - 1)

    driver = asyncio.create_task(drive())
    read = 0
    async for each in outputs:
        read += sum(len(c.token_ids) for c in each.outputs)
        if each.finished:
            assert counts.open_requests == 0  # before the reader goes on
    await driver
    assert read == 4
    assert engine.totals() == billed(counts) == (5, 4)
    assert counts.engine_requests == 1


async def test_a_buffered_reply_cut_mid_way_is_billed_what_vllm_counted() -> None:
    """FINAL_ONLY: nothing to read before the end; the abort's output carries every token."""
    engine, counts = CountingEngine(final_only=True), EngineCounts()
    _outputs, pending = await reading(engine, counts)
    for tokens in ([7], [8], [9]):
        engine.step("r", tokens)
    await asyncio.sleep(0)
    assert not pending.done()
    pending.cancel()  # its caller died
    with contextlib.suppress(asyncio.CancelledError):
        await pending
    assert engine.totals() == billed(counts) == (5, 3)
    assert counts.engine_requests == 1 and counts.open_requests == 0
