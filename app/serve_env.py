"""The Ray Serve settings poolserve runs with: part of Ray 2.60's own throughput set
(`RAY_SERVE_THROUGHPUT_OPTIMIZED`, ray/serve/_private/constants.py). Serve reads them from the
environment when a process imports it, so they belong in the environment of every Ray node
(the proxy and the controller read them too): `make serve` (scripts/stack.py), the test and
benchmark clusters, cluster/*.yaml; serve_config.yaml repeats them in the application's
runtime_env for the replicas of a cluster started without them. A value already set in the
environment wins.

- user code on the replica's own event loop, not a second thread (no hand-off per call);
- handles (the proxy's to the Ingress, the Ingress's to the ledger and autoscaler) use Serve's
  gRPC data plane between replicas (the Generator streams already do: `streaming.transport`);
- Serve's logs go to its log files only, not also to stderr (which Ray's log monitor tails and
  ships).

Not taken from that set as node environment: routing on the caller's loop
(`RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0`), because a handle so made cannot be called from
synchronous code, as Ray jobs call ours (app/handles.py); the Ingress sets it on its own handles
instead (`app.deployments.ray_private.route_on_this_loop`). Nor direct ingress (each ingress
replica on a port of its own behind HAProxy: measured no faster here, docs/benchmarks.md
"Targets") and the 1000-record request-log buffer (a request's log lines would reach the file
only after 1000 more records).

Measured in docs/benchmarks.md ("Root causes", 4)."""

from __future__ import annotations

import os

SERVE_ENV: dict[str, str] = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_LOG_TO_STDERR": "0",
}


def serve_env() -> dict[str, str]:
    """SERVE_ENV with what the environment already sets."""
    return {name: os.environ.get(name, value) for name, value in SERVE_ENV.items()}
