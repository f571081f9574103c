"""KV- and prefix-aware routing across two real vLLM workers (a third Serve app, `affinity`, in
the session cluster): follow-up turns find their prefix cached, a worker without KV headroom
is passed over, and 200 random cancellations and disconnects leave no handle and no block.
This app streams with `streaming.transport: object_refs` (one Ray object per batch).

The ingress chooses the worker (`ServeBackend._choose`); the Generators' request router only
sends a call where it is told. So requests go through the ingress's own ServeBackend, built in
this process by `app.handles.connect` (same snapshot, choice, prefix index and grouped calls):
its decisions count in this process's `metrics.REGISTRY`. The HTTP test reads the ingress's
own counts on its /metrics."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncGenerator, Iterator
from typing import Any, cast

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import metrics
from app.api.streaming import ChunkStream
from app.handles import Client, connect
from app.protocol.generation import GenerationChunk, GenerationRequest, SamplingOptions
from app.routing.affinity import affinity_keys, estimated_blocks, rendezvous_home
from tests.conftest import REAL_MODEL, Stack
from tests.support.local_serve import delete_app_in_background
from tests.support.sse import adata
from tests.support.worker_calls import worker_items

pytestmark = pytest.mark.integration
APP = "affinity"
WORDS = (
    "river mountain lantern orchard copper meadow harbor violet thunder quartz willow ember "
    "falcon glacier saffron canyon marble juniper tundra cobalt prairie beacon sierra"
).split()


def app_args() -> dict[str, Any]:
    return {
        "models": [
            {
                "id": REAL_MODEL,
                "source": "embedded:smollm2",
                "engine": {"max_model_len": 2048, "cpu_kv_cache_gib": 0.25, "max_num_seqs": 16},
            }
        ],
        "profiles": [{"name": "cpu", "num_cpus": 0, "num_replicas": 2}],
        "worker_heartbeat_seconds": 0.5,
        # the session's other apps stream over gRPC (the default): keep the Ray-object path
        # (cancels, disconnects, refusals in-band) under test here
        "streaming": {"transport": "object_refs"},
    }


@pytest.fixture(scope="module")
def two_workers(stack: Stack) -> Iterator[str]:
    from ray import serve

    from app.builder import build_app

    serve.run(build_app(app_args()), name=APP, route_prefix=f"/{APP}", blocking=False)
    base = f"{stack.base_url}/{APP}"
    try:
        deadline = time.monotonic() + 600
        while len(ready_workers(base)) < 2:
            failed = [w for w in health(base)["workers"] if w["state"] == "failed"]
            assert not failed, f"a worker failed to load: {failed}"
            assert time.monotonic() < deadline, "two workers never became ready"
            time.sleep(1)
        yield base
    finally:
        delete_app_in_background(APP)


@pytest.fixture(scope="module")
def ingress(two_workers: str) -> Iterator[Client]:
    """The app's ingress routing in this process (`app.handles.connect`)."""
    client = connect(APP)
    try:
        yield client
    finally:
        client.close()


def health(base: str) -> dict[str, Any]:
    try:
        body: dict[str, Any] = httpx.get(f"{base}/health", timeout=10).json()
    except (httpx.HTTPError, ValueError):  # the app is still deploying
        return {"workers": []}
    return body


def ready_workers(base: str) -> dict[str, dict[str, Any]]:
    return {w["name"]: w for w in health(base)["workers"] if w["state"] == "ready"}


def wait_until(base: str, predicate: Any, timeout_s: float = 30) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        workers = ready_workers(base)
        if predicate(workers):
            return workers
        if time.monotonic() > deadline:
            raise AssertionError(f"workers never satisfied the condition: {workers}")
        time.sleep(0.25)


def idle(workers: dict[str, dict[str, Any]]) -> bool:
    return len(workers) == 2 and all(
        w["kv_handles_open"] == 0
        and w["kv_blocks_used"] == 0
        and w["kv_waiting"] == 0
        and w["queue_depth"] == 0
        and w["kv_engine_usage"] == 0
        for w in workers.values()
    )


def decisions(reason: str) -> float:
    """Routing decisions of the ServeBackend in this process (`ingress`)."""
    value = metrics.REGISTRY.get_sample_value(
        "poolserve_routing_decisions_total", {"reason": reason}
    )
    return value or 0.0


