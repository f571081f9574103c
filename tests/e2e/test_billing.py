"""Billing from the engine, on the real model: a client that hangs up mid-stream is billed what
the engine generated for it, and after a mixed load (every route, streamed and buffered, n > 1,
best_of, cancels at random points, bad requests) the billed prompt and completion tokens equal
vLLM's own counters (`engine_prompt_tokens`, `engine_generation_tokens` in /health).

One deliberate difference: for `n` > 1 and `best_of` vLLM runs each candidate as a child
request and counts the prompt once per candidate (all but the first served from its prefix
cache); the usage block and the bill count it once, as OpenAI does. The load's fan-out requests
say their prompt tokens in their usage block, and the comparison adds the difference."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from typing import Any

import httpx
import pytest

from tests.conftest import REAL_MODEL, Stack, wait_serving
from tests.support.sse import data

pytestmark = pytest.mark.e2e
GENERATE = "/v1/generate/" + REAL_MODEL.replace("/", "__")
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"


def billed(stack: Stack) -> tuple[int, int, int]:
    total = httpx.get(f"{stack.base_url}/v1/usage", timeout=30).json()["total"]
    return total["requests"], total["prompt_tokens"], total["completion_tokens"]


def engine(stack: Stack) -> tuple[int, int]:
    (worker,) = httpx.get(f"{stack.base_url}/health", timeout=30).json()["workers"]
    return worker["engine_prompt_tokens"], worker["engine_generation_tokens"]


def quiet(stack: Stack) -> tuple[tuple[int, int, int], tuple[int, int]]:
    """Billed and engine counters once earlier tests' requests are settled: the engine idle,
    and neither changing over a heartbeat (a cancelled request is billed in the background;
    the engine's counters come with the worker's heartbeats)."""
    assert stack.wait_idle(), stack.worker_status()
    last = (billed(stack), engine(stack))
    for _ in range(20):
        time.sleep(2.5)
        now = (billed(stack), engine(stack))
        if now == last:
            break
        last = now
    return last


def settled(
    stack: Stack,
    before: tuple[int, int, int],
    engine_before: tuple[int, int],
    fan_out: int = 0,
    within_s: float = 20,
) -> Any:
    """The billed and the engine's deltas once the engine is idle and a heartbeat carried its
    counters (they agree, or the last pair seen after 20 s)."""
    assert stack.wait_idle(), stack.worker_status()
    deadline = time.monotonic() + within_s
    while True:
        now, counters = billed(stack), engine(stack)
        billed_delta = (now[1] - before[1], now[2] - before[2])
        engine_delta = (counters[0] - engine_before[0], counters[1] - engine_before[1])
        agree = (billed_delta[0] + fan_out, billed_delta[1]) == engine_delta
        if agree or time.monotonic() > deadline:
            return now[0] - before[0], billed_delta, engine_delta
        time.sleep(0.5)


def test_a_client_that_hangs_up_is_billed_what_the_engine_generated(stack: Stack) -> None:
    before, engine_before = quiet(stack)
    body = {
        "model": REAL_MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    events = 0
    with httpx.stream("POST", stack.base_url + CHAT, json=body, timeout=60) as response:
        assert response.status_code == 200
        for _ in data(response):
            events += 1
            if events == 21:  # the role event, then 20 tokens
                break
    requests, (prompt, completion), engine_delta = settled(stack, before, engine_before)
    assert requests == 1
    assert prompt > 0 and 20 <= completion < 400, (prompt, completion)
    assert (prompt, completion) == engine_delta


async def one(client: httpx.AsyncClient, rnd: random.Random, n: int, fan_out: bool = True) -> int:
    """One request of the mixed load: a route, streamed or not, maybe cancelled or bad. Returns
    the prompt tokens the engine counts beyond the bill (candidates after the first)."""
    prompt = f"Request {n}: say something about the number {n}."
    kinds = ["chat", "completion", "responses", "generate", "n", "best_of", "list"]
    kind = rnd.choice(kinds if fan_out else [k for k in kinds if k not in ("n", "best_of")])
    stream = kind in ("chat", "completion", "generate", "n") and rnd.random() < 0.6
    tokens = rnd.randint(4, 40)
    if kind == "generate":
        path, body = GENERATE, {"prompt": prompt, "max_new_tokens": tokens, "stream": stream}
    elif kind == "responses":
        path, body = RESPONSES, {"model": REAL_MODEL, "input": prompt, "max_output_tokens": tokens}
    elif kind in ("completion", "list"):
        path = COMPLETIONS
        body = {"model": REAL_MODEL, "prompt": prompt, "max_tokens": tokens, "stream": stream}
        if kind == "list":
            body["prompt"] = [prompt, prompt + " Again.", "Another one"]
    else:
        path = CHAT
        body = {
            "model": REAL_MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens,
            "stream": stream,
        }
        if kind == "n":
            body |= {"n": 2, "temperature": 0.8}
        if kind == "best_of":
            body |= {"n": 1, "best_of": 3, "temperature": 0.8}
    candidates = int(body.get("best_of") or body.get("n") or 1)
    if rnd.random() < 0.1:  # a bad request: refused before the engine, billed nothing
        body["max_tokens" if path != GENERATE else "max_new_tokens"] = -1
    fans_out = candidates > 1
    cancel_after = rnd.randint(1, 6) if stream and not fans_out and rnd.random() < 0.5 else None
    if not stream:
        reply = (await client.post(path, json=body)).json()
        return (
            (candidates - 1) * reply["usage"]["prompt_tokens"]
            if fans_out and "usage" in reply
            else 0
        )
    if fans_out:
        body["stream_options"] = {"include_usage": True}
    prompt_tokens = 0
    async with client.stream("POST", path, json=body) as response:
        seen = 0
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                seen += 1
                if cancel_after is not None and seen >= cancel_after:
                    return 0  # hang up mid-stream
                if '"usage": {' in line or '"usage":{' in line:
                    prompt_tokens = json.loads(line[5:])["usage"]["prompt_tokens"]
    return (candidates - 1) * prompt_tokens


def test_billed_tokens_equal_the_engines_counters_after_a_mixed_load(stack: Stack) -> None:
    before, engine_before = quiet(stack)
    rnd = random.Random(7)

    async def load() -> int:
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=120) as client:
            tasks = []
            running: set[asyncio.Task[int]] = set()
            for n in range(48):
                task = asyncio.create_task(one(client, rnd, n))
                tasks.append(task)
                running.add(task)
                if len(running) >= 6:
                    _, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            return sum(await asyncio.gather(*tasks))

    fan_out = asyncio.run(load())
    requests, (prompt, completion), engine_delta = settled(stack, before, engine_before, fan_out)
    assert requests > 30
    assert (prompt + fan_out, completion) == engine_delta, (prompt, fan_out, engine_delta)


def replica_pid(deployment: str) -> int:
    """The pid of the deployment's running replica, as Serve's controller reports it."""
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    assert client is not None
    details = ray.get(
        client._controller.get_deployment_details.remote("poolserve", deployment), timeout=10
    )
    (replica,) = [r for r in details.replicas if r.state == "RUNNING"]
    return int(replica.pid)


def test_billing_equals_the_engines_counters_with_the_ledger_killed_mid_load(
    stack: Stack,
) -> None:
    """The mixed load again (without the n / best_of fan-out, whose prompts only a reply can
    tell), with the TenantLedger's replica SIGKILLed mid-load. The reports the dead ledger did
    not acknowledge are sent again to its replacement, which counts each request id once."""
    killed_mid_load(stack, "TenantLedger", random.Random(11))


def test_billing_equals_the_engines_counters_with_an_ingress_killed_mid_load(
    stack: Stack,
) -> None:
    """The same with the ingress replica SIGKILLed: the requests in flight lose their caller,
    and the worker cancels them. A buffered reply cut mid-way had read nothing from vLLM
    (FINAL_ONLY: one output at the end) though vLLM had counted its prompt and tokens; it is
    billed with the abort's final output, as is a streamed one's output left unread in its
    collector, and a completion list's prompts, whose aborts end in tasks of vLLM's own."""
    killed_mid_load(stack, "Ingress", random.Random(13))


def killed_mid_load(stack: Stack, victim: str, rnd: random.Random) -> None:
    before, engine_before = quiet(stack)
    kills: list[str] = []
    failed = 0

    async def guarded(client: httpx.AsyncClient, n: int) -> None:
        nonlocal failed
        try:
            await one(client, rnd, n, fan_out=False)
        except (httpx.HTTPError, json.JSONDecodeError, KeyError):
            failed += 1  # cut by the dead ingress, or refused while it restarts

    async def load() -> None:
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=120) as client:
            running: set[asyncio.Task[None]] = set()
            for n in range(48):
                if n == 20:
                    os.kill(replica_pid(victim), signal.SIGKILL)
                    kills.append(victim)
                    if victim == "Ingress":  # the rest of the load once its replacement serves
                        await asyncio.to_thread(wait_serving, stack.base_url)
                running.add(asyncio.create_task(guarded(client, n)))
                if len(running) >= 6:
                    _, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.gather(*running)

    asyncio.run(load())
    assert kills == [victim]
    wait_serving(stack.base_url)
    # reports the dead ledger never acknowledged are retried with backoff (0.5 s doubling to
    # 15 s): its replacement gets them within about a minute of the kill
    started = time.monotonic()
    requests, (prompt, completion), engine_delta = settled(
        stack, before, engine_before, within_s=120
    )
    print(
        f"\n[billing] {victim} killed; settled after {time.monotonic() - started:.1f} s: "
        f"{requests} requests billed, {failed} cut by the kill; billed {(prompt, completion)}, "
        f"engine {engine_delta}"
    )
    assert requests > 30
    assert (prompt, completion) == engine_delta, (prompt, completion, engine_delta)
