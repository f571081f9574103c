"""Usage accounting: what each (pool, model, API key id) used, counted once per request id, and
the worker-seconds each pool held. Totals since the service's store began, plus one bucket per
minute (kept `retention_minutes`) for `since` windows. Pure: every time is passed in; the
TenantLedger deployment persists the buckets it marks dirty."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

SEPARATOR = "\t"
_T = TypeVar("_T", int, float)
DEDUP_MINUTES = 30
"""Request ids are remembered this long (a retried report of the same request counts once)."""


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One finished request as its client saw it (the numbers of its `usage` block)."""

    request_id: str
    pool: str
    model: str
    key_id: str
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Counts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, other: Counts | UsageRecord) -> None:
        # straight into the fields (no validation on assignment here anyway): pydantic's
        # __setattr__ was most of the ledger's CPU per usage report
        fields = self.__dict__
        fields["requests"] += other.requests if isinstance(other, Counts) else 1
        fields["prompt_tokens"] += other.prompt_tokens
        fields["cached_prompt_tokens"] += other.cached_prompt_tokens
        fields["completion_tokens"] += other.completion_tokens

    def body(self) -> dict[str, int]:
        return {**self.model_dump(), "total_tokens": self.prompt_tokens + self.completion_tokens}


class MinuteBucket(BaseModel):
    """Usage of one wall-clock minute (`minute` = unix seconds // 60)."""

    model_config = ConfigDict(extra="forbid")

    minute: int
    counts: dict[str, Counts] = Field(default_factory=dict, description="usage key -> counts")
    worker_seconds: dict[str, float] = Field(default_factory=dict, description="pool -> s")
    request_ids: list[str] = Field(default_factory=list)


class UsageTotals(BaseModel):
    model_config = ConfigDict(extra="forbid")

    counts: dict[str, Counts] = Field(default_factory=dict)
    worker_seconds: dict[str, float] = Field(default_factory=dict)
    accrued_at: float | None = None
    started_at: float | None = None


@dataclass(slots=True)
class UsageWindow:
    """Counts per usage key and worker-seconds per pool over a window, of one book or merged
    from several (the shards of `tenancy.usage_shards`: each counts other requests)."""

    counts: dict[str, Counts]
    seconds: dict[str, float]
    started_at: float | None  # when the earliest book began counting
    first_minute: int | None  # the earliest minute retained

    def merge(self, other: UsageWindow) -> None:
        for key, each in other.counts.items():
            self.counts.setdefault(key, Counts()).add(each)
        for pool, held in other.seconds.items():
            self.seconds[pool] = self.seconds.get(pool, 0.0) + held
        self.started_at = _earliest(self.started_at, other.started_at)
        self.first_minute = _earliest(self.first_minute, other.first_minute)

    def report(self, since: float | None, pool: str | None) -> dict[str, Any]:
        """Usage rows per (pool, model, key id), per-pool sums with worker-seconds, and the
        service total; `since` (unix seconds) is rounded down to its minute."""
        counts, seconds = self.counts, self.seconds
        rows = []
        pools: dict[str, Counts] = {}
        total = Counts()
        for key in sorted(counts):
            row_pool, model, key_id = split_key(key)
            if pool is not None and row_pool != pool:
                continue
            each = counts[key]
            rows.append({"pool": row_pool, "model": model, "key_id": key_id, **each.body()})
            pools.setdefault(row_pool, Counts()).add(each)
            total.add(each)
        names = sorted((set(pools) | set(seconds)) if pool is None else {pool})
        return {
            "since": None if since is None else math.floor(since / 60) * 60.0,
            "counting_since": self.started_at,
            "retained_since": None if self.first_minute is None else self.first_minute * 60.0,
            "usage": rows,
            "pools": {
                name: {
                    **pools.get(name, Counts()).body(),
                    "worker_seconds": round(seconds.get(name, 0.0), 3),
                }
                for name in names
            },
            "total": {
                **total.body(),
                "worker_seconds": round(
                    sum(seconds.values()) if pool is None else seconds.get(pool, 0.0), 3
                ),
            },
        }


def _earliest(a: _T | None, b: _T | None) -> _T | None:
    return b if a is None else a if b is None else min(a, b)


def usage_key(pool: str, model: str, key_id: str) -> str:
    return SEPARATOR.join((pool, model, key_id))


def split_key(key: str) -> tuple[str, str, str]:
    pool, model, key_id = key.split(SEPARATOR)
    return pool, model, key_id


