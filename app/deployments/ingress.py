"""Ingress deployment: the FastAPI app of `app/server.py`, backed by Serve deployment handles."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from app import metrics
from app.api.observe import instrument
from app.config import AppConfig
from app.deployments.calls import ENDED, Inbox, WorkerCalls, WorkerMessage
from app.deployments.kv_view import KeyFetcher
from app.deployments.metrics_sink import share_metrics
from app.deployments.ray_private import route_on_this_loop
from app.errors import ModelLoading, PoolNotFound, Provisioning, ServiceError, UsageUnavailable
from app.pools.model import DEFAULT_POOL, PoolRecord, PoolSpec
from app.protocol.generation import GenerationRequest, StreamBatch
from app.protocol.workers import WorkerStatus
from app.routing.affinity import routing_stats, worker_load
from app.routing.board import RoutingBoard, TargetIndex
from app.routing.targets import Target, carry_over, request_pool
from app.serve_env import freeze_startup_heap
from app.server import create_app
from app.tenancy.ledger_limits import LedgerLimits
from app.tenancy.limits import Ticket
from app.tenancy.quota import LocalLimits, QuotaClient
from app.tenancy.reports import UsageReports
from app.tenancy.requests import tenant_pool, terminal_stats, ticket_for, with_pool_defaults

logger = logging.getLogger("ray.serve")
SNAPSHOT_MAX_AGE_SECONDS = 0.5
SNAPSHOT_STALE_SECONDS = 5.0  # older than this, a request waits for a fresh snapshot
SNAPSHOT_TIMEOUT_SECONDS = 5.0  # a PoolAutoscaler that just started answers after a heartbeat round
# Serve's replica gRPC server takes messages up to 4 MiB (a call carries up to START_GROUP
# requests): bigger requests travel as Ray objects
GRPC_REQUEST_BYTES = 48 * 1024


class ServeBackend:
    """GenerationBackend over Serve: worker and pool snapshots from the PoolAutoscaler (which
    also owns pool changes); each request's worker chosen here, once, and its stream carried
    with the other requests to that worker on one call (`app.deployments.calls`)."""

    def __init__(
        self,
        config: AppConfig,
        generators: dict[str, DeploymentHandle[Any]],
        autoscaler: DeploymentHandle[Any],
        ledger: DeploymentHandle[Any] | None = None,
    ) -> None:
        handles = (*generators.values(), autoscaler, *([ledger] if ledger else []))
        routers = {type(getattr(route_on_this_loop(h), "_router", None)).__name__ for h in handles}
        logger.info("ingress handles route with %s", ", ".join(sorted(routers)))
        self._config = config
        self._ledger = ledger
        # limits: leased quota (no round trip while it lasts), or at the ledger per request
        self._quota: QuotaClient | None = None
        self._at_ledger: LedgerLimits | None = None
        tenancy = config.tenancy
        if ledger is not None and tenancy.leased_limits:
            replica = uuid.uuid4().hex  # this replica (or Ray job) among the ledger's lessees
            self._quota = QuotaClient(
                lambda report: ledger.sync.remote(replica, report),
                LocalLimits(
                    tenancy.limit_window_seconds,
                    fallback_replicas=config.ingress.num_replicas,
                    fallback=tenancy.on_ledger_unavailable,
                ),
            )
        elif ledger is not None:
            billing = UsageReports(lambda records: ledger.record_usage.remote(records))
            self._at_ledger = LedgerLimits(
                lambda ticket: ledger.admit.remote(ticket),
                lambda request_ids: ledger.renew.remote(request_ids),
                lambda request_id: billing.later(request_id, None),
                window_s=tenancy.limit_window_seconds,
                replicas=config.ingress.num_replicas,
                fallback=tenancy.on_ledger_unavailable,
                lease_s=tenancy.stream_lease_seconds,
            )
        self._generators = generators
        self._by_reference = config.streaming.transport == "object_refs"
        self._calls: dict[tuple[str, str, bool], WorkerCalls] = {}  # (profile, worker, large)
        # worker id -> (unix time, routing stats) from its last call or heartbeat
        self._stats: dict[str, tuple[float, Any]] = {}
        # the routing decision at a cost that does not grow with the workers of a target:
        # targets computed once per snapshot, loads kept per target group (`app.routing.board`)
        self._board = RoutingBoard(
            config.routing.max_imbalance,
            config.routing.prefix_index_capacity,
            config.routing.kv_events,  # prefixes as the engines report them (KV events)
            prefix_threshold=config.routing.prefix_threshold,
        )
        self._keys = KeyFetcher(self._board, generators)  # whole key sets after a gap
        self._targets = TargetIndex(config, [], {})
        self._autoscaler = autoscaler
        self._snapshot: list[WorkerStatus] = []
        self._pools: dict[str, PoolRecord] = {}
        self._demand_calls: set[asyncio.Task[Any]] = set()
        self._snapshot_at = float("-inf")
        self._snapshot_version: str | None = None
        self._full_at = float("-inf")  # the last pull that answered the whole snapshot
        self._refresh: asyncio.Task[None] | None = None
        self._whole: asyncio.Task[None] | None = None

    async def workers(self, max_age_s: float = SNAPSHOT_MAX_AGE_SECONDS) -> list[WorkerStatus]:
        """For /health, the dashboard and /metrics: every worker's load and KV figures as fresh
        as its heartbeats (a whole pull once the last whole one is older than `max_age_s`; the
        request path's versioned pulls skip heartbeats that change only figures)."""
        if time.monotonic() - self._full_at > max_age_s:
            if self._whole is None or self._whole.done():  # one pull for every caller
                self._whole = asyncio.get_running_loop().create_task(
                    self._load_snapshot(whole=True)
                )
            await asyncio.shield(self._whole)
        return self._snapshot

    async def _routing_snapshot(
        self, max_age_s: float = SNAPSHOT_MAX_AGE_SECONDS
    ) -> list[WorkerStatus]:
        """The PoolAutoscaler's snapshot for routing. Older than `max_age_s`: refreshed in the
        background while requests go on with the current one; a request waits for the round
        trip only when the snapshot is far older (or `max_age_s` is 0: "look again now")."""
        age = time.monotonic() - self._snapshot_at
        if age > max_age_s:
            if self._refresh is None or self._refresh.done():
                self._refresh = asyncio.get_running_loop().create_task(self._load_snapshot())
            if max_age_s == 0 or age > SNAPSHOT_STALE_SECONDS:
                await asyncio.shield(self._refresh)
        return self._snapshot

    async def _load_snapshot(self, whole: bool = False) -> None:
        """A versioned pull (a few bytes while nothing an ingress routes by changed), or with
        `whole` the PoolAutoscaler's current snapshot, every figure as fresh as the heartbeats."""
        try:
            if whole:
                snapshot = await asyncio.wait_for(
                    self._autoscaler.routing_snapshot.remote(), SNAPSHOT_TIMEOUT_SECONDS
                )
            else:
                version, snapshot = await asyncio.wait_for(
                    self._autoscaler.routing_snapshot_since.remote(self._snapshot_version),
                    SNAPSHOT_TIMEOUT_SECONDS,
                )
                if snapshot is None:
                    self._snapshot_at = time.monotonic()
                    return
                self._snapshot_version = version
            workers, self._pools = snapshot
            if whole:  # (a versioned one can be a few seconds old: taken at its version)
                self._full_at = time.monotonic()
            keep_s = 2 * self._config.worker_heartbeat_seconds
            self._snapshot = carry_over(self._snapshot, workers, time.time(), keep_s)
            self._targets = TargetIndex(self._config, self._snapshot, self._pools)
            self._snapshot_at = time.monotonic()
        except Exception:
            logger.warning("PoolAutoscaler unreachable; using the last snapshot", exc_info=True)
            return
        known = {status.worker_id for status in self._snapshot}
        for status in self._snapshot:  # heartbeat stats, unless a call brought fresher ones
            if self._stats.get(status.worker_id, (0.0,))[0] < status.reported_at:
                self._stats[status.worker_id] = (status.reported_at, routing_stats(status))
                self._loaded(status.profile, status.worker_id)
        for key in [key for key in self._calls if key[1] not in known]:
            if self._calls[key].in_flight == 0:
                del self._calls[key]
        for gone in [worker for worker in self._stats if worker not in known]:
            del self._stats[gone]
            self._board.forget(gone)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamBatch]:
        """Limits first (service-wide, before any engine work), then the worker's stream. The
        worker bills the request from the engine's counts, however it ends (`Generator`); here
        only the limits it holds are settled when it ends."""
        await self._routing_snapshot()
        pool = tenant_pool(request)
        if pool != DEFAULT_POOL and pool not in self._pools:
            await self._routing_snapshot(0.0)  # created since the snapshot: its limits apply
        record = self._pools.get(pool)
        request = with_pool_defaults(request, record)
        ticket = await self._admit(request, record)
        if ticket is None or self._quota is None:
            async for batch in self._generate(request):
                yield batch
            return
        started = settled = False
        try:
            async for batch in self._generate(request):
                started = True
                terminal = terminal_stats(batch)
                if terminal is not None:
                    # before the last bytes: the client's next request finds its limits free
                    settled = True
                    tokens = (terminal.prompt_tokens or 0) + (terminal.completion_tokens or 0)
                    await self._quota.release(request.request_id, tokens)
                yield batch
        finally:
            if not settled:  # cut: its estimate counts once it started (the engine ran it)
                self._quota.finish(request.request_id, ticket.estimated_tokens if started else None)

    async def _admit(self, request: GenerationRequest, record: PoolRecord | None) -> Ticket | None:
        """Decide the request's limits here, from the quota this replica leases from the
        TenantLedger (`app.tenancy.quota`): no round trip while the quota lasts; or (leased
        limits off) at the ledger. Raises the refusal (429 + Retry-After). None: no limit
        applies."""
        ticket = ticket_for(request, self._config, record)
        if not ticket.subjects or self._ledger is None:
            return None
        limits = self._quota or self._at_ledger
        assert limits is not None
        try:
            await limits.admit(ticket)
        except ServiceError:
            self._decided("refused")
            raise
        self._decided("admitted")
        return ticket

    def _decided(self, outcome: str) -> None:
        """Count a limit decision by who made it: the lease, the ledger, or the fallback."""
        if self._quota is not None:
            mode: str = self._quota.limits.mode(time.monotonic())
        else:
            assert self._at_ledger is not None
            mode = self._at_ledger.decided
        metrics.LIMIT_DECISIONS.inc((mode, outcome))

    def limits_health(self) -> dict[str, Any] | None:
        """How this replica decides limits now (leased, starting, at the ledger, or the
        fallback while the ledger is out, with since when), for /health."""
        if self._quota is not None:
            return self._quota.limits.health(time.monotonic())
        return None if self._at_ledger is None else self._at_ledger.health()

    async def usage_report(self, since: float | None, pool: str | None) -> dict[str, Any]:
        report: dict[str, Any] = await self._usage_read("usage_report", since, pool)
        return report

    async def pool_usage(self, pool: str) -> dict[str, Any]:
        usage: dict[str, Any] = await self._usage_read("pool_usage", pool)
        return usage

    async def _usage_read(self, method: str, *args: Any) -> Any:
        """A usage read from the TenantLedger; 503 usage_unavailable when it (or a usage shard)
        does not answer in time."""
        if self._ledger is None:
            raise ServiceError("usage accounting is not running in this deployment")
        try:
            return await asyncio.wait_for(
                getattr(self._ledger, method).remote(*args), SNAPSHOT_TIMEOUT_SECONDS
            )
        except Exception as error:  # noqa: BLE001 - timeouts, a dead or restarting replica
            cause = getattr(error, "cause", error)
            if isinstance(cause, ServiceError):
                raise cause from None
            raise UsageUnavailable(
                f"the tenant ledger did not answer ({type(error).__name__}); retry"
            ) from None

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[StreamBatch]:
        inbox: Inbox | None = None
        try:
            target = await self._target(request)
            worker = self._choose(request, target)
            inbox = self._worker_calls(target.profile, worker, request).submit(request)
            keepalive_s = self._config.streaming.keepalive_seconds
            while True:
                item = await inbox.get(keepalive_s)
                if isinstance(item, TimeoutError):
                    yield []  # silent for keepalive_s: the HTTP layer sends a keep-alive
                    continue
                if item is ENDED:
                    return
                if isinstance(item, ServiceError):
                    raise item
                yield inbox.with_ready(item)  # what else has arrived: one write to the client
        finally:
            if inbox is not None:
                inbox.close()
            if self._at_ledger is not None:  # a worker that took it reports it (releasing it)
                self._at_ledger.finish(request.request_id, inbox is not None and inbox.accepted)

    def _choose(self, request: GenerationRequest, target: Target) -> str:
        """The worker, chosen once: among the target's ready workers, by prefix affinity
        guarded by KV headroom and load (`app.routing.board`, deciding as
        `app.routing.affinity.rank` over every worker would), from the requests this replica
        has in flight on each and the stats each worker sent on its last call (or its
        heartbeat)."""
        ready = target.ready_workers
        if len(ready) == 1:
            return ready[0]
        if self._config.routing.policy != "affinity":  # power of two choices
            pair = [
                worker_load(
                    worker,
                    self._in_flight(target.profile, worker),
                    self._stats.get(worker, (0.0, None))[1],
                    request.model,
                )
                for worker in random.sample(ready, 2)
            ]
            return min(pair, key=lambda load: load.load).worker_id
        decision = self._board.choose(ready, request)
        metrics.record_routing(decision.reason, decision.prefix_match)
        return decision.chosen

    def _loaded(self, profile: str, worker: str) -> None:
        """The worker's load changed (its requests in flight from here, or its stats)."""
        stats = self._stats.get(worker, (0.0, None))[1]
        self._board.update(worker, self._in_flight(profile, worker), stats)
        self._keys.poll(profile)

    def _in_flight(self, profile: str, worker: str) -> int:
        return sum(
            calls.in_flight
            for large in (False, True)
            if (calls := self._calls.get((profile, worker, large))) is not None
        )

    def _worker_calls(self, profile: str, worker: str, request: GenerationRequest) -> WorkerCalls:
        large = request_bytes(request) > GRPC_REQUEST_BYTES
        key = (profile, worker, large)
        calls = self._calls.get(key)
        if calls is None:
            handle = self._generators[profile]
            streaming = handle.options(stream=True, _by_reference=large or self._by_reference)

            def start(requests: list[GenerationRequest]) -> AsyncIterator[WorkerMessage]:
                return cast(
                    AsyncIterator[WorkerMessage],
                    streaming.generate.remote(requests, worker=worker),
                )

            async def cancel(request_ids: list[str]) -> None:
                await handle.cancel.remote(request_ids, worker=worker)

            def note(stats: Any) -> None:
                self._stats[worker] = (time.time(), stats)
                self._loaded(profile, worker)

            def load() -> None:
                self._loaded(profile, worker)

            calls = self._calls[key] = WorkerCalls(start, cancel, note, load)
        return calls

    async def _target(self, request: GenerationRequest) -> Target:
        await self._routing_snapshot()
        try:
            return self._targets.choose(request, time.time())
        except PoolNotFound:
            # a pool created in the last snapshot interval: look again before saying 404
            await self._routing_snapshot(0.0)
        except (Provisioning, ModelLoading):
            # a versioned pull keeps the snapshot while only heartbeat times change, so its
            # `reported_at` can be seconds older than the PoolAutoscaler's: a worker that looks
            # stale (or still loading) here may be serving. Look at the PoolAutoscaler's current
            # figures before saying 503 (one whole pull, shared, at most every 0.5 s)
            await self.workers()
        try:
            return self._targets.choose(request, time.time())
        except Provisioning as error:
            pool = str(error.extra.get("pool", request_pool(request)))
            profile = str(error.extra.get("profile", ""))
            call = asyncio.ensure_future(self._autoscaler.note_demand.remote(pool, profile))
            self._demand_calls.add(call)
            call.add_done_callback(self._demand_calls.discard)
            raise

    async def _call_autoscaler(self, method: str, *args: Any) -> Any:
        """Call the PoolAutoscaler; its ServiceErrors come back as themselves."""
        try:
            return await getattr(self._autoscaler, method).remote(*args)
        except RayTaskError as error:
            if isinstance(error.cause, ServiceError):
                raise error.cause from None
            raise

    async def create_pool(self, spec: PoolSpec) -> PoolRecord:
        record: PoolRecord = await self._call_autoscaler("create_pool", spec)
        self._snapshot_at = float("-inf")
        return record

    async def get_pool(self, name: str) -> PoolRecord | None:
        record: PoolRecord | None = await self._call_autoscaler("get_pool", name)
        return record

    async def list_pools(self) -> list[PoolRecord]:
        records: list[PoolRecord] = await self._call_autoscaler("list_pools")
        return records

    async def renew_pool(self, name: str) -> PoolRecord:
        record: PoolRecord = await self._call_autoscaler("renew_pool", name)
        return record

    async def delete_pool(self, name: str) -> bool:
        deleted: bool = await self._call_autoscaler("delete_pool", name)
        self._snapshot_at = float("-inf")
        return deleted

    async def autoscaler_status(self) -> dict[str, Any]:
        """Read-only: the PoolAutoscaler's recent decisions with reasons, replica targets and
        scale events (the dashboard and `/metrics` read it)."""
        status: dict[str, Any] = await asyncio.wait_for(
            self._autoscaler.status.remote(), SNAPSHOT_TIMEOUT_SECONDS
        )
        return status


