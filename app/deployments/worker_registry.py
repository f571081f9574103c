"""The PoolAutoscaler's worker registry: the last heartbeat (WorkerStatus) of every Generator
replica, in memory (a restarted registry hears from every live worker within a heartbeat)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping

from ray.exceptions import RayError

from app.deployments.ray_private import running_replica_ids
from app.pools.decide import Reason
from app.pools.model import DEFAULT_POOL
from app.protocol.workers import WorkerStatus

FORGET_AFTER_SECONDS = 120.0
SILENT_HEARTBEATS = 3
"""A worker silent this many heartbeat intervals is looked up among Serve's replicas."""
WARMUP_HEARTBEATS = 1.25


def routing_view(status: WorkerStatus) -> tuple[object, ...]:
    """What an ingress routes by, apart from times and load figures (which change with every
    heartbeat): where the worker is, and each model's state and size bounds."""
    return (
        status.deployment,
        status.profile,
        status.node_id,
        tuple(
            (
                model.model,
                model.state,
                model.error,
                None if model.stats is None else model.stats.max_model_len,
                None if model.stats is None else model.stats.max_chars_per_token,
            )
            for model in status.models
        ),
    )


class WorkerRegistry:
    def __init__(self, app_name: str, heartbeat_seconds: float) -> None:
        self._app_name = app_name
        self._heartbeat_seconds = heartbeat_seconds
        self.statuses: dict[str, WorkerStatus] = {}
        """worker id -> its last heartbeat."""
        self.reached_at: float | None = None
        """When the first heartbeat or pull reached this replica. Serve publishes a new replica
        to its callers only after its constructor ran and its health check passed (seconds on
        a busy machine), so waits for a round of heartbeats count from here, not from the
        start."""

    def reached(self, now: float) -> float:
        if self.reached_at is None:
            self.reached_at = now
        return self.reached_at

    def heartbeat(self, status: WorkerStatus, stale_seconds: float = float("inf")) -> bool:
        """True when the heartbeat changes what an ingress routes by: a new worker, one back
        from stale, or a changed `routing_view`."""
        self.reached(time.time())
        previous = self.statuses.get(status.worker_id)
        self.statuses[status.worker_id] = status
        return (
            previous is None
            or status.reported_at - previous.reported_at > stale_seconds
            or routing_view(previous) != routing_view(status)
        )

    def forget(self, worker_id: str) -> None:
        self.statuses.pop(worker_id, None)

    def known(self, assignments: Mapping[str, str]) -> list[WorkerStatus]:
        """Every worker heard from within FORGET_AFTER_SECONDS, `pool` being its assignment."""
        cutoff = time.time() - FORGET_AFTER_SECONDS
        for worker_id in [w for w, s in self.statuses.items() if s.reported_at < cutoff]:
            del self.statuses[worker_id]  # (its staleness moved the version long before)
        return [
            dataclasses.replace(s, pool=assignments.get(w, DEFAULT_POOL))
            for w, s in self.statuses.items()
        ]

    def live(self, now: float, stale_seconds: float) -> list[WorkerStatus]:
        return [s for s in self.statuses.values() if now - s.reported_at <= stale_seconds]

    async def wait_until_full(self) -> None:
        """A registry that just started (a redeploy) knows only the workers that reported
        since: wait for a round of heartbeats."""
        now = time.time()
        warming = self.reached(now) + WARMUP_HEARTBEATS * self._heartbeat_seconds - now
        if warming > 0:
            await asyncio.sleep(warming)

    async def forget_gone(self, now: float) -> list[Reason]:
        """Drop silent workers whose replica Serve no longer runs (SIGKILLed, lost with their
        node): they never said goodbye, and their KV ledgers died with them."""
        silent_after = SILENT_HEARTBEATS * self._heartbeat_seconds
        silent = [s for s in self.statuses.values() if now - s.reported_at > silent_after]
        reasons: list[Reason] = []
        for deployment in {s.deployment for s in silent}:
            try:
                present = await running_replica_ids(self._app_name, deployment)
            except RayError:
                continue
            if present is None:  # no Serve controller to ask
                break
            for status in silent:
                if status.deployment == deployment and status.worker_id not in present:
                    self.statuses.pop(status.worker_id, None)
                    text = f"worker {status.worker_id} forgotten: Serve no longer runs it"
                    reasons.append(Reason("other", text))
        return reasons
