"""Generator-<profile> deployment: one replica is one worker hosting its profile's engines."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.config import AppConfig
from app.engine.worker import Worker
from app.errors import ServiceError, WorkerUnavailable
from app.protocol.generation import GenerationChunk, GenerationRequest, WireReply
from app.protocol.workers import WorkerStatus
from app.routing.affinity import routing_stats
from app.routing.targets import request_pool

logger = logging.getLogger("ray.serve")
FORGET_TIMEOUT_S = 2.0


class Generator:
    """Plain class; `builder.py` turns it into one Serve deployment per machine profile."""

    async def __init__(  # type: ignore[misc]  # Serve (and Ray actors) await an async __init__
        self, config: dict[str, Any], profile: str, registry: DeploymentHandle[Any]
    ) -> None:
        self._config = AppConfig.model_validate(config)
        self._worker = Worker(self._config, profile)
        self._registry = registry
        self._worker_id = serve.get_replica_context().replica_id.unique_id
        self._node_id = ray.get_runtime_context().get_node_id()
        self._pool = "default"  # pushed by the PoolAutoscaler in its heartbeat replies
        loop = asyncio.get_running_loop()
        self._loading = loop.create_task(self._worker.load_all())
        self._heartbeat = loop.create_task(self._report_forever())
        # Serve routes to a replica once its constructor returns: only after the models
        # loaded (a failed load is reported, not raised). So a rolling update with surge stops
        # the old replica only when the new one can serve. The heartbeat reports "loading"
        # meanwhile (/health, the dashboard).
        await self._loading

    async def generate(
        self, request: GenerationRequest, workers: tuple[str, ...] | None = None
    ) -> AsyncIterator[list[GenerationChunk] | list[WireReply] | ServiceError]:
        """`workers`: the replicas the ingress chose (pool + profile + ready), which the
        request router honours. A replica assigned to another pool than the request's refuses
        (retryable) rather than serve another pool's request; one of the request's pool that
        the ingress did not know of yet (it replaced a draining one) serves it.

        A refusal (400, 503 QUEUE_FULL, ...) is an answer for the client, not a failure of
        this replica: it is the stream's last item, so Serve neither logs a traceback nor
        counts an error for each of them (an overloaded service refuses thousands a minute)."""
        if workers is not None and self._worker_id not in workers:
            pool = request_pool(request)
            if pool != self._pool:
                yield WorkerUnavailable(f"the chosen worker left pool '{pool}'; retry")
                return
        try:
            async for batch in self._worker.stream(request):
                yield batch
        except ServiceError as refusal:
            yield refusal

    def status(self) -> WorkerStatus:
        status = self._worker.status(self._worker_id, self._node_id, self._pool)
        return dataclasses.replace(status, memory_used_bytes=_resident_bytes())

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve polls this for the request routers (KV headroom per model, load)."""
        return routing_stats(self._worker.status(self._worker_id, self._node_id, self._pool))

    async def _report_forever(self) -> None:
        interval = self._config.worker_heartbeat_seconds
        while True:
            try:
                assigned = await self._registry.report.remote(self.status())
                if isinstance(assigned, str):
                    self._pool = assigned
            except Exception:
                logger.warning("heartbeat to the registry failed", exc_info=True)
            await asyncio.sleep(interval)

    def check_health(self) -> None:
        """Serve replaces a replica whose check fails: a dead engine is not coming back."""
        if self._heartbeat.done():
            raise RuntimeError("worker heartbeat stopped")
        dead = self._worker.dead_engines()
        if dead:
            raise RuntimeError(f"the engine of {', '.join(dead)} died")

    async def __del__(self) -> None:
        self._heartbeat.cancel()
        # bounded: when the whole app is deleted the PoolAutoscaler goes too, and a handle call
        # to a deployment without replicas waits for one (until the graceful-shutdown timeout)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._registry.forget.remote(self._worker_id), FORGET_TIMEOUT_S)
        await self._worker.shutdown()


def _resident_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
