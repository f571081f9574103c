"""What the HTTP layer needs from the rest of the system, as a protocol: the Ray glue implements
it with deployment handles (`app/deployments/ingress.py`), tests with a fake engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from app.pools.model import PoolRecord, PoolSpec
from app.protocol.generation import GenerationRequest, StreamBatch
from app.protocol.workers import WorkerStatus


class GenerationBackend(Protocol):
    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamBatch]:
        """Batches of chunks for one request; raises ServiceError before or during the stream.
        Closing the iterator cancels the request on its worker."""
        ...

    async def workers(self) -> list[WorkerStatus]:
        """The latest status of every known worker (live or stale)."""
        ...

    async def create_pool(self, spec: PoolSpec) -> PoolRecord:
        """Create the pool, or update its spec and renew its lease (an expired pool revives)."""
        ...

    async def get_pool(self, name: str) -> PoolRecord | None:
        """The pool (case-insensitive name), or None."""
        ...

    async def list_pools(self) -> list[PoolRecord]:
        """Every pool, oldest first (expired ones included until deleted)."""
        ...

    async def renew_pool(self, name: str) -> PoolRecord:
        """Renew the lease; raises PoolNotFound."""
        ...

    async def delete_pool(self, name: str) -> bool:
        """Delete the pool and free its workers; False if there was none."""
        ...

    def limits_health(self) -> dict[str, Any] | None:
        """How limits are decided in this process now: `mode` leased (quota leased from the
        ledger), starting, or fallback (the ledger unavailable: a per-replica share of each
        limit), with counters; None when no ledger runs."""
        ...

    async def usage_report(self, since: float | None, pool: str | None) -> dict[str, Any]:
        """Usage per (pool, model, key id), per pool (with worker-seconds) and in total, since
        `since` (unix seconds; None: since counting began), of one pool or all."""
        ...

    async def pool_usage(self, pool: str) -> dict[str, Any]:
        """One pool's usage since counting began: totals, worker-seconds, per model, per key."""
        ...
