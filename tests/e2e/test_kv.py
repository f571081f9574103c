"""The KV ledger on a live worker: a streaming request holds a handle sized for its whole
budget, /health shows it, it covers what vLLM itself uses, and it is freed when the client
goes away."""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

import httpx
import pytest

from app.protocol.generation import GenerationRequest, SamplingOptions
from tests.conftest import REAL_MODEL, Stack
from tests.support.worker_calls import WorkerStream

pytestmark = pytest.mark.e2e
MAX_NEW = 600


def worker_entry(stack: Stack) -> dict[str, Any]:
    health = httpx.get(stack.base_url + "/health", timeout=10).json()
    (worker,) = [w for w in health["workers"] if REAL_MODEL in w["loaded_models"]]
    return worker


def wait_for(stack: Stack, predicate: Any, timeout_s: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entry = worker_entry(stack)
        if predicate(entry):
            return entry
        time.sleep(0.3)
    raise AssertionError(f"/health never satisfied the condition: {worker_entry(stack)}")


def test_ledger_holds_the_whole_budget_and_covers_the_engine(stack: Stack) -> None:
    idle = wait_for(stack, lambda w: w["kv_handles_open"] == 0)
    assert idle["kv_blocks_total"] > 0 and idle["kv_blocks_used"] == 0
    prompt = "Tell me a story about a dragon."
    request = GenerationRequest(
        request_id=uuid.uuid4().hex,
        model=REAL_MODEL,
        prompt=prompt,
        sampling=SamplingOptions(max_new_tokens=MAX_NEW, temperature=0.0, ignore_eos=True),
    )
    response = WorkerStream(stack.handle("Generator-cpu"), request)
    try:
        assert next(iter(response))
        busy = wait_for(stack, lambda w: w["kv_handles_open"] == 1 and w["kv_engine_usage"] > 0)
        block = stack.worker_status().model_state(REAL_MODEL).stats.kv_block_size_tokens
        prompt_tokens = httpx.post(
            stack.base_url + "/tokenize", json={"model": REAL_MODEL, "prompt": prompt}, timeout=10
        ).json()["count"]
        # one handle, no shared prefix: the prompt and the whole budget, in the engine's blocks
        assert busy["kv_blocks_used"] == math.ceil((prompt_tokens + MAX_NEW) / block)
        engine_blocks = busy["kv_engine_usage"] * busy["kv_blocks_total"]
        assert busy["kv_blocks_used"] >= engine_blocks, (
            "the ledger must never under-count the engine"
        )
    finally:
        response.cancel()
    freed = wait_for(stack, lambda w: w["kv_handles_open"] == 0)
    assert freed["kv_blocks_used"] == 0 and freed["kv_waiting"] == 0
