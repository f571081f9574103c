"""Fixtures of the e2e tier: bare vLLM on the stack's model, for the parity modules (one server
for the session, started only if a parity test runs, with the session stack)."""

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


@pytest.fixture(scope="session", autouse=True)
def vllm_starts_with_the_stack(request: pytest.FixtureRequest) -> None:
    """When the session runs a parity test, bare vLLM starts with the first e2e test, before
    the session stack (autouse fixtures come first), so the two load at once; otherwise the
    first parity module would wait for bare vLLM to load long after the stack is up. It idles
    in between (an idle vLLM engine does not poll)."""
    if any("vllm_url" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("vllm_process")


@pytest.fixture(scope="session")
def vllm_url(
    vllm_process: tuple[subprocess.Popen[bytes], str, Path], stack: Stack
) -> Iterator[str]:
    """Bare vLLM's URL once healthy. At the session's end it is told to stop first (set up
    after the stack, torn down before it), so it exits while the stack shuts down; then
    `vllm_process` waits for it and kills what is left."""
    process, url, log_path = vllm_process
    deadline = time.monotonic() + VLLM_READY_TIMEOUT_S
    while True:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            pytest.fail(f"bare vLLM exited with {process.returncode}:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"bare vLLM not healthy after {VLLM_READY_TIMEOUT_S} s")
        time.sleep(1)
    yield url
    with_group(process, signal.SIGTERM)
