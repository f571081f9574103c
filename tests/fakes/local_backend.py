"""GenerationBackend without Ray: one in-process Worker per profile, for API-layer tests.
Pools live in a PoolBook; every change runs the real `decide` over these fixed workers (no
scaling: the replica targets are recorded, not applied). Usage is counted in a UsageBook as the
TenantLedger counts it (limits are the ledger's: not applied here)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from app.config import AppConfig
from app.engine.worker import Worker
from app.errors import Provisioning
from app.pools.book import PoolBook
from app.pools.decide import Snapshot, WorkerView, decide
from app.pools.model import DEFAULT_POOL, PoolRecord, PoolSpec
from app.protocol.generation import EngineCounts, GenerationChunk, GenerationRequest
from app.protocol.workers import WorkerStatus
from app.routing.targets import choose_target
from app.tenancy.requests import engine_usage, with_pool_defaults
from app.tenancy.usage import UsageBook


class LocalBackend:
    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.workers_by_profile = {p.name: Worker(config, p.name) for p in config.profiles}
        self.book = PoolBook()
        self.demand: dict[tuple[str, str], float] = {}
        self.clock = time.time
        self.usage = UsageBook()

    async def start(self) -> None:
        for worker in self.workers_by_profile.values():
            await worker.load_all()

    async def workers(self) -> list[WorkerStatus]:
        return [
            worker.status(
                f"local-{name}",
                "local-node",
                self.book.assignments.get(f"local-{name}", DEFAULT_POOL),
            )
            for name, worker in self.workers_by_profile.items()
        ]

    def settle(self) -> None:
        """One autoscaler step over the local workers."""
        now = self.clock()
        views = [
            WorkerView.of(dataclasses.replace(status, reported_at=now))
            for status in [
                w.status(f"local-{n}", "local-node") for n, w in self.workers_by_profile.items()
            ]
        ]
        snapshot = Snapshot(
            pools=self.book.pools,
            workers=views,
            assignments=self.book.assignments,
            replicas=self.book.replicas,
            demand=self.demand,
        )
        self.book.apply(decide(snapshot, self.config, now))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[list[GenerationChunk]]:
        try:
            target = choose_target(
                self.config, await self.workers(), request, time.time(), self.book.pools
            )
        except Provisioning as error:
            key = (str(error.extra["pool"]), str(error.extra["profile"]))
            self.demand[key] = self.clock()
            raise
        request = with_pool_defaults(request, self.book.get(target.pool))
        counts = EngineCounts()
        batches = self.workers_by_profile[target.profile].stream(request, counts)
        try:
            async for batch in batches:
                yield batch
        finally:
            await batches.aclose()
            record = engine_usage(request, counts)  # as the Generator bills it
            if record is not None:
                self.usage.record(record, self.clock())

    async def create_pool(self, spec: PoolSpec) -> PoolRecord:
        self.book.upsert(spec, self.clock(), self.config.pools.lease_seconds)
        self.settle()
        record = self.book.get(spec.name)
        assert record is not None
        return record

    async def get_pool(self, name: str) -> PoolRecord | None:
        self.settle()
        return self.book.get(name)

    async def list_pools(self) -> list[PoolRecord]:
        self.settle()
        return sorted(self.book.pools.values(), key=lambda r: (r.created_at, r.name))

    async def renew_pool(self, name: str) -> PoolRecord:
        record = self.book.renew(name, self.clock())
        self.settle()
        return self.book.get(record.name) or record

    async def delete_pool(self, name: str) -> bool:
        deleted = self.book.delete(name)
        self.settle()
        return deleted

    def limits_health(self) -> dict[str, Any] | None:
        return None

    async def usage_report(self, since: float | None, pool: str | None) -> dict[str, Any]:
        return self.usage.report(since, pool)

    async def pool_usage(self, pool: str) -> dict[str, Any]:
        return self.usage.pool_usage(pool)
