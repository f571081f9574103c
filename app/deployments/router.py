"""PoolRequestRouter: the Serve request router of every Generator deployment (Serve runs one
per deployment handle, i.e. in each ingress replica and each Ray job using `app.handles`).

It restricts a request to the workers the ingress chose for it (the `workers` keyword of
`Generator.generate`: the ready workers of the request's pool and profile), then ranks them
with `app.routing.affinity` (prefix/key affinity, guarded by KV headroom and load balance) from
each worker's `record_routing_stats` and its own memory of which prefixes it sent where. If none
of the chosen workers is among the live replicas any more (an assignment moved since the
ingress looked), it routes anywhere and that Generator refuses with a retryable 503, so a
request never waits on a replica that cannot take it. Serve then sends the request to the first
rank's replica unless it is at `max_ongoing_requests`, falling back rank by rank."""

from __future__ import annotations

import logging
import random
from collections.abc import Collection
from typing import Any

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from app import metrics
from app.protocol.generation import GenerationRequest
from app.routing.affinity import (
    PrefixIndex,
    affinity_keys,
    estimated_blocks,
    rank,
    worker_load,
)

ROUTER_PATH = "app.deployments.router:PoolRequestRouter"
logger = logging.getLogger("ray.serve")


def allowed_workers(pending_request: PendingRequest | None) -> Collection[str] | None:
    if pending_request is None:
        return None
    workers: Any = pending_request.kwargs.get("workers")
    if workers is None:
        return None
    return frozenset(workers)


def generation_request(pending_request: PendingRequest | None) -> GenerationRequest | None:
    if pending_request is None or not pending_request.args:
        return None
    request = pending_request.args[0]
    return request if isinstance(request, GenerationRequest) else None


class PoolRequestRouter(RequestRouter):
    def initialize_state(
        self,
        policy: str = "affinity",
        max_imbalance: int = 4,
        prefix_index_capacity: int = 4096,
        **_: Any,
    ) -> None:
        self._policy = policy
        self._max_imbalance = max_imbalance
        self._index = PrefixIndex(prefix_index_capacity)
        self._in_flight: dict[str, int] = {}  # worker id -> requests this router sent there
        self._routed: dict[str, str] = {}  # internal request id -> worker id

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        allowed = allowed_workers(pending_request)
        eligible = [
            replica
            for replica in candidate_replicas
            if allowed is None or replica.replica_id.unique_id in allowed
        ]
        if not eligible:
            eligible = list(candidate_replicas)
        if not eligible:
            return []
        request = generation_request(pending_request)
        if self._policy != "affinity" or request is None or len(eligible) == 1:
            return [random.sample(eligible, min(2, len(eligible)))]
        return self._rank(eligible, request)

    def _rank(
        self, eligible: list[RunningReplica], request: GenerationRequest
    ) -> list[list[RunningReplica]]:
        by_id = {replica.replica_id.unique_id: replica for replica in eligible}
        loads = [
            worker_load(
                worker_id,
                self._ongoing(replica),
                replica.routing_stats,
                request.model,
            )
            for worker_id, replica in by_id.items()
        ]
        keys = affinity_keys(request)
        decision = rank(
            loads,
            keys,
            {worker_id: self._index.match(worker_id, keys) for worker_id in by_id},
            {
                load.worker_id: estimated_blocks(request, load.kv_block_size)
                for load in loads
                if load.kv_block_size
            },
            self._max_imbalance,
        )
        metrics.record_routing(decision.reason, decision.prefix_match)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "route %s -> %s (%s, prefix match %d of %d keys)",
                request.request_id,
                decision.chosen,
                decision.reason,
                decision.prefix_match,
                len(keys),
            )
        first, *rest = (by_id[worker_id] for worker_id in decision.order)
        return [[first], rest] if rest else [[first]]

    def _ongoing(self, replica: RunningReplica) -> int:
        own = self._in_flight.get(replica.replica_id.unique_id, 0)
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        return max(own, cached or 0)

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        worker_id = replica_id.unique_id
        self._in_flight[worker_id] = self._in_flight.get(worker_id, 0) + 1
        self._routed[pending_request.metadata.internal_request_id] = worker_id
        request = generation_request(pending_request)
        if self._policy == "affinity" and request is not None:
            self._index.record(worker_id, affinity_keys(request))

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        worker_id = self._routed.pop(internal_request_id, None)
        if worker_id is not None and self._in_flight.get(worker_id, 0) > 0:
            self._in_flight[worker_id] -= 1

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._index.retain(replica.replica_id.unique_id for replica in replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._index.forget(replica_id.unique_id)
        self._in_flight.pop(replica_id.unique_id, None)
