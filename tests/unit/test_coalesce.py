"""Chunk coalescing: latency of the first batch, batching of the rest, errors, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.engine.coalesce import coalesce


class Source:
    def __init__(self, count: int, delay_s: float, fail_at: int | None = None) -> None:
        self.count, self.delay_s, self.fail_at = count, delay_s, fail_at
        self.closed = False
        self.produced = 0

    async def items(self) -> AsyncIterator[int]:
        try:
            for index in range(self.count):
                await asyncio.sleep(self.delay_s)
                if index == self.fail_at:
                    raise ValueError("engine failed")
                self.produced += 1
                yield index
        finally:
            self.closed = True


async def collect(
    source: AsyncIterator[int], window_s: float, max_items: int = 1000
) -> list[list[int]]:
    return [batch async for batch in coalesce(source, window_s=window_s, max_items=max_items)]


async def test_every_item_arrives_once_and_in_order() -> None:
    batches = await collect(Source(200, 0).items(), window_s=0.01)
    assert [item for batch in batches for item in batch] == list(range(200))


async def test_fast_items_are_coalesced_into_few_batches() -> None:
    batches = await collect(Source(500, 0).items(), window_s=0.02)
    assert len(batches) < 50, len(batches)


async def test_first_batch_is_not_held_back_by_the_window() -> None:
    source = Source(3, 0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    stream = coalesce(source.items(), window_s=1.0, max_items=100)
    first = await anext(stream)
    assert first == [0]
    assert loop.time() - started < 0.5
    await stream.aclose()


async def test_slow_items_are_not_delayed_beyond_the_window() -> None:
    batches = await collect(Source(5, 0.05).items(), window_s=0.005)
    assert len(batches) == 5


async def test_max_items_bounds_a_batch() -> None:
    batches = await collect(Source(100, 0).items(), window_s=0.5, max_items=7)
    assert max(len(batch) for batch in batches) <= 7


async def test_error_is_raised_after_the_items_before_it() -> None:
    received: list[int] = []
    with pytest.raises(ValueError, match="engine failed"):
        async for batch in coalesce(
            Source(10, 0.001, fail_at=4).items(), window_s=0.01, max_items=100
        ):
            received.extend(batch)
    assert received == [0, 1, 2, 3]


async def test_closing_early_closes_the_source() -> None:
    source = Source(1000, 0.01)
    stream = coalesce(source.items(), window_s=0.01, max_items=100)
    await anext(stream)
    await stream.aclose()
    await asyncio.sleep(0.05)
    assert source.closed
    assert source.produced < 1000


async def test_cancelling_the_consumer_closes_the_source() -> None:
    source = Source(1000, 0.01)

    async def consume() -> None:
        async for _ in coalesce(source.items(), window_s=0.01, max_items=100):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert source.closed


async def test_nothing_wakes_while_the_source_is_quiet() -> None:
    """Between slow engine steps (here 300 ms) the consumer sleeps on the source alone: the
    window's timer is set once per batch, when its first item arrives, not every window."""
    loop = asyncio.get_running_loop()
    timers = 0
    call_at = loop.call_at

    def counting_call_at(when: float, callback: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal timers
        timers += 1
        return call_at(when, callback, *args, **kwargs)

    loop.call_at = counting_call_at  # type: ignore[method-assign]
    try:
        batches = await collect(Source(4, 0.3).items(), window_s=0.01)
    finally:
        del loop.call_at
    assert [item for batch in batches for item in batch] == [0, 1, 2, 3]
    # the sleeps of the source itself set 4 timers; the windows of batches 2-4 at most 3 more
    # (polling every 10 ms set ~90)
    assert timers <= 8, timers
