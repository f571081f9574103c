"""The local Ray cluster and Serve instance that the test session and the single-process
benchmarks run on (127.0.0.1 only)."""

from __future__ import annotations

import os
from pathlib import Path

from app.serve_env import HAPROXY_PORTS, free_port, serve_env

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def start_local_serve() -> str:
    """ray.init a private local cluster, start Serve's HTTP entry on a free port; the base URL."""
    import ray
    from ray import serve

    inherited = {name: os.environ.get(name) for name in HAPROXY_PORTS}
    os.environ.update(serve_env())  # before Ray starts: its processes inherit them
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}},
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # The cluster's processes have their environment now; its HAProxy ports are not for a
    # cluster started later from this process (tests/e2e/test_serve_deploy.py starts one).
    for name, value in inherited.items():
        if value is None:
            os.environ.pop(name, None)
    return f"http://127.0.0.1:{port}"


def stop_local_serve() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def delete_app_in_background(name: str) -> None:
    """Delete one of the session's Serve apps without waiting for its replicas to stop: each
    waits out Serve's drain loop (2 s) and its own shutdown (a Generator: the PoolAutoscaler's
    `forget`, 2 s once that is gone too; a real engine's core: ~5 s more), which the tests
    after it need not wait for. `serve.shutdown` at the session's end waits for what is left."""
    from ray import serve

    serve.delete(name, _blocking=False)
