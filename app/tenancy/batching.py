"""Group calls: items submitted while a call is in flight travel together in the next one.

The ingress reports every request's usage to the TenantLedger. One call per report made the
ledger's per-call cost (Serve's request handling, gRPC) one of the largest serving costs per
request on a fast engine. Grouped, the number of calls follows the round-trip time, not the
request rate, and each item still waits for the call that carried it.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
MAX_GROUP = 512  # items per call: well under Serve's 4 MiB gRPC message limit for usage records


class GroupCall(Generic[T]):
    """`await submit(item)` returns once a call of `send` that carried `item` returned, and
    raises what that call raised. One call is in flight at a time; what arrives meanwhile goes
    in the next (at most `max_group` items per call)."""

    def __init__(
        self, send: Callable[[list[T]], Awaitable[object]], max_group: int = MAX_GROUP
    ) -> None:
        self._send = send
        self._max_group = max_group
        self._waiting: list[tuple[T, asyncio.Future[None]]] = []
        self._sending: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._waiting.append((item, done))
        if self._sending is None or self._sending.done():
            # a context of its own: the calls carry other requests than the one starting them
            self._sending = loop.create_task(self._send_all(), context=contextvars.Context())
        await done  # cancelling this wait leaves the item in its group (it may be sent)

    async def _send_all(self) -> None:
        while self._waiting:
            group = self._waiting[: self._max_group]
            del self._waiting[: self._max_group]
            try:
                await self._send([item for item, _ in group])
            except asyncio.CancelledError:  # the loop is going away: so do the waits
                for _, done in group + self._waiting:
                    done.cancel()
                self._waiting.clear()
                raise
            except Exception as error:  # noqa: BLE001 (each waiter of the group gets it)
                for _, done in group:
                    if not done.done():
                        done.set_exception(error)
            else:
                for _, done in group:
                    if not done.done():
                        done.set_result(None)
