"""Usage reports to the TenantLedger, from where the engine ran: each worker bills its
requests with the engine's own counts (`app.protocol.generation.EngineCounts`), whether they
finished, were cancelled, failed or were refused mid-way.

A report that ends a reply is made durable before the reply's last item goes out (so no client
holds a usage block the ledger lacks), within `before_reply_s`; past that the reply goes on and
the report is retried in the background until the ledger acknowledges it (it counts a request
id once). Reports travel in groups (`app.tenancy.batching`). No Ray here: `send` is the
ledger handle's `record_usage`.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Awaitable, Callable

from app.tenancy.batching import GroupCall
from app.tenancy.usage import UsageRecord

logger = logging.getLogger(__name__)

Report = tuple[str, UsageRecord | None]
"""A request id and its usage (None: nothing to bill; releases the request's limits)."""
BEFORE_REPLY_SECONDS = 2.0
ATTEMPTS = 12  # retried with backoff (0.5 s doubling to 15 s: about 2 minutes)


def usage_shard(worker_id: str, shards: int) -> int:
    """The usage shard a worker bills to (`tenancy.usage_shards`): fixed for its life, so a
    retried report reaches the shard that may have counted it already."""
    return zlib.crc32(worker_id.encode()) % shards


class UsageReports:
    def __init__(
        self,
        send: Callable[[list[Report]], Awaitable[object]],
        before_reply_s: float = BEFORE_REPLY_SECONDS,
        *,
        releases: bool = True,
    ) -> None:
        """`releases`: a report without usage is sent too, to release the request's limits at
        the ledger (`tenancy.leased_limits: false`); with leased limits each ingress replica
        releases its own, and such a report (a refusal, a failure before the engine) would be
        a ledger call for nothing."""
        self._call: GroupCall[Report] = GroupCall(send)
        self._before_reply_s = before_reply_s
        self._releases = releases
        self._later: set[asyncio.Task[None]] = set()

    async def before_reply(self, request_id: str, usage: UsageRecord | None) -> None:
        """Durable before the reply's end, or (the ledger slow or out, or the reply cancelled
        while it waits: its caller gone) retried later."""
        if usage is None and not self._releases:
            return
        try:
            await asyncio.wait_for(self._call.submit((request_id, usage)), self._before_reply_s)
        except asyncio.CancelledError:
            self.later(request_id, usage)  # the reply was cancelled, not what it is billed
            raise
        except Exception:
            logger.warning("usage of %s not reported yet; retrying", request_id, exc_info=True)
            self.later(request_id, usage)

    def later(self, request_id: str, usage: UsageRecord | None) -> None:
        """In the background (nobody waits for the reply's end: it was cancelled, or failed)."""
        if usage is None and not self._releases:
            return
        task = asyncio.get_running_loop().create_task(self._retried(request_id, usage))
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    async def _retried(self, request_id: str, usage: UsageRecord | None) -> None:
        delay = 0.5
        for _ in range(ATTEMPTS):
            try:
                await self._call.submit((request_id, usage))
                return
            except Exception:
                logger.warning("usage report of %s failed; retrying", request_id, exc_info=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 15.0)
        logger.error("usage of request %s could not be reported: %s", request_id, usage)
