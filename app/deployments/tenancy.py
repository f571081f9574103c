"""TenantLedger deployment (one replica): the service-wide limit book and the durable usage
book. Every ingress replica asks it to admit a request (limits hold for the whole service, not
per replica) and tells it when the request ended, with the usage its client was sent.

- Usage reports carry the request id: a retried report counts once. The ingress waits for
  a request's report (`report_usage`) before its client can see the usage block; it is
  answered once persisted to Ray's GCS key-value store (group commit: written as soon as the
  previous write ends, at least every `tenancy.flush_interval_seconds`), so a restart of this
  replica, of an ingress or of the PoolAutoscaler loses nothing acknowledged, and an ingress
  retries what was not.
- Worker-seconds: every `tenancy.accrual_interval_seconds` it reads the PoolAutoscaler's
  snapshot and accrues each pool's live assigned workers x the time since the last accrual.
- Limits live in memory (a restart starts the windows afresh); requests in flight are leased
  and renewed by their ingress, so an ingress that dies stops holding its streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from app.config import AppConfig
from app.deployments.ray_private import kv_delete, kv_get, kv_keys, kv_put
from app.errors import ServiceError
from app.pools.model import DEFAULT_POOL
from app.tenancy.limits import LimitBook, Ticket
from app.tenancy.usage import MinuteBucket, UsageBook, UsageRecord, UsageTotals

logger = logging.getLogger("ray.serve")
KV_NAMESPACE = "poolserve"
PRUNE_EVERY_SECONDS = 60.0


class UsageStore:
    """The usage book in Ray's GCS key-value store: totals in one key, one key per minute."""

    def __init__(self, app_name: str) -> None:
        self.prefix = f"usage/{app_name}/"

    def _key(self, name: str) -> str:
        return self.prefix + name

    def load(self) -> tuple[UsageTotals | None, list[MinuteBucket]]:
        raw = kv_get(self._key("totals"), KV_NAMESPACE)
        totals = UsageTotals.model_validate_json(raw) if raw else None
        minutes = []
        keys = kv_keys(self._key("minute/"), KV_NAMESPACE)
        for key in keys:
            value = kv_get(key, KV_NAMESPACE)
            if value:
                minutes.append(MinuteBucket.model_validate_json(value))
        return totals, minutes

    def changes(self, book: UsageBook) -> tuple[dict[str, str], list[str]]:
        """What to write (key -> JSON) and delete since the last call; taken on the event loop,
        so the write that follows can run in a thread while the book moves on."""
        writes = {
            self._key(f"minute/{minute}"): book.minutes[minute].model_dump_json()
            for minute in sorted(book.dirty_minutes)
            if minute in book.minutes
        }
        writes[self._key("totals")] = book.totals.model_dump_json()
        deletes = [self._key(f"minute/{minute}") for minute in sorted(book.dropped_minutes)]
        book.dirty_minutes.clear()
        book.dropped_minutes.clear()
        return writes, deletes

    def write(self, writes: dict[str, str], deletes: list[str]) -> None:
        for key, value in writes.items():
            kv_put(key, value, KV_NAMESPACE)
        for key in deletes:
            kv_delete(key, KV_NAMESPACE)


class TenantLedger:
    def __init__(self, config: dict[str, Any], registry: DeploymentHandle[Any]) -> None:
        self._config = AppConfig.model_validate(config)
        tenancy = self._config.tenancy
        self._registry = registry
        self._store = UsageStore(serve.get_replica_context().app_name)
        totals, minutes = self._store.load()
        self._usage = UsageBook(totals, minutes, tenancy.usage_retention_minutes)
        self._limits = LimitBook(tenancy.limit_window_seconds, tenancy.stream_lease_seconds)
        self._unsaved: list[asyncio.Future[None]] = []
        self._dirty = False
        self._waiting = asyncio.Event()  # a report waits to be persisted: write now
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._flush_forever()),
            loop.create_task(self._accrue_forever()),
        ]
        if totals is not None:
            logger.info("tenant ledger restored usage of %d keys", len(totals.counts))

    # --- limits ------------------------------------------------------------------------------

    async def admit(self, ticket: Ticket) -> ServiceError | None:
        """None: admitted (counted against its limits until its usage report); else the
        refusal. (Methods on the request path are coroutines: Serve runs a plain method in a
        thread, a hand-off per call.)"""
        return self._limits.admit(ticket, time.time())

    async def renew(self, request_ids: list[str]) -> None:
        self._limits.renew(request_ids, time.time())

    # --- usage -------------------------------------------------------------------------------

    async def report_usage(self, reports: list[tuple[str, UsageRecord | None]]) -> None:
        """Requests that ended, each with the usage its client is about to be sent (None:
        nothing, e.g. it failed): counted (once per request id) and their limits released at
        once, so a read that arrives after sees them; answered once they are durable (the
        ingress retries until then). An ingress sends the reports that ended while its
        previous call was in flight together (`app.tenancy.batching`)."""
        now = time.time()
        unsaved = [self._count(request_id, usage, now) for request_id, usage in reports]
        if not any(unsaved):
            return  # nothing to count, or counted and saved already (retried reports)
        saved = asyncio.get_running_loop().create_future()
        self._unsaved.append(saved)
        self._waiting.set()
        await saved

    def _count(self, request_id: str, usage: UsageRecord | None, now: float) -> bool:
        """True: counted and not yet persisted."""
        self._limits.finish(request_id, usage.tokens if usage else None, now)
        if usage is None:
            return False
        if self._usage.record(usage, now):
            self._dirty = True
        return self._dirty

    def report(self, since: float | None = None, pool: str | None = None) -> dict[str, Any]:
        return self._usage.report(since, pool)

    def pool_usage(self, pool: str) -> dict[str, Any]:
        return self._usage.pool_usage(pool)

    async def _flush_forever(self) -> None:
        interval = self._config.tenancy.flush_interval_seconds
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._waiting.wait(), interval)
            self._waiting.clear()
            if not self._dirty:
                continue
            waiting, self._unsaved = self._unsaved, []
            self._dirty = False
            dirty = set(self._usage.dirty_minutes)
            writes, deletes = self._store.changes(self._usage)
            try:
                await asyncio.to_thread(self._store.write, writes, deletes)
            except Exception as error:
                logger.exception("saving usage failed; will retry")
                self._usage.dirty_minutes |= dirty
                self._dirty = True
                for future in waiting:
                    if not future.done():
                        future.set_exception(RuntimeError(f"usage not saved: {error}"))
                continue
            for future in waiting:
                if not future.done():
                    future.set_result(None)

    async def _accrue_forever(self) -> None:
        tenancy = self._config.tenancy
        stale = self._config.worker_stale_seconds
        pruned_at = 0.0
        while True:
            with contextlib.suppress(Exception):
                workers, _pools = await asyncio.wait_for(
                    self._registry.routing_snapshot.remote(), 5.0
                )
                now = time.time()
                held = Counter(
                    w.pool or DEFAULT_POOL for w in workers if now - w.reported_at <= stale
                )
                self._usage.accrue(held, now)
                if now - pruned_at > PRUNE_EVERY_SECONDS:
                    self._usage.prune(now)
                    self._limits.expire(now)
                    pruned_at = now
                self._dirty = True
            await asyncio.sleep(tenancy.accrual_interval_seconds)
