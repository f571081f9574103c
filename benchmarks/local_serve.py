"""The local Ray cluster and Serve instance that the test session and the single-process
benchmarks run on (127.0.0.1 only), and a free local port."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from app.serve_env import serve_env

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_local_serve() -> str:
    """ray.init a private local cluster, start Serve's HTTP proxy on a free port; the base URL."""
    import ray
    from ray import serve

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
    return f"http://127.0.0.1:{port}"


def stop_local_serve() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
