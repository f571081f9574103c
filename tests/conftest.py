"""Shared fixtures. One local Ray cluster and one Serve instance per test session, holding two
applications: `poolserve` (the real vLLM engine and SmolLM2, HTTP at /) and `fake` (the fake
engine from tests/fakes, for the layers above the engine)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.local_serve import start_local_serve, stop_local_serve
from tests.support.teardowns import Teardowns

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# a loaded 2-core machine can take longer than Ray's defaults to bring a node's agents up
os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")

REAL_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
FAKE_MODEL = "fake/model"
READY_TIMEOUT_S = 600


def real_app_args() -> dict[str, Any]:
    return {
        "models": [
            {
                "id": REAL_MODEL,
                "source": "embedded:smollm2",
                "engine": {"max_model_len": 2048, "cpu_kv_cache_gib": 1, "max_num_seqs": 32},
                "lora_adapters": {"demo": "embedded:smollm2-demo-lora"},
                "openai": {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"},
            }
        ],
        "profiles": [{"name": "cpu", "num_cpus": 1}],
    }


def fake_app_args(token_delay_s: float = 0.0) -> dict[str, Any]:
    return {
        "engine_adapter": "tests.fakes.fake_engine:FakeAdapter",
        "models": [{"id": FAKE_MODEL, "engine": {"extra_args": {"token_delay_s": token_delay_s}}}],
        "profiles": [{"name": "cpu", "num_cpus": 0}],
        "worker_heartbeat_seconds": 0.5,
    }


@dataclass
class Stack:
    base_url: str

    def handle(self, deployment: str, app: str = "poolserve") -> Any:
        from ray import serve

        return serve.get_deployment_handle(deployment, app_name=app)

    def worker_status(self, app: str = "poolserve") -> Any:
        return self.handle("Generator-cpu", app).status.remote().result()

    def wait_idle(
        self, app: str = "poolserve", model: str = REAL_MODEL, timeout_s: float = 15
    ) -> bool:
        """True once the worker has no active request, no open KV handle, and its engine no
        unfinished request."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.worker_status(app)
            stats = status.model_state(model).stats
            if (
                status.active_requests == 0
                and stats.running_requests == 0
                and stats.kv_handles_open == 0
            ):
                return True
            time.sleep(0.2)
        return False


def _wait_ready(base_url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            report = httpx.get(f"{base_url}/health", timeout=5).json()
            if report["models"] and all(m["state"] == "loaded" for m in report["models"]):
                return
            failed = [m for m in report["models"] if m["state"] == "failed"]
            if failed:
                raise RuntimeError(f"a model failed to load at {base_url}: {failed}")
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(1)
    raise TimeoutError(f"the stack did not become healthy within {READY_TIMEOUT_S} s")


def wait_serving(base_url: str, model: str = REAL_MODEL) -> None:
    """Until `model` answers a one-token completion, honouring the Retry-After of a 503 as
    a client does (HAProxy's, scripts/haproxy-wrapper, in the second after an ingress replica
    dies). A stack starved of CPU for a while (Ray runs it at nice 15; a process
    beside it at nice 0 that loads a model or busy-polls takes both cores) hears its workers'
    heartbeats late and answers 503 PROVISIONING until the next one arrives."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    body = {"model": model, "prompt": "Hi", "max_tokens": 1}
    while True:
        try:
            response = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
        except httpx.TransportError:  # an ingress replica restarting (killed by a test)
            assert time.monotonic() < deadline, f"{base_url} does not answer"
            time.sleep(1)
            continue
        if response.status_code != 503 or time.monotonic() > deadline:
            assert response.status_code == 200, response.text
            return
        time.sleep(float(response.headers.get("retry-after", 1)))


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    from ray import serve

    from app.builder import build_app

    base_url = start_local_serve()
    serve.run(build_app(fake_app_args()), name="fake", route_prefix="/fake", blocking=False)
    serve.run(build_app(real_app_args()), name="poolserve", route_prefix="/", blocking=False)
    _wait_ready(base_url)
    _wait_ready(f"{base_url}/fake")
    try:
        yield Stack(base_url)
    finally:
        stop_local_serve()


@pytest.fixture(scope="session")
def teardowns() -> Iterator[Teardowns]:
    """Teardowns that only wait (a test's own Ray head stopping), run beside the next tests;
    their checks fail at the session's end (tests/support/teardowns.py)."""
    running = Teardowns()
    try:
        yield running
    finally:
        running.finish()