class UsageBook:
    def __init__(
        self,
        totals: UsageTotals | None = None,
        minutes: Iterable[MinuteBucket] = (),
        retention_minutes: int = 7 * 24 * 60,
    ) -> None:
        self.totals = totals or UsageTotals()
        self.minutes = {bucket.minute: bucket for bucket in minutes}
        self.retention_minutes = retention_minutes
        self._seen = {rid for bucket in self.minutes.values() for rid in bucket.request_ids}
        self.dirty_minutes: set[int] = set()
        self.dropped_minutes: set[int] = set()

    def _bucket(self, now: float) -> MinuteBucket:
        minute = int(now // 60)
        bucket = self.minutes.get(minute)
        if bucket is None:
            bucket = self.minutes[minute] = MinuteBucket(minute=minute)
        self.dirty_minutes.add(minute)
        return bucket

    def seen(self, request_id: str) -> bool:
        return request_id in self._seen

    def record(self, record: UsageRecord, now: float) -> bool:
        """Count `record` once; False (nothing counted) if its request id was counted already."""
        if record.request_id in self._seen:
            return False
        self._seen.add(record.request_id)
        key = usage_key(record.pool, record.model, record.key_id)
        bucket = self._bucket(now)
        bucket.request_ids.append(record.request_id)
        for counts in (bucket.counts, self.totals.counts):
            each = counts.get(key)
            if each is None:
                each = counts[key] = Counts()
            each.add(record)
        if self.totals.started_at is None:
            self.totals.started_at = now
        return True

    def accrue(self, workers_by_pool: Mapping[str, int], now: float) -> None:
        """Worker-seconds since the last accrual, at the pools' current worker counts (a gap
        after a restart is accrued at the counts found then: the assignments are durable)."""
        last = self.totals.accrued_at
        self.totals.accrued_at = now
        if self.totals.started_at is None:
            self.totals.started_at = now
        if last is None or now <= last:
            return
        elapsed = now - last
        bucket = self._bucket(now)
        for pool, workers in workers_by_pool.items():
            if workers <= 0:
                continue
            held = workers * elapsed
            self.totals.worker_seconds[pool] = self.totals.worker_seconds.get(pool, 0.0) + held
            bucket.worker_seconds[pool] = bucket.worker_seconds.get(pool, 0.0) + held

    def prune(self, now: float) -> None:
        """Drop buckets past the retention, and request ids past the dedup window."""
        current = int(now // 60)
        for minute in [m for m in self.minutes if m <= current - self.retention_minutes]:
            bucket = self.minutes.pop(minute)
            self._seen.difference_update(bucket.request_ids)
            self.dropped_minutes.add(minute)
            self.dirty_minutes.discard(minute)
        for minute, bucket in self.minutes.items():
            if bucket.request_ids and minute <= current - DEDUP_MINUTES:
                self._seen.difference_update(bucket.request_ids)
                bucket.request_ids = []
                self.dirty_minutes.add(minute)

    def window(self, since: float | None = None) -> UsageWindow:
        """What this book counted since `since` (None: since it began), in a copy that others'
        windows merge into (`tenancy.usage_shards`: one book per shard)."""
        counts: dict[str, Counts] = {}
        seconds: dict[str, float] = {}
        if since is None:
            buckets: Iterable[tuple[dict[str, Counts], dict[str, float]]] = [
                (self.totals.counts, self.totals.worker_seconds)
            ]
        else:
            first = math.floor(since / 60)
            buckets = [
                (bucket.counts, bucket.worker_seconds)
                for minute, bucket in self.minutes.items()
                if minute >= first
            ]
        for bucket_counts, bucket_seconds in buckets:
            for key, each in bucket_counts.items():
                counts.setdefault(key, Counts()).add(each)
            for pool, held in bucket_seconds.items():
                seconds[pool] = seconds.get(pool, 0.0) + held
        return UsageWindow(counts, seconds, self.totals.started_at, min(self.minutes, default=None))

    def report(
        self,
        since: float | None = None,
        pool: str | None = None,
        others: Iterable[UsageWindow] = (),
    ) -> dict[str, Any]:
        """This book's usage since `since` (with the other shards' windows), for `/v1/usage`."""
        window = self.window(since)
        for other in others:
            window.merge(other)
        return window.report(since, pool)

    def pool_usage(self, pool: str, others: Iterable[UsageWindow] = ()) -> dict[str, Any]:
        """A pool's all-time usage (its `status.usage`): totals, worker-seconds, per model and
        per key id."""
        report = self.report(pool=pool, others=others)
        models: dict[str, Counts] = {}
        keys: dict[str, Counts] = {}
        for row in report["usage"]:
            counts = Counts.model_validate(
                {name: row[name] for name in Counts.model_fields if name in row}
            )
            models.setdefault(row["model"], Counts()).add(counts)
            keys.setdefault(row["key_id"], Counts()).add(counts)
        return {
            **report["pools"][pool],
            "models": {name: each.body() for name, each in sorted(models.items())},
            "keys": {name: each.body() for name, each in sorted(keys.items())},
        }
