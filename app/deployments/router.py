"""PoolRequestRouter: the Serve request router of every Generator deployment. It restricts a
request to the workers the ingress chose for it (the `workers` keyword of
`Generator.generate`: the ready workers of the request's pool and profile), then picks the less
loaded of two at random. If none of them is among the live replicas any more (an assignment
moved since the ingress looked), it routes anywhere and that Generator refuses with a retryable
503, so a request never waits on a replica that cannot take it. Ranking by prefix and KV
headroom is issue 5's; it extends this class."""

from __future__ import annotations

import random
from collections.abc import Collection
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

ROUTER_PATH = "app.deployments.router:PoolRequestRouter"


def allowed_workers(pending_request: PendingRequest | None) -> Collection[str] | None:
    if pending_request is None:
        return None
    workers: Any = pending_request.kwargs.get("workers")
    if workers is None:
        return None
    return frozenset(workers)


class PoolRequestRouter(RequestRouter):
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
        return [random.sample(eligible, min(2, len(eligible)))]
