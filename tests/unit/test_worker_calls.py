"""app/deployments/calls.py without Ray: requests that arrive while a call is on its way share
the next call; each request's items reach its own inbox; a reader that leaves cancels only its
request (the whole call when it was the last); a failed call ends every request it carried."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from app.deployments.calls import ENDED, WorkerCalls
from app.errors import ServiceError, WorkerUnavailable
from app.protocol.generation import GenerationChunk, GenerationRequest, SamplingOptions


def request(request_id: str) -> GenerationRequest:
    return GenerationRequest(request_id, "m", SamplingOptions(max_new_tokens=1), prompt="hi")


class Worker:
    """Stands in for `Generator.generate`: acknowledges, then answers from `feed`."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.cancelled: list[str] = []
        self.closed = 0
        self.feeds: list[asyncio.Queue[Any]] = []  # one per call
        self.acked = asyncio.Event()

    def start(self, requests: list[GenerationRequest]) -> AsyncIterator[Any]:
        self.calls.append([r.request_id for r in requests])
        self.feeds.append(asyncio.Queue())
        return Response(self, self._stream(self.feeds[-1]))

    async def _stream(self, feed: asyncio.Queue[Any]) -> AsyncIterator[Any]:
        await self.acked.wait()
        yield {"active": 0}, []
        while True:
            message = await feed.get()
            if isinstance(message, Exception):
                raise message
            yield None, message

    async def cancel(self, request_ids: list[str]) -> None:
        self.cancelled.extend(request_ids)


class Response:
    """Like Serve's response generator: `cancel()` ends the call's stream."""

    def __init__(self, worker: Worker, stream: AsyncIterator[Any]) -> None:
        self.worker, self.stream = worker, stream

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> Any:
        return await anext(self.stream)

    def cancel(self) -> None:
        self.worker.closed += 1
        self.worker.feeds[-1].put_nowait(RuntimeError("cancelled"))


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_requests_arriving_during_a_call_share_the_next_and_get_their_own_items() -> None:
    worker = Worker()
    calls = WorkerCalls(worker.start, worker.cancel)
    a = calls.submit(request("a"))
    await settle()
    b, c = calls.submit(request("b")), calls.submit(request("c"))
    await settle()
    assert worker.calls == [["a"]]  # b and c wait for a's call to be acknowledged
    worker.acked.set()
    await settle()
    assert worker.calls == [["a"], ["b", "c"]]
    chunk = [GenerationChunk("x", done=True)]
    await worker.feeds[1].put([("c", chunk), ("b", chunk), ("b", ENDED), ("c", ENDED)])
    await worker.feeds[0].put([("a", chunk), ("a", ENDED)])
    await settle()
    for inbox in (a, b, c):
        assert await inbox.get(1.0) == chunk and await inbox.get(1.0) is ENDED
    assert calls.in_flight == 0


async def test_a_reader_that_leaves_cancels_its_request_then_the_call() -> None:
    worker = Worker()
    worker.acked.set()
    calls = WorkerCalls(worker.start, worker.cancel)
    a, b = calls.submit(request("a")), calls.submit(request("b"))
    await settle()
    assert worker.calls == [["a", "b"]]
    a.close()
    await settle()
    assert worker.cancelled == ["a"] and worker.closed == 0 and calls.in_flight == 1
    b.close()
    await settle()
    assert worker.cancelled == ["a"] and worker.closed >= 1 and calls.in_flight == 0


async def test_a_failed_call_ends_every_request_it_carried_with_a_503() -> None:
    worker = Worker()
    worker.acked.set()
    calls = WorkerCalls(worker.start, worker.cancel)
    a, b = calls.submit(request("a")), calls.submit(request("b"))
    await settle()
    await worker.feeds[0].put(RuntimeError("the replica died"))
    await settle()
    for inbox in (a, b):
        failure = await inbox.get(1.0)
        assert isinstance(failure, WorkerUnavailable) and failure.status == 503
    assert calls.in_flight == 0


async def test_a_refusal_ends_only_its_request_and_a_silent_inbox_times_out() -> None:
    worker = Worker()
    worker.acked.set()
    calls = WorkerCalls(worker.start, worker.cancel)
    a, b = calls.submit(request("a")), calls.submit(request("b"))
    await settle()
    refusal = ServiceError("queue full")
    await worker.feeds[0].put([("a", refusal)])
    await settle()
    assert await a.get(1.0) is refusal and calls.in_flight == 1
    assert isinstance(await b.get(timeout_s=0.01), TimeoutError)  # a keep-alive is due
