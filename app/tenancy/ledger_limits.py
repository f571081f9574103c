"""Limits decided at the TenantLedger, one round trip per limited request
(`tenancy.leased_limits: false`; `app.tenancy.quota` leases quota instead), and what decides
them while the ledger does not answer (`tenancy.on_ledger_unavailable`, as
`app.tenancy.quota.LocalLimits` decides without grants). No Ray here: `admit` and `renew` are
the ledger handle's calls, `release` a usage report without usage."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from app.errors import ServiceError
from app.tenancy.limits import Ticket
from app.tenancy.quota import Fallback, LocalLimits, NeedGrant

logger = logging.getLogger(__name__)
ADMIT_TIMEOUT_SECONDS = 2.0


class LedgerLimits:
    def __init__(
        self,
        admit: Callable[[Ticket], Awaitable[ServiceError | None]],
        renew: Callable[[list[str]], Awaitable[object]],
        release: Callable[[str], None],
        *,
        window_s: float,
        replicas: int,
        fallback: Fallback,
        lease_s: float,
    ) -> None:
        self._admit = admit
        self._renew = renew
        self._release = release
        self._lease_s = lease_s
        self._alone = LocalLimits(window_s, fallback_replicas=replicas, fallback=fallback)
        self._open: set[str] = set()  # admitted by the ledger, in flight (their leases)
        self._renewing: asyncio.Task[None] | None = None
        self.decided = "ledger"
        """Who decided the last admission: 'ledger', or 'fallback' (the ledger did not answer)."""

    async def admit(self, ticket: Ticket) -> None:
        """Raises the refusal (the ledger's, or the fallback's while it does not answer)."""
        try:
            refusal = await asyncio.wait_for(self._admit(ticket), ADMIT_TIMEOUT_SECONDS)
        except Exception:  # noqa: BLE001 - any failure: the ledger is unavailable
            logger.warning("tenant ledger unreachable; limits: %s", self._alone.fallback)
            now = time.monotonic()
            self._alone.sync_failed(now)  # since when, for /health
            self.decided = "fallback"
            alone = self._alone.admit(ticket, now, may_wait=False)
            assert not isinstance(alone, NeedGrant)
            if alone is not None:
                raise alone from None
            return
        self._alone.ledger_unavailable_since = None
        self.decided = "ledger"
        if refusal is not None:
            raise refusal
        self._open.add(ticket.request_id)
        if self._renewing is None or self._renewing.done():
            self._renewing = asyncio.get_running_loop().create_task(self._renew_forever())

    def finish(self, request_id: str, taken: bool) -> None:
        """The request ended. `taken`: a worker acknowledged it, so its usage report releases
        it at the ledger; else it is released from here."""
        if request_id in self._open:
            self._open.discard(request_id)
            if not taken:
                self._release(request_id)
        self._alone.finish(request_id, None, time.monotonic())  # admitted alone, if it was

    async def _renew_forever(self) -> None:
        """Keep this replica's admitted requests counted as in flight (their leases lapse if
        this replica dies)."""
        while self._open:
            await asyncio.sleep(self._lease_s / 3)
            try:
                await self._renew(sorted(self._open))
            except Exception:
                logger.warning("renewing request leases failed", exc_info=True)

    def health(self) -> dict[str, Any]:
        out = self._alone.ledger_unavailable_since
        return {
            "mode": "ledger" if out is None else "fallback",
            "fallback": self._alone.fallback,
            "ledger_unavailable_seconds": None if out is None else round(time.monotonic() - out, 3),
        }
