"""PoolRequestRouter: the Serve request router of every Generator deployment (Serve runs one
per deployment handle, i.e. in each ingress replica and each Ray job using `app.handles`).

The worker is chosen once, by the ingress (`ServeBackend` with `app.routing.affinity`), and
named in the call (`Generator.generate(requests, worker=...)`); this router only sends the
call to that replica. If the named replica is not among the live ones any more (it is
draining, or an assignment moved since the ingress looked), it routes anywhere and that
Generator serves the requests of its own pool and refuses the others with a retryable 503, so
a request never waits on a replica that cannot take it."""

from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

ROUTER_PATH = "app.deployments.router:PoolRequestRouter"


def named_worker(pending_request: PendingRequest | None) -> str | None:
    if pending_request is None:
        return None
    worker: Any = pending_request.kwargs.get("worker")
    return worker if isinstance(worker, str) else None


class PoolRequestRouter(RequestRouter):
    def initialize_state(self, **_: Any) -> None:
        pass

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        worker = named_worker(pending_request)
        if worker is not None:
            for replica in candidate_replicas:
                if replica.replica_id.unique_id == worker:
                    return [[replica]]
        if not candidate_replicas:
            return []
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
