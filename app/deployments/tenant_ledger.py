"""TenantLedger deployment (one replica; with `tenancy.usage_shards: K`, K-1 more that count
usage only, merged by the first): the service-wide limit book and the durable usage book.
Ingress replicas lease their limits' quota from it (or, without leases, ask it per request);
workers bill it each request's usage as the engine counted it.

- Usage records carry the request id: a retried one counts once. The worker waits for
  a request's record (`record_usage`) before its client can see the usage block; it is
  answered once persisted to Ray's GCS key-value store (group commit: written as soon as the
  previous write ends, at least every `tenancy.flush_interval_seconds`), so a restart of this
  replica, of an ingress or of the PoolAutoscaler loses nothing acknowledged, and the sender
  retries what was not.
- Worker-seconds: every `tenancy.accrual_interval_seconds` it reads the PoolAutoscaler's
  snapshot and accrues each pool's live assigned workers x the time since the last accrual.
- Limits live in memory (a restart starts the windows afresh); requests in flight are leased
  and renewed by their ingress, so an ingress that dies stops holding its streams.
- Leased quota (`sync`, `app.tenancy.quota`): each ingress replica decides limits itself from
  shares of every active subject's budget; it calls `sync` every ~0.5 s (and when a request
  needs more than it holds) with what it admitted and used, and gets its new shares. Usage
  stays recorded through `record_usage` (it must be durable before its client sees it, per
  request; a sync is periodic and carries limit counters only). `admit`/`renew` remain for an
  ingress that does not sync (both kinds of ingress must not share one subject's limits).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from app.config import AppConfig
from app.deployments.ray_private import kv_delete, kv_get, kv_keys, kv_put
from app.errors import ServiceError, UsageUnavailable
from app.pools.model import DEFAULT_POOL
from app.tenancy.limits import LimitBook, Ticket
from app.tenancy.quota import Grant, QuotaBook, SyncReport
from app.tenancy.usage import MinuteBucket, UsageBook, UsageRecord, UsageTotals, UsageWindow

logger = logging.getLogger("ray.serve")
KV_NAMESPACE = "poolserve"
PRUNE_EVERY_SECONDS = 60.0
SHARD_TIMEOUT_SECONDS = 4.0  # under the ingress's wait for the ledger (5 s)
COMPACT_SECONDS = 30.0
LOG_KEYS_PER_COMPACTION = 2000


class UsageStore:
    """The usage book in Ray's GCS key-value store, written in time with the records rather
    than with the book's size:

    - `log/<seq>`: one key per group commit, holding only what it counted (records with their
      minute and request id, worker-seconds accrued): what a commit writes grows with the
      records it acknowledges, not with the minute's or the service's history;
    - every COMPACT_SECONDS (or LOG_KEYS_PER_COMPACTION commits), the compaction: the minutes
      counted in since (`minute/<m>`, without their request ids), the request ids counted
      since (`ids/<m>/<seq>`, kept while the dedup window needs them), the totals, then the
      compacted log keys are deleted.

    Loading reads the compacted state and replays the log over it: records whose request id
    is known already are not counted twice (the dedup of `UsageBook.record`), accruals older
    than the totals' `accrued_at` are skipped, so a crash between any two writes loses or
    doubles nothing but, at worst, one compaction interval of a minute's worker-seconds.
    Minute keys written whole with their request ids (the format before the log) load too."""

    def __init__(self, app_name: str, shard: int = 0) -> None:
        self.prefix = f"usage/{app_name}/" + (f"shard-{shard}/" if shard else "")
        self._seq = 0
        self._records: list[list[Any]] = []  # counted, not yet in a log key
        self._accruals: list[dict[str, Any]] = []
        self._ids: dict[int, list[str]] = {}  # minute -> request ids counted since compaction
        self._logged: list[str] = []  # log keys written since the last compaction
        self._id_keys: dict[int, list[str]] = {}  # minute -> its ids/ keys
        self._compacted_at = time.monotonic()

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _names(self, prefix: str) -> list[str]:
        return sorted(
            (key.decode() if isinstance(key, bytes) else key)[len(self.prefix) :]
            for key in kv_keys(self._key(prefix), KV_NAMESPACE)
        )

    def load(self, retention_minutes: int) -> UsageBook:
        raw = kv_get(self._key("totals"), KV_NAMESPACE)
        totals = UsageTotals.model_validate_json(raw) if raw else None
        minutes: dict[int, MinuteBucket] = {}
        for name in self._names("minute/"):
            value = kv_get(self._key(name), KV_NAMESPACE)
            if value:
                bucket = MinuteBucket.model_validate_json(value)
                minutes[bucket.minute] = bucket
                if bucket.request_ids:  # written whole (before the log): ids/ keys from now
                    self._ids[bucket.minute] = list(bucket.request_ids)
        for name in self._names("ids/"):
            _, minute_text, seq = name.split("/")
            minute = int(minute_text)
            self._seq = max(self._seq, int(seq) + 1)
            value = kv_get(self._key(name), KV_NAMESPACE)
            self._id_keys.setdefault(minute, []).append(name)
            if value:
                bucket = minutes.setdefault(minute, MinuteBucket(minute=minute))
                bucket.request_ids.extend(json.loads(value))
        book = UsageBook(totals, minutes.values(), retention_minutes)
        book.dirty_minutes |= set(self._ids)  # rewritten without their ids at compaction
        accrued_at = book.totals.accrued_at or float("-inf")
        for name in self._names("log/"):
            self._seq = max(self._seq, int(name.split("/")[1]) + 1)
            self._logged.append(name)
            value = kv_get(self._key(name), KV_NAMESPACE)
            if not value:
                continue
            entry = json.loads(value)
            for minute, rid, pool, model, key_id, prompt, cached, completion in entry["records"]:
                record = UsageRecord(rid, pool, model, key_id, prompt, cached, completion)
                if book.record(record, minute * 60.0):
                    self._ids.setdefault(minute, []).append(rid)
            for accrual in entry["accruals"]:
                if accrual["at"] <= accrued_at:
                    continue
                accrued_at = accrual["at"]
                bucket = book.minutes.setdefault(
                    accrual["minute"], MinuteBucket(minute=accrual["minute"])
                )
                for pool, held in accrual["seconds"].items():
                    totals_seconds = book.totals.worker_seconds
                    totals_seconds[pool] = totals_seconds.get(pool, 0.0) + held
                    bucket.worker_seconds[pool] = bucket.worker_seconds.get(pool, 0.0) + held
                book.totals.accrued_at = accrual["at"]
                book.dirty_minutes.add(accrual["minute"])
        return book

    def counted(self, record: UsageRecord, now: float) -> None:
        """`record` was counted by the book at `now` (UsageBook.record returned True)."""
        minute = int(now // 60)
        self._records.append(
            [
                minute,
                record.request_id,
                record.pool,
                record.model,
                record.key_id,
                record.prompt_tokens,
                record.cached_prompt_tokens,
                record.completion_tokens,
            ]
        )
        self._ids.setdefault(minute, []).append(record.request_id)

    def accrued(self, book: UsageBook, before: dict[str, float], now: float) -> None:
        """The book accrued worker-seconds at `now` (`before`: its totals before)."""
        after = book.totals.worker_seconds
        seconds = {pool: held - before.get(pool, 0.0) for pool, held in after.items()}
        seconds = {pool: held for pool, held in seconds.items() if held > 0}
        if seconds:
            self._accruals.append({"minute": int(now // 60), "at": now, "seconds": seconds})

    def changes(self, book: UsageBook, compact: bool) -> tuple[dict[str, str], list[str]]:
        """What to write (key -> JSON) and delete now; taken on the event loop, so the write
        that follows can run in a thread while the book moves on. After a failed write, call
        `failed` with them."""
        writes: dict[str, str] = {}
        if self._records or self._accruals:
            name = f"log/{self._seq:016d}"
            self._seq += 1
            writes[self._key(name)] = json.dumps(
                {"records": self._records, "accruals": self._accruals}, separators=(",", ":")
            )
            self._logged.append(name)
            self._records, self._accruals = [], []
        if not compact:
            return writes, []
        for minute, ids in sorted(self._ids.items()):
            name = f"ids/{minute}/{self._seq:016d}"
            writes[self._key(name)] = json.dumps(ids)
            self._id_keys.setdefault(minute, []).append(name)
        self._seq += 1
        self._ids = {}
        for minute in sorted(book.dirty_minutes):
            bucket = book.minutes.get(minute)
            if bucket is not None:  # its request ids are in its ids/ keys
                writes[self._key(f"minute/{minute}")] = bucket.model_copy(
                    update={"request_ids": []}
                ).model_dump_json()
        writes[self._key("totals")] = book.totals.model_dump_json()
        deletes = [self._key(name) for name in self._logged]
        deletes += [self._key(f"minute/{minute}") for minute in sorted(book.dropped_minutes)]
        for minute in list(self._id_keys):  # past the dedup window, or dropped
            bucket = book.minutes.get(minute)
            if bucket is None or not bucket.request_ids:
                deletes += [self._key(name) for name in self._id_keys.pop(minute)]
        self._logged = []
        book.dirty_minutes.clear()
        book.dropped_minutes.clear()
        self._compacted_at = time.monotonic()
        return writes, deletes

    def compaction_due(self) -> bool:
        return (
            time.monotonic() - self._compacted_at >= COMPACT_SECONDS
            or len(self._logged) >= LOG_KEYS_PER_COMPACTION
        )

    def failed(
        self, writes: dict[str, str], deletes: list[str], book: UsageBook, dirty: set[int]
    ) -> None:
        """A write of `changes` failed (any part of it): what it counted goes in the next log
        key, a compaction's minutes and ids are written again, and the log keys it was to
        delete are deleted by the next compaction (a log key written twice counts once:
        records by request id, accruals by time)."""
        for key, value in writes.items():
            name = key[len(self.prefix) :]
            if name.startswith("log/"):
                entry = json.loads(value)
                self._records = entry["records"] + self._records
                self._accruals = entry["accruals"] + self._accruals
                if name in self._logged:
                    self._logged.remove(name)
            elif name.startswith("ids/"):
                minute = int(name.split("/")[1])
                self._ids.setdefault(minute, []).extend(json.loads(value))
        for key in deletes:
            name = key[len(self.prefix) :]
            if name.startswith("log/") and key not in writes:
                self._logged.append(name)
        book.dirty_minutes |= dirty

    def write(self, writes: dict[str, str], deletes: list[str]) -> None:
        for key, value in writes.items():
            kv_put(key, value, KV_NAMESPACE)
        for key in deletes:
            kv_delete(key, KV_NAMESPACE)


def stored_shards(app_name: str) -> set[int]:
    """The usage shards (`tenancy.usage_shards`) with keys in the store, 0 included."""
    prefix = f"usage/{app_name}/shard-"
    found = {0}
    for key in kv_keys(prefix, KV_NAMESPACE):
        name = (key.decode() if isinstance(key, bytes) else key)[len(prefix) :]
        found.add(int(name.split("/", 1)[0]))
    return found


class TenantLedger:
    """Shard 0 (`TenantLedger`): limits, worker-seconds, its workers' usage, and `/v1/usage`
    merged over every shard. Shards 1.. (`tenancy.usage_shards`; `TenantLedger-<i>`): the usage
    of the workers that report to them (`usage_shard`), each with its own keys in the store."""

    def __init__(
        self,
        config: AppConfig,
        autoscaler: DeploymentHandle[Any],
        shard: int = 0,
        shards: list[DeploymentHandle[Any]] | None = None,
    ) -> None:
        self._config = config  # validated by the builder; unpickled without validation
        tenancy = config.tenancy
        self._autoscaler = autoscaler
        self._shard = shard
        self._shards = shards or []  # shard 0 only: the others, which its reports merge
        app_name = serve.get_replica_context().app_name
        self._store = UsageStore(app_name, shard)
        self._usage = self._store.load(tenancy.usage_retention_minutes)
        # shards no longer configured: their usage is still read (an invoice outlives them)
        self._retired = [
            UsageStore(app_name, index).load(tenancy.usage_retention_minutes)
            for index in sorted(stored_shards(app_name))
            if shard == 0 and index >= tenancy.usage_shards
        ]
        totals = self._usage.totals if self._usage.totals.started_at is not None else None
        self._limits = LimitBook(tenancy.limit_window_seconds, tenancy.stream_lease_seconds)
        self._quota = QuotaBook(tenancy.limit_window_seconds)
        self._unsaved: list[asyncio.Future[None]] = []
        self._dirty = False
        self._waiting = asyncio.Event()  # a record waits to be persisted: write now
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._flush_forever()),
            loop.create_task(self._accrue_forever()),
        ]
        if totals is not None:
            logger.info("tenant ledger restored usage of %d keys", len(totals.counts))

    # --- limits ------------------------------------------------------------------------------

    async def admit(self, ticket: Ticket) -> ServiceError | None:
        """None: admitted (counted against its limits until its usage is recorded); else the
        refusal. (Methods on the request path are coroutines: Serve runs a plain method in a
        thread, a hand-off per call.)"""
        return self._limits.admit(ticket, time.time())

    async def renew(self, request_ids: list[str]) -> None:
        self._limits.renew(request_ids, time.time())

    async def sync(self, replica_id: str, report: SyncReport) -> Grant:
        """An ingress replica's leased-quota sync (`app.tenancy.quota.QuotaClient`): what it
        admitted and used since its last sync; the answer is its new shares."""
        return self._quota.sync(replica_id, report, time.monotonic())

    def quota_status(self) -> dict[str, Any]:
        """Subjects with a budget, ingress replicas syncing, shares leased (for /health)."""
        return self._quota.status(time.monotonic())

    # --- usage -------------------------------------------------------------------------------

    async def record_usage(self, records: list[tuple[str, UsageRecord | None]]) -> None:
        """Requests that ended, each with the usage its client is about to be sent (None:
        nothing, e.g. it failed): counted (once per request id) and their limits released at
        once, so a read that arrives after sees them; answered once they are durable (the
        sender retries until then). A worker (or an ingress) sends the records of requests
        that ended while its previous call was in flight together (`app.tenancy.batching`)."""
        now = time.time()
        unsaved = [self._count(request_id, usage, now) for request_id, usage in records]
        if not any(unsaved):
            return  # nothing to count, or counted and saved already (retried records)
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
            self._store.counted(usage, now)
            self._dirty = True
        return self._dirty

    async def usage_report(
        self, since: float | None = None, pool: str | None = None
    ) -> dict[str, Any]:
        """What was used since `since` (unix time; None: since the start), for `/v1/usage`:
        every shard's."""
        return self._usage.report(since, pool, await self._other_windows(since))

    async def pool_usage(self, pool: str) -> dict[str, Any]:
        return self._usage.pool_usage(pool, await self._other_windows(None))

    async def usage_window(self, since: float | None) -> UsageWindow:
        """This shard's counts since `since`, for shard 0 to merge."""
        return self._usage.window(since)

    async def _other_windows(self, since: float | None) -> list[UsageWindow]:
        if not self._shards and not self._retired:
            return []
        try:
            windows: list[UsageWindow] = await asyncio.wait_for(
                asyncio.gather(*(shard.usage_window.remote(since) for shard in self._shards)),
                SHARD_TIMEOUT_SECONDS,
            )
        except Exception as error:  # noqa: BLE001 - timeouts, a dead or restarting shard
            raise UsageUnavailable(
                f"a usage shard did not answer ({type(error).__name__}); retry"
            ) from None
        return windows + [book.window(since) for book in self._retired]

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
            writes, deletes = self._store.changes(self._usage, self._store.compaction_due())
            try:
                await asyncio.to_thread(self._store.write, writes, deletes)
            except Exception as error:
                logger.exception("saving usage failed; will retry")
                self._store.failed(writes, deletes, self._usage, dirty)
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
            if self._shard == 0:  # worker-seconds are shard 0's
                with contextlib.suppress(Exception):
                    workers, _pools = await asyncio.wait_for(
                        self._autoscaler.routing_snapshot.remote(), 5.0
                    )
                    now = time.time()
                    held = Counter(
                        w.pool or DEFAULT_POOL for w in workers if now - w.reported_at <= stale
                    )
                    before = dict(self._usage.totals.worker_seconds)
                    self._usage.accrue(held, now)
                    self._store.accrued(self._usage, before, now)
                    self._dirty = True
            now = time.time()
            if now - pruned_at > PRUNE_EVERY_SECONDS:
                self._usage.prune(now)
                self._limits.expire(now)
                pruned_at = now
                self._dirty = True
            await asyncio.sleep(tenancy.accrual_interval_seconds)
