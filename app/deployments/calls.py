"""Requests to one worker travel in groups, over one Serve call per group.

A Serve handle call costs each side about a millisecond of CPU (routing, gRPC, a message per
yielded item), more than a whole request costs a fast engine. So the ingress sends a worker the
requests that arrived while its previous call was being delivered in one call, and the worker
answers all of them on that call's stream, each message carrying every item ready at that
moment. The call's first message is the worker's acknowledgement (with its routing stats);
until it arrives, new requests for that worker wait for the next call.

No Ray here: `start` is injected (the Generator handle's `generate` in
`app/deployments/ingress.py`), so this is unit-tested with plain async generators.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any, cast

from app.errors import ServiceError, WorkerUnavailable
from app.protocol.generation import GenerationRequest, StreamBatch
from app.tenancy.batching import GroupCall

logger = logging.getLogger("ray.serve")

START_GROUP = 64  # requests per call at most
ENDED = None  # an item: the worker's stream of this request ended

WorkerItem = StreamBatch | ServiceError | None
"""What a worker sends for one request: a coalesced batch, a refusal or failure (the last
item), or ENDED."""
WorkerMessage = tuple[dict[str, Any] | None, list[tuple[str, WorkerItem]]]
"""One message of a call's stream: the worker's routing stats (on the first message, None
after) and the items of any of the call's requests, by request id."""


