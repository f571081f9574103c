"""Fixtures of the e2e tier: bare vLLM on the stack's model, for the parity modules (one server
for the session, started only if a parity test runs)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.serve_env import free_port
from tests.conftest import Stack, real_app_args
from tests.support.vllm_server import BASE_ENV, vllm_command

VLLM_READY_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def vllm_process(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """Bare vLLM, started before the session stack (both load at once), killed with its
    process group (the API server and its engine core) at the end of the session: the
    OpenAI and the Anthropic parity modules share it."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("bare-vllm") / "vllm.log"
    env = {**os.environ, **BASE_ENV}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # the legacy GiB variable would override the flag
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            vllm_command(port, real_app_args()["models"][0]),  # the stack's model
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=log_path.parent,
            start_new_session=True,
        )
    try:
        yield process, f"http://127.0.0.1:{port}", log_path
    finally:
        with_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with_group(process, signal.SIGKILL)
            process.wait(timeout=30)
        time.sleep(1)
        with_group(process, signal.SIGKILL)  # the engine core, should it outlive the server


def with_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def vllm_url(vllm_process: tuple[subprocess.Popen[bytes], str, Path], stack: Stack) -> str:
    process, url, log_path = vllm_process
    deadline = time.monotonic() + VLLM_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            pytest.fail(f"bare vLLM exited with {process.returncode}:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"bare vLLM not healthy after {VLLM_READY_TIMEOUT_S} s")
