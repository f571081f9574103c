"""PoolAutoscaler deployment (one replica): the worker registry, the single writer of pool
state, and the control loop.

- Registry (`app.deployments.worker_registry`): every Generator replica sends its WorkerStatus
  (`heartbeat`) every few seconds; the reply is the pool that worker is assigned to (how
  assignments reach workers). The ingress reads `routing_snapshot()` (workers with their
  assigned pool, and the pools), or `routing_snapshot_since(version)`: the same, or only the
  version when nothing an ingress routes by changed since `version` (see
  `app.deployments.worker_registry.routing_view`).
- Pools: create/update/renew/delete go through here and are persisted to Ray's GCS key-value
  store (`app.deployments.pool_store`) before the call returns, so a restart of this replica
  loses nothing.
- Control loop (here): every `pools.control_interval_seconds` (and at once after a pool change
  or a request that found no worker) it runs the pure `app.pools.decide.decide` and applies
  the replica target per profile through Serve's external scaling API (the application must be
  deployed with `external_scaler_enabled: true`; without it targets stay at `num_replicas` and
  the reason says so), reached through `app.deployments.ray_private`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections import deque
from collections.abc import Sequence
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayError

from app.config import AppConfig, MachineProfile
from app.deployments.pool_store import GcsStore
from app.deployments.ray_private import set_replica_target, stop_unplaced_replicas
from app.deployments.worker_registry import WorkerRegistry
from app.pools.book import PoolBook
from app.pools.capacity import workers_that_fit
from app.pools.decide import Decision, Reason, Snapshot, WorkerView, decide
from app.pools.model import DEFAULT_POOL, PoolRecord, PoolSpec
from app.protocol.workers import WorkerStatus

logger = logging.getLogger("ray.serve")

CAPACITY_REFRESH_SECONDS = 5.0
HISTORY_LENGTH = 200
REACHED_CHECK_SECONDS = 0.1
"""Scale events waiting to be reached are checked at most this often (a check counts the live
workers: once per heartbeat, it was the registry's largest cost per heartbeat)."""
UNPLACED_WATCH_SECONDS = 30.0
"""After a profile's target is lowered, its stopping replicas that never got a node are
looked for (and killed: `stop_unplaced_replicas`) for this long."""
RoutingSnapshot = tuple[list[WorkerStatus], dict[str, PoolRecord]]


@dataclasses.dataclass
class ScaleEvent:
    """One applied replica target, timed: decided -> accepted by Serve -> reached (as many live
    workers as the target)."""

    profile: str
    previous: int
    target: int
    decided_at: float
    applied_at: float | None = None
    reached_at: float | None = None
    error: str | None = None


class PoolAutoscaler:
    def __init__(self, config: AppConfig) -> None:
        self._config = config  # validated by the builder; unpickled without validation
        self._app_name = serve.get_replica_context().app_name
        self._store = GcsStore(self._app_name)
        loaded = self._store.load()
        self._restored = loaded is not None
        self._book = loaded or PoolBook(
            replicas={p.name: p.num_replicas for p in self._config.profiles}
        )
        self._demand: dict[tuple[str, str], float] = {}
        self._shrink_since: dict[str, float] = {}
        self._capacity: dict[str, int | None] = {}
        self._load_capacity: dict[str, int | None] = {}
        self._capacity_at = float("-inf")
        self._history: deque[tuple[float, Reason]] = deque(maxlen=HISTORY_LENGTH)
        self._events: deque[ScaleEvent] = deque(maxlen=HISTORY_LENGTH)
        self._readiness: dict[str, str] = {}
        self._scaler_error: str | None = None
        self._applied_once = False
        self._lowered: dict[str, float] = {}  # deployment -> when its target was last lowered
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._epoch = uuid.uuid4().hex[:8]
        self._version = 0
        self._version_at = time.time()
        self._versioned: tuple[str, RoutingSnapshot] | None = None
        self._reached_checked_at = float("-inf")
        grace = self._config.pools.startup_grace_seconds
        self._grace = grace if grace is not None else 3 * self._config.worker_heartbeat_seconds
        self._started = time.time()
        self._deciding = False
        self._registry = WorkerRegistry(self._app_name, self._config.worker_heartbeat_seconds)
        if self._restored:
            logger.info("pool autoscaler restored %d pools from the GCS", len(self._book.pools))
        self._loop = asyncio.get_running_loop().create_task(self._control_forever())

    # --- registry -------------------------------------------------------------------------------

    def heartbeat(self, status: WorkerStatus) -> str:
        """A worker's heartbeat; the reply is the pool it is assigned to."""
        now = time.time()
        if self._registry.heartbeat(status, self._config.worker_stale_seconds):
            self._changed()
        if now - self._reached_checked_at >= REACHED_CHECK_SECONDS:
            self._reached_checked_at = now
            self._note_reached(now)
        return self._book.assignments.get(status.worker_id, DEFAULT_POOL)

    def forget(self, worker_id: str) -> None:
        self._registry.forget(worker_id)
        self._changed()

    def _changed(self) -> None:
        """Something an ingress routes by changed: the next versioned pull gets it."""
        self._version += 1
        self._version_at = time.time()
        self._versioned = None

    def workers(self) -> list[WorkerStatus]:
        """Every known worker, `pool` being its current assignment."""
        return self._registry.known(self._book.assignments)

    async def routing_snapshot(self) -> tuple[list[WorkerStatus], dict[str, PoolRecord]]:
        """The first snapshots of a registry that just started wait for a round of heartbeats,
        so that a new ingress does not turn requests away from a service that is running."""
        await self._registry.wait_until_full()
        return self.workers(), dict(self._book.pools)

    async def routing_snapshot_since(
        self, version: str | None
    ) -> tuple[str, RoutingSnapshot | None]:
        """`routing_snapshot()` and its version, or (version, None) when nothing an ingress
        routes by changed since `version`: a pull costs a few bytes while nothing changes.
        Heartbeats that change only times and load figures are no change, so the version
        also moves every `worker_stale_seconds / 2`: while an ingress pulls, the `reported_at`
        it judges liveness by is never older than that plus a heartbeat (after a pause it can
        be older: an ingress that finds no live worker pulls `routing_snapshot` before it says
        so). Ingress side: keep the version of the last snapshot taken, and keep the snapshot
        when the reply's is None."""
        await self._registry.wait_until_full()
        now = time.time()
        if now - self._version_at >= self._config.worker_stale_seconds / 2:
            self._changed()
        current = f"{self._epoch}:{self._version}"
        if version == current:
            return current, None
        if self._versioned is None or self._versioned[0] != current:
            self._versioned = (current, (self.workers(), dict(self._book.pools)))
        return self._versioned

    def note_demand(self, pool: str, profile: str) -> None:
        """A request found no ready worker of (pool, profile): scale for it."""
        self._demand[(pool, profile)] = time.time()
        self._wake.set()

    # --- pools ------------------------------------------------------------------------------------

    async def create_pool(self, spec: PoolSpec) -> PoolRecord:
        async with self._lock:
            self._book.upsert(spec, time.time(), self._config.pools.lease_seconds)
            self._store.save(self._book)
            self._changed()
            if self._may_decide(time.time()):
                await self._control_once()
        record = self._book.get(spec.name)
        assert record is not None
        return record

    async def renew_pool(self, name: str) -> PoolRecord:
        async with self._lock:
            before = self._book.get(name)
            record = self._book.renew(name, time.time())
            self._store.save(self._book)
            if before is None or before.state != record.state:
                self._changed()
        self._wake.set()
        return record

    def get_pool(self, name: str) -> PoolRecord | None:
        return self._book.get(name)

    def list_pools(self) -> list[PoolRecord]:
        return sorted(self._book.pools.values(), key=lambda r: (r.created_at, r.name))

    async def delete_pool(self, name: str) -> bool:
        async with self._lock:
            deleted = self._book.delete(name)
            if deleted:
                self._store.save(self._book)
                self._changed()
        self._wake.set()
        return deleted

    def status(self) -> dict[str, Any]:
        """What the autoscaler did and why (for /health, the dashboard and tests)."""
        return {
            "replicas": dict(self._book.replicas),
            "assignments": dict(self._book.assignments),
            "readiness": dict(self._readiness),
            "capacity": dict(self._capacity),
            "load_capacity": dict(self._load_capacity),
            "restored": self._restored,
            "scaler_error": self._scaler_error,
            "reasons": [
                {"at": at, "kind": reason.kind, "reason": reason.text}
                for at, reason in self._history
            ],
            "scale_events": [dataclasses.asdict(event) for event in self._events],
        }

    async def __del__(self) -> None:
        """Serve's graceful shutdown (the app deleted or redeployed): the deleted deployments'
        replicas that never got a node are stopped too, not left to the drain timeout."""
        self._loop.cancel()
        for profile in self._profiles():
            await self._stop_unplaced(profile.deployment_name)

    # --- control loop --------------------------------------------------------------------------------

    async def _control_forever(self) -> None:
        interval = self._config.pools.control_interval_seconds
        while not self._may_decide(time.time()):
            await asyncio.sleep(self._config.worker_heartbeat_seconds / 2)
        while True:
            try:
                async with self._lock:
                    await self._control_once()
            except Exception:
                logger.exception("pool autoscaler control step failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)

    def _may_decide(self, now: float) -> bool:
        """Not before the grace after the first heartbeat or pull reached this replica; after a
        restart, not before the assigned workers' heartbeats (so their pools keep them), at most
        until a silent worker would count as stale anyway. Nothing reached it within
        `worker_stale_seconds` of starting: no worker runs, count from then."""
        if self._deciding:
            return True
        stale = self._config.worker_stale_seconds
        reached = self._registry.reached_at
        origin = reached if reached is not None else self._started + stale
        if now < origin + self._grace:
            return False
        waiting = [w for w in self._book.assignments if w not in self._registry.statuses]
        self._deciding = not waiting or now >= origin + max(self._grace, stale)
        return self._deciding

    async def _control_once(self) -> None:
        now = time.time()
        forgotten = await self._registry.forget_gone(now)
        if forgotten:
            self._changed()
        self._record(now, forgotten)
        stale = self._config.worker_stale_seconds
        live = [WorkerView.of(s) for s in self._registry.live(now, stale)]
        replicas = {
            p.name: self._book.replicas.get(p.name, p.num_replicas) for p in self._profiles()
        }
        snapshot = Snapshot(
            pools=self._book.pools,
            workers=live,
            assignments=self._book.assignments,
            replicas=replicas,
            capacity=self._cluster_capacity(now),
            load_capacity=self._load_capacity,
            demand=self._demand,
            shrink_since=self._shrink_since,
        )
        decision = decide(snapshot, self._config, now)
        self._shrink_since = decision.shrink_since
        self._readiness = decision.readiness
        window = self._config.pools.demand_window_seconds
        self._demand = {k: t for k, t in self._demand.items() if now - t <= window}
        self._record(now, decision.reasons)
        applied = await self._apply_targets(decision, replicas, now)
        if self._book.apply(dataclasses.replace(decision, targets=applied)):
            self._store.save(self._book)
            self._changed()
        for deployment, lowered_at in list(self._lowered.items()):
            if now - lowered_at > UNPLACED_WATCH_SECONDS:
                del self._lowered[deployment]
            else:
                await self._stop_unplaced(deployment)

    async def _stop_unplaced(self, deployment: str) -> None:
        try:
            killed = await stop_unplaced_replicas(self._app_name, deployment)
        except RayError as error:
            logger.warning("cannot stop %s's unplaced replicas: %s", deployment, error)
            return
        if killed:
            logger.info(
                "pool autoscaler: %s: stopped %d replica(s) without a node", deployment, killed
            )

    async def _apply_targets(
        self, decision: Decision, replicas: dict[str, int], now: float
    ) -> dict[str, int]:
        """Send changed targets to Serve; returns the targets now in force."""
        applied = dict(replicas)
        for profile in self._profiles():
            target = decision.targets[profile.name]
            if target == replicas[profile.name] and self._applied_once:
                continue
            event = ScaleEvent(profile.name, replicas[profile.name], target, now)
            try:
                await set_replica_target(self._app_name, profile.deployment_name, target)
            except RayError as error:
                cause = getattr(error, "cause", None) or error
                event.error = f"{type(cause).__name__}: {cause}"
                if self._scaler_error != event.error:
                    logger.warning("cannot apply %s -> %d: %s", profile.name, target, event.error)
                self._scaler_error = event.error
                continue
            event.applied_at = time.time()
            applied[profile.name] = target
            self._scaler_error = None
            if target != replicas[profile.name]:
                self._events.append(event)
            if target < replicas[profile.name]:
                self._lowered[profile.deployment_name] = now
        self._applied_once = True
        return applied

    def _record(self, now: float, reasons: Sequence[Reason]) -> None:
        for reason in reasons:
            logger.info("pool autoscaler: %s", reason)
            self._history.append((now, reason))

    def _note_reached(self, now: float) -> None:
        stale = self._config.worker_stale_seconds
        for event in self._events:
            if event.reached_at is not None or event.applied_at is None:
                continue
            live = sum(1 for s in self._registry.live(now, stale) if s.profile == event.profile)
            if (event.target >= event.previous and live >= event.target) or (
                event.target < event.previous and live <= event.target
            ):
                event.reached_at = now

    def _profiles(self) -> list[MachineProfile]:
        return self._config.profiles

    def _cluster_capacity(self, now: float) -> dict[str, int | None]:
        """Most workers of each profile the alive nodes' total resources could hold (each
        profile counted alone: profiles sharing nodes may get less)."""
        if now - self._capacity_at < CAPACITY_REFRESH_SECONDS:
            return self._capacity
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]  # type: ignore[no-untyped-call]
        self._capacity = {p.name: workers_that_fit(p, nodes) for p in self._profiles()}
        self._load_capacity = {
            p.name: workers_that_fit(p, nodes, gainful=True) for p in self._profiles()
        }
        self._capacity_at = now
        return self._capacity