class Inbox:
    """What a worker sent for one request, in order; `get` waits with a timeout (for SSE
    keep-alives) without a task per wait."""

    __slots__ = ("_items", "_waiter", "accepted", "ended", "on_close", "released")

    def __init__(self) -> None:
        self._items: collections.deque[WorkerItem] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.ended = False  # no more items will come (the stream ended, failed or was left)
        self.on_close: Callable[[], None] | None = None  # set once the worker has the request
        self.released = False  # counted out of its WorkerCalls' in_flight
        self.accepted = False  # the worker acknowledged the call carrying it (it reports it)

    def put(self, item: WorkerItem) -> None:
        if self.ended:
            return
        if item is ENDED or isinstance(item, ServiceError):
            self.ended = True
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self, timeout_s: float | None = None) -> WorkerItem | TimeoutError:
        """The next item; a TimeoutError (returned, not raised) after `timeout_s` of silence."""
        if not self._items:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = None if timeout_s is None else loop.call_later(timeout_s, _wake, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
            if not self._items:
                return TimeoutError()
        return self._items.popleft()

    def with_ready(self, batch: StreamBatch) -> StreamBatch:
        """`batch` with the batches that arrived after it (not a terminal item)."""
        items = self._items
        if not items or not isinstance(items[0], list):
            return batch
        joined: list[Any] = list(batch)
        while items and isinstance(items[0], list):
            joined.extend(items.popleft())  # type: ignore[arg-type]
        return cast(StreamBatch, joined)

    def close(self) -> None:
        """The reader stops listening: a request still running on the worker is cancelled
        there (at once if the worker has it, else when its acknowledgement comes)."""
        if self.ended:
            return
        self.ended = True
        callback, self.on_close = self.on_close, None
        if callback is not None:
            callback()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


StartCall = Callable[[list[GenerationRequest]], AsyncIterator[WorkerMessage]]


class WorkerCalls:
    """The grouped calls of one ingress (or Ray job) to one worker. `submit` returns the
    request's inbox at once; the request leaves with the next group."""

    def __init__(
        self,
        start: StartCall,
        cancel: Callable[[list[str]], Coroutine[Any, Any, object]],
        on_stats: Callable[[Mapping[str, Any]], None] | None = None,
        on_load: Callable[[], None] | None = None,
    ) -> None:
        self._start = start
        self._cancel = cancel
        self._on_stats = on_stats
        self._on_load = on_load  # after `in_flight` changed
        self._group: GroupCall[tuple[GenerationRequest, Inbox]] = GroupCall(
            self._send, max_group=START_GROUP
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self.in_flight = 0  # requests submitted here whose inbox is not released

    def submit(self, request: GenerationRequest) -> Inbox:
        inbox = Inbox()
        self.in_flight += 1
        if self._on_load is not None:
            self._on_load()
        self._spawn(self._submit(request, inbox))
        return inbox

    async def _submit(self, request: GenerationRequest, inbox: Inbox) -> None:
        try:
            await self._group.submit((request, inbox))
        except asyncio.CancelledError:
            self._end(
                inbox, WorkerUnavailable("the request was cancelled before it reached a worker")
            )
            raise
        except Exception as error:  # noqa: BLE001 - the call failed before the worker had it
            self._end(inbox, call_failure(error))

    async def _send(self, group: list[tuple[GenerationRequest, Inbox]]) -> None:
        """Start one call for the group and wait for the worker's acknowledgement; the rest of
        its stream is read by a task of its own."""
        live: dict[str, Inbox] = {}
        requests: list[GenerationRequest] = []
        for request, inbox in group:
            if inbox.ended:  # its reader left before the group went out
                self._release(inbox)
            else:
                live[request.request_id] = inbox
                requests.append(request)
        if not requests:
            return
        stream = self._start(requests)
        try:
            stats, items = await anext(stream)
        except BaseException:
            await close_stream(stream)
            raise
        self._note(stats)
        for request_id, inbox in list(live.items()):
            inbox.accepted = True
            if inbox.ended:  # left while the group was on its way
                self._left(request_id, live, stream)
            else:
                inbox.on_close = functools.partial(self._left, request_id, live, stream)
        self._dispatch(items, live)
        if live:
            self._spawn(self._read(stream, live))
        else:
            await close_stream(stream)

    async def _read(self, stream: AsyncIterator[WorkerMessage], live: dict[str, Inbox]) -> None:
        failure: ServiceError | None = None
        try:
            async for stats, items in stream:
                self._note(stats)
                self._dispatch(items, live)
                if not live:
                    break
        except asyncio.CancelledError:
            pass  # every reader left, or the loop is going away
        except Exception as error:  # noqa: BLE001 - every request of the call gets it
            failure = call_failure(error)
        finally:
            await close_stream(stream)
        for inbox in list(live.values()):
            self._end(inbox, failure if failure is not None else ENDED)
        live.clear()

    def _dispatch(self, items: list[tuple[str, WorkerItem]], live: dict[str, Inbox]) -> None:
        for request_id, item in items:
            inbox = live.get(request_id)
            if inbox is None:
                continue
            if item is ENDED or isinstance(item, ServiceError):
                del live[request_id]
                self._end(inbox, item)
            else:
                inbox.put(item)

    def _left(
        self, request_id: str, live: dict[str, Inbox], stream: AsyncIterator[WorkerMessage]
    ) -> None:
        """A reader left before its request ended: cancel it on the worker (the whole call
        when it was the call's last reader)."""
        inbox = live.pop(request_id, None)
        if inbox is None:
            return
        inbox.on_close = None
        self._release(inbox)
        if live:
            self._spawn(self._cancel([request_id]))
        else:
            self._spawn(close_stream(stream))

    def _end(self, inbox: Inbox, item: WorkerItem) -> None:
        inbox.on_close = None
        inbox.put(item)
        self._release(inbox)

    def _release(self, inbox: Inbox) -> None:
        if not inbox.released:
            inbox.released = True
            self.in_flight -= 1
            if self._on_load is not None:
                self._on_load()

    def _note(self, stats: Mapping[str, Any] | None) -> None:
        if stats is not None and self._on_stats is not None:
            self._on_stats(stats)

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        # a context of its own: the calls outlive the request that happened to start them
        # (Serve ties a handle call to the request in whose context it is made)
        task = asyncio.get_running_loop().create_task(coroutine, context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def call_failure(error: BaseException) -> ServiceError:
    """A failure of the call itself, as every request of the call sees it."""
    if isinstance(error, ServiceError):
        return error
    cause = getattr(error, "cause", None)  # Ray's RayTaskError carries the worker's exception
    if isinstance(cause, ServiceError):
        return cause
    logger.warning("a call to a worker failed: %r", error)
    return WorkerUnavailable("the worker serving this request became unavailable")


async def close_stream(stream: AsyncIterator[Any]) -> None:
    """Stop a call's stream: Serve's response generator is cancelled (the worker's side of
    the call is cancelled with it); a plain async generator is closed."""
    cancel = getattr(stream, "cancel", None)
    if callable(cancel):
        cancel()
        return
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
