"""Changing a running service under load loses nothing (issue 16): a redeploy of a changed config
while 8 closed-loop streaming clients (honouring Retry-After, as the sie-sdk does) run. Every
replica is replaced; the old ones finish their streams (Serve's graceful shutdown, bounded by
`drain_timeout_seconds`) while new requests go to the new ones. On the fake engine (above the
engine, the drain is Serve's and ours alone), in an app of its own. The same change on the real
engine, a pool deleted and a node drained are measured by `benchmarks/changes.py`."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from app.builder import build_app
from tests.conftest import FAKE_MODEL, Stack, _wait_ready, fake_app_args
from tests.support.closed_loop import ClosedLoop, LoopResult
from tests.support.local_serve import delete_app_in_background

pytestmark = pytest.mark.e2e

APP = "changes"
PREFIX = "/changes"


def changes_args(heartbeat_s: float, drain_timeout_s: float = 600.0) -> dict[str, Any]:
    args = fake_app_args(token_delay_s=0.05)  # 100 tokens: 5 s streams
    args["worker_heartbeat_seconds"] = heartbeat_s  # changes every replica's init args
    args["drain_timeout_seconds"] = drain_timeout_s
    return args


def deploy(args: dict[str, Any]) -> None:
    from ray import serve

    serve.run(build_app(args), name=APP, route_prefix=PREFIX, blocking=False)


async def redeploy_under_load(base_url: str, new_args: dict[str, Any]) -> tuple[LoopResult, float]:
    loop = ClosedLoop(base_url, FAKE_MODEL, clients=8, max_tokens=100)
    async with loop.running():
        await asyncio.sleep(2)  # every client mid-stream
        changed_at = time.monotonic()
        await asyncio.to_thread(deploy, new_args)  # returns once the new app is running
        await asyncio.sleep(6)  # requests keep coming while the old replicas drain
    return loop.result, changed_at


def test_a_redeploy_under_load_loses_no_request_and_cuts_no_stream(stack: Stack) -> None:
    base_url = stack.base_url + PREFIX
    deploy(changes_args(heartbeat_s=0.5))
    try:
        _wait_ready(base_url)
        old_worker = stack.worker_status(APP).worker_id
        result, changed_at = asyncio.run(
            redeploy_under_load(base_url, changes_args(heartbeat_s=0.6))
        )
        new_worker = stack.worker_status(APP).worker_id
    finally:
        delete_app_in_background(APP)
    assert new_worker != old_worker  # the change replaced the worker
    assert result.spanning(changed_at) == 8, result.row()  # every client was mid-stream
    assert (result.failed, result.cut) == (0, 0), result.row()
    assert result.completed >= 16, result.row()