def request_bytes(request: GenerationRequest) -> int:
    """About what the request weighs on the wire (its body, or its prompt)."""
    if request.openai is not None:
        return request.openai.size_bytes
    prompt = request.prompt or ""
    return len(prompt) if len(prompt) * 4 <= GRPC_REQUEST_BYTES else len(prompt.encode())


@serve.ingress()
class Ingress:
    def __init__(
        self,
        config: AppConfig,
        autoscaler: DeploymentHandle[Any],
        generators: dict[str, DeploymentHandle[Any]],
        ledger: DeploymentHandle[Any] | None = None,
    ) -> None:
        self._config = config  # validated by the builder; unpickled without validation
        share_metrics()  # this replica's request metrics add up with the other replicas'
        self._backend = ServeBackend(config, generators, autoscaler, ledger)
        self._connection = (config, autoscaler, generators, ledger)

    def connection(
        self,
    ) -> tuple[
        AppConfig,
        DeploymentHandle[Any],
        dict[str, DeploymentHandle[Any]],
        DeploymentHandle[Any] | None,
    ]:
        """What `app.handles.connect` needs to build the same ServeBackend in a Ray job: the
        config (unpickled there, not validated again) and this ingress's own PoolAutoscaler,
        generator and tenant ledger handles."""
        return self._connection

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = instrument(create_app(self._config, self._backend))  # request metrics
        freeze_startup_heap()
        return app