def ingress_decisions(base: str) -> float:
    """Routing decisions the app's ingress made for HTTP requests (its /metrics)."""
    text = httpx.get(f"{base}/metrics", timeout=30).raise_for_status().text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "poolserve_routing_decisions"
        for sample in family.samples
        if sample.name == "poolserve_routing_decisions_total"
    )


def document(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def chat_turn(role: str, content: str) -> str:
    """One conversation turn as prompt text (the Generator's own route takes a prompt)."""
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def generation(
    messages: tuple[str, ...], max_new_tokens: int = 4, n: int = 1, **fields: Any
) -> GenerationRequest:
    greedy = n == 1  # vLLM refuses n > 1 with greedy sampling
    sampling = SamplingOptions(
        max_new_tokens=max_new_tokens, n=n, temperature=0.0 if greedy else 1.0, ignore_eos=True
    )
    return GenerationRequest(
        request_id=uuid.uuid4().hex,
        model=REAL_MODEL,
        prompt="".join(messages),
        sampling=sampling,
        **fields,
    )


def open_stream(ingress: Client, request: GenerationRequest) -> ChunkStream:
    """`request` routed and started by the ingress; its first batch received."""
    return ingress._loop.run(ChunkStream.open(ingress._backend, request))


def close(ingress: Client, stream: ChunkStream) -> None:
    """Leave the stream: the ingress cancels the request on its worker."""

    async def leave() -> None:
        await cast(AsyncGenerator[Any, None], stream.rest).aclose()

    ingress._loop.run(leave())


def run(ingress: Client, request: GenerationRequest) -> GenerationChunk:
    stream = open_stream(ingress, request)
    chunks = ingress._loop.run(stream.collect())
    assert chunks[-1].done and chunks[-1].error_code is None, chunks[-1]
    return chunks[-1]


def test_follow_up_turns_land_where_their_prefix_is_cached(ingress: Client) -> None:
    rng = random.Random(7)
    sessions = [document(rng, 260) for _ in range(6)]  # ~2,000 chars, > 3 KV blocks each
    prefix_before, home_before = decisions("prefix"), decisions("home")
    misses = []
    for turn in range(3):
        for number, doc in enumerate(sessions):
            messages = (
                chat_turn("system", f"Session {number}. Answer from this document:\n{doc}"),
                chat_turn("user", f"Question {turn}: which word comes first?"),
            )
            terminal = run(ingress, generation(messages))
            if turn and (terminal.cached_tokens or 0) < 256:
                misses.append((number, turn, terminal.cached_tokens, terminal.prompt_tokens))
    assert not misses, f"follow-ups that missed their cached prefix: {misses}"
    assert decisions("home") - home_before == len(sessions)
    assert decisions("prefix") - prefix_before == 2 * len(sessions)


def test_a_worker_without_kv_headroom_is_passed_over(two_workers: str, ingress: Client) -> None:
    workers = wait_until(two_workers, idle)
    ids = sorted(workers)
    busy, spare = ids[0], ids[1]
    total = workers[busy]["kv_blocks_total"]

    def keyed_home_on(worker: str, tag: str) -> str:
        for attempt in range(1000):
            key = f"{tag}-{attempt}"
            probe = generation((chat_turn("user", "hi"),), prompt_cache_key=key)
            if rendezvous_home(affinity_keys(probe)[0], ids) == worker:
                return key
        raise AssertionError("no key found")

    # hold most of `busy`'s blocks with one long request (budgets are reserved up front)
    per_candidate = 1900 // 128 + 1
    hog = generation(
        (chat_turn("user", "Count slowly."),),
        max_new_tokens=1900,
        n=max(1, (total - 8) // per_candidate),
        prompt_cache_key=keyed_home_on(busy, "hog"),
    )
    home_before = decisions("home")
    hogging = open_stream(ingress, hog)
    try:
        assert hogging.first
        assert decisions("home") - home_before == 1
        # the hog's own reservation: /health may still show a heartbeat from the previous
        # test's last request (one handle, a few blocks) for a second or so
        hog_blocks = per_candidate * hog.sampling.n
        workers = wait_until(
            two_workers,
            lambda w: w[busy]["kv_handles_open"] == 1 and w[busy]["kv_blocks_used"] >= hog_blocks,
        )
        free = total - workers[busy]["kv_blocks_used"]
        # the ingress looks at the registry again now (the heartbeat /health just showed):
        # a request only waits for a snapshot older than 5 s, and this one may be 1 s old
        ingress._loop.run(ingress._backend.workers(max_age_s=0.0))
        # a request the router estimates at more blocks than `busy` has free (but that fits
        # on the idle `spare`), whose affinity home is `busy`
        key = keyed_home_on(busy, "probe")
        for n in range(1, 8):
            probe = generation((chat_turn("user", "Say hello."),), 1880, n, prompt_cache_key=key)
            if estimated_blocks(probe, 128) > free:
                break
        assert free < estimated_blocks(probe, 128) <= total
        headroom_before = decisions("headroom")
        probing = open_stream(ingress, probe)
        try:
            assert probing.first
            assert decisions("headroom") - headroom_before == 1
            workers = wait_until(two_workers, lambda w: w[spare]["kv_handles_open"] == 1)
            assert workers[busy]["kv_handles_open"] == 1 and workers[busy]["kv_waiting"] == 0
        finally:
            close(ingress, probing)
    finally:
        close(ingress, hogging)
    wait_until(two_workers, idle)


def test_200_random_cancels_and_disconnects_leave_nothing(
    stack: Stack, two_workers: str, ingress: Client
) -> None:
    rng = random.Random(11)
    shared = [document(rng, 150) for _ in range(4)]
    outcomes: dict[str, int] = {}
    answered: list[int] = []  # requests whose response (status line) came back

    routed_before = ingress_decisions(two_workers)

    async def one(client: httpx.AsyncClient, gate: asyncio.Semaphore, number: int) -> None:
        local = random.Random(number)
        system = local.choice(shared) if local.random() < 0.7 else document(local, 40)
        body = {
            "model": REAL_MODEL,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Request {number}: continue the list."},
            ],
            "max_tokens": local.randint(8, 64),
            "stream": local.random() < 0.8,
        }
        mode = local.choice(["before_first_byte", "mid_stream", "mid_stream", "complete"])
        async with gate:
            try:
                if mode == "before_first_byte":
                    await client.post(
                        "/v1/chat/completions", json=body, timeout=local.uniform(0.01, 0.3)
                    )
                    answered.append(number)
                elif not body["stream"]:
                    await client.post(
                        "/v1/chat/completions",
                        json=body,
                        timeout=60 if mode == "complete" else local.uniform(0.05, 1.0),
                    )
                    answered.append(number)
                else:
                    stop_after = local.randint(1, 6) if mode == "mid_stream" else 10**6
                    async with client.stream(
                        "POST", "/v1/chat/completions", json=body, timeout=60
                    ) as response:
                        answered.append(number)
                        if response.status_code != 200:  # a refusal: a JSON body, no events
                            await response.aread()
                        else:
                            seen = 0
                            async for _ in adata(response):
                                seen += 1
                                if seen >= stop_after:
                                    break
                outcomes[mode] = outcomes.get(mode, 0) + 1
            except httpx.TimeoutException:
                outcomes["timed_out"] = outcomes.get("timed_out", 0) + 1

    async def main() -> None:
        gate = asyncio.Semaphore(24)
        async with httpx.AsyncClient(base_url=two_workers) as client:
            await asyncio.gather(*(one(client, gate, number) for number in range(200)))

    asyncio.run(main())
    assert sum(outcomes.values()) == 200
    assert outcomes.get("timed_out", 0) > 10 and outcomes.get("mid_stream", 0) > 40
    # the ingress chose a worker for each request that was answered (at least), once each
    routed = ingress_decisions(two_workers) - routed_before
    assert len(answered) <= routed <= 200, (len(answered), routed)
    workers = wait_until(two_workers, idle, timeout_s=60)
    assert all(w["kv_blocks_total"] > 0 for w in workers.values())
    # and both workers still serve, called directly and through the ingress's routing
    handle = stack.handle("Generator-cpu", APP)
    for worker in workers:
        items = worker_items(handle, generation((chat_turn("user", "hi"),)), worker=worker)
        chunks = [chunk for batch in items for chunk in batch]
        assert chunks and chunks[-1].done and chunks[-1].error_code is None, (worker, items)
    for prompt_cache_key in ("after-1", "after-2", "after-3"):
        run(ingress, generation((chat_turn("user", "hi"),), prompt_cache_key=prompt_cache_key))
