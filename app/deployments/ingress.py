"""Ingress deployment: the FastAPI app of `app/server.py`, backed by Serve deployment handles."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, cast

from fastapi import FastAPI
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from app.api.observe import instrument
from app.config import AppConfig
from app.errors import PoolNotFound, Provisioning, ServiceError, WorkerUnavailable
from app.pools.model import PoolRecord, PoolSpec
from app.protocol.generation import GenerationChunk, GenerationRequest
from app.protocol.workers import WorkerStatus
from app.routing.targets import Target, choose_target, request_pool
from app.server import create_app

logger = logging.getLogger("ray.serve")
SNAPSHOT_MAX_AGE_SECONDS = 0.5
SNAPSHOT_STALE_SECONDS = 5.0  # older than this, a request waits for a fresh snapshot
SNAPSHOT_TIMEOUT_SECONDS = 2.0
GRPC_REQUEST_BYTES = (
    3 * 1024 * 1024
)  # under Serve's 4 MiB replica gRPC message limit  # e.g. while the PoolAutoscaler replica restarts


class ServeBackend:
    """GenerationBackend over Serve: worker and pool snapshots from the PoolAutoscaler (which
    also owns pool changes), streams from the Generator deployment of the chosen profile,
    restricted to the chosen workers by `app.deployments.router.PoolRequestRouter`."""

    def __init__(
        self,
        config: AppConfig,
        generators: dict[str, DeploymentHandle[Any]],
        registry: DeploymentHandle[Any],
    ) -> None:
        self._config = config
        by_reference = config.streaming.transport == "object_refs"
        self._generators = {
            name: handle.options(stream=True, _by_reference=by_reference)
            for name, handle in generators.items()
        }
        # Serve's replica gRPC server takes messages up to 4 MiB
        # (RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH); bigger requests (bodies go up to
        # ingress.max_body_bytes) travel as Ray objects instead
        self._large_request_generators = {
            name: handle.options(stream=True, _by_reference=True)
            for name, handle in generators.items()
        }
        self._registry = registry
        self._snapshot: list[WorkerStatus] = []
        self._pools: dict[str, PoolRecord] = {}
        self._demand_calls: set[asyncio.Task[Any]] = set()
        self._snapshot_at = float("-inf")
        self._refresh: asyncio.Task[None] | None = None

    async def workers(self, max_age_s: float = SNAPSHOT_MAX_AGE_SECONDS) -> list[WorkerStatus]:
        """The registry's snapshot. Older than `max_age_s`: refreshed in the background while
        requests go on with the current one; a request waits for the round trip only when the
        snapshot is far older (or `max_age_s` is 0: "look again now")."""
        age = time.monotonic() - self._snapshot_at
        if age > max_age_s:
            if self._refresh is None or self._refresh.done():
                self._refresh = asyncio.get_running_loop().create_task(self._load_snapshot())
            if max_age_s == 0 or age > SNAPSHOT_STALE_SECONDS:
                await asyncio.shield(self._refresh)
        return self._snapshot

    async def _load_snapshot(self) -> None:
        try:
            self._snapshot, self._pools = await asyncio.wait_for(
                self._registry.routing_snapshot.remote(), SNAPSHOT_TIMEOUT_SECONDS
            )
            self._snapshot_at = time.monotonic()
        except Exception:
            logger.warning("worker registry unreachable; using the last snapshot", exc_info=True)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[list[GenerationChunk]]:
        target = await self._target(request)
        response = cast(
            DeploymentResponseGenerator[list[GenerationChunk] | ServiceError],
            self._handle(request, target.profile).generate.remote(
                request, workers=target.ready_workers
            ),
        )
        finished = False
        try:
            async for batch in response:
                if isinstance(batch, ServiceError):  # the worker's refusal, in-band
                    finished = True
                    raise batch
                finished = any(chunk.done for chunk in batch)
                yield batch
        except RayTaskError as error:
            cause = error.cause
            if isinstance(cause, ServiceError):
                raise cause from None
            if isinstance(cause, (RayActorError, ActorUnavailableError)):
                raise _worker_lost(cause) from None
            raise
        except (RayActorError, ActorUnavailableError) as error:
            raise _worker_lost(error) from None
        finally:
            if not finished:
                response.cancel()  # type: ignore[no-untyped-call]

    def _handle(self, request: GenerationRequest, profile: str) -> DeploymentHandle[Any]:
        if request_bytes(request) > GRPC_REQUEST_BYTES:
            return self._large_request_generators[profile]
        return self._generators[profile]

    async def _target(self, request: GenerationRequest) -> Target:
        try:
            return choose_target(
                self._config, await self.workers(), request, time.time(), self._pools
            )
        except PoolNotFound:
            # a pool created in the last snapshot interval: look again before saying 404
            workers = await self.workers(max_age_s=0.0)
            return choose_target(self._config, workers, request, time.time(), self._pools)
        except Provisioning as error:
            pool = str(error.extra.get("pool", request_pool(request)))
            profile = str(error.extra.get("profile", ""))
            call = asyncio.ensure_future(self._registry.note_demand.remote(pool, profile))
            self._demand_calls.add(call)
            call.add_done_callback(self._demand_calls.discard)
            raise

    async def _autoscaler(self, method: str, *args: Any) -> Any:
        """Call the PoolAutoscaler; its ServiceErrors come back as themselves."""
        try:
            return await getattr(self._registry, method).remote(*args)
        except RayTaskError as error:
            if isinstance(error.cause, ServiceError):
                raise error.cause from None
            raise

    async def create_pool(self, spec: PoolSpec) -> PoolRecord:
        record: PoolRecord = await self._autoscaler("create_pool", spec)
        self._snapshot_at = float("-inf")
        return record

    async def get_pool(self, name: str) -> PoolRecord | None:
        record: PoolRecord | None = await self._autoscaler("get_pool", name)
        return record

    async def list_pools(self) -> list[PoolRecord]:
        records: list[PoolRecord] = await self._autoscaler("list_pools")
        return records

    async def renew_pool(self, name: str) -> PoolRecord:
        record: PoolRecord = await self._autoscaler("renew_pool", name)
        return record

    async def delete_pool(self, name: str) -> bool:
        deleted: bool = await self._autoscaler("delete_pool", name)
        self._snapshot_at = float("-inf")
        return deleted

    async def autoscaler_status(self) -> dict[str, Any]:
        """Read-only: the PoolAutoscaler's recent decisions with reasons, replica targets and
        scale events (the dashboard and `/metrics` read it)."""
        status: dict[str, Any] = await asyncio.wait_for(
            self._registry.status.remote(), SNAPSHOT_TIMEOUT_SECONDS
        )
        return status


def request_bytes(request: GenerationRequest) -> int:
    """About what the request weighs on the wire (its body, or its prompt)."""
    if request.openai is not None:
        return request.openai.size_bytes
    prompt = request.prompt or ""
    return len(prompt) if len(prompt) * 4 <= GRPC_REQUEST_BYTES else len(prompt.encode())


def _worker_lost(error: Exception) -> WorkerUnavailable:
    logger.warning("worker lost mid-request: %s", error)
    return WorkerUnavailable("the worker serving this request became unavailable")


@serve.ingress()
class Ingress:
    def __init__(
        self,
        config: dict[str, Any],
        registry: DeploymentHandle[Any],
        generators: dict[str, DeploymentHandle[Any]],
    ) -> None:
        self._config = AppConfig.model_validate(config)
        self._backend = ServeBackend(self._config, generators, registry)
        self._connection = (self._config.model_dump(mode="json"), registry, generators)

    def connection(
        self,
    ) -> tuple[dict[str, Any], DeploymentHandle[Any], dict[str, DeploymentHandle[Any]]]:
        """What `app.handles.connect` needs to build the same ServeBackend in a Ray job: the
        config and this ingress's own registry and generator handles."""
        return self._connection

    def __serve_build_asgi_app__(self) -> FastAPI:
        return instrument(create_app(self._config, self._backend))  # request metrics (issue 6)
