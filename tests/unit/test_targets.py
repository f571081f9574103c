"""Choosing the worker group for a request from the registry snapshot (pure)."""

from __future__ import annotations

import pytest

from app import errors
from app.config import AppConfig
from app.protocol.generation import GenerationRequest, SamplingOptions
from app.protocol.workers import ModelStatus, WorkerStatus
from app.routing.targets import choose_target

NOW = 1000.0
CONFIG = AppConfig.model_validate(
    {
        "models": [{"id": "org/m", "profiles": ["cpu", "l4"]}],
        "profiles": [{"name": "cpu"}, {"name": "l4", "num_gpus": 1}],
    }
)


def worker(worker_id: str, profile: str, state: str = "loaded", age_s: float = 0.0) -> WorkerStatus:
    return WorkerStatus(
        worker_id=worker_id,
        deployment=f"Generator-{profile}",
        profile=profile,
        node_id="n",
        pool="default",
        models=(ModelStatus("org/m", state),),  # type: ignore[arg-type]
        active_requests=0,
        reported_at=NOW - age_s,
    )


def request(profile: str | None = None, pool: str | None = None) -> GenerationRequest:
    return GenerationRequest(
        "r",
        "org/m",
        SamplingOptions(max_new_tokens=4),
        prompt="x",
        machine_profile=profile,
        pool=pool,
    )


def test_picks_a_profile_with_a_loaded_worker() -> None:
    target = choose_target(
        CONFIG, [worker("a", "cpu", "loading"), worker("b", "l4")], request(), NOW
    )
    assert (target.profile, target.deployment, target.ready_workers) == (
        "l4",
        "Generator-l4",
        ("b",),
    )


def test_profile_header_restricts_the_choice() -> None:
    with pytest.raises(errors.ModelLoading):
        choose_target(
            CONFIG, [worker("a", "cpu", "loading"), worker("b", "l4")], request("cpu"), NOW
        )


@pytest.mark.parametrize(
    ("workers", "expected"),
    [
        ([], errors.Provisioning),
        ([worker("a", "cpu", age_s=60)], errors.Provisioning),
        ([worker("a", "cpu", "loading")], errors.ModelLoading),
        ([worker("a", "cpu", "failed"), worker("b", "l4", "failed")], errors.ModelLoadFailed),
        ([worker("a", "cpu", "failed"), worker("b", "l4", "loading")], errors.ModelLoading),
    ],
)
def test_why_no_worker_can_serve(
    workers: list[WorkerStatus], expected: type[errors.ServiceError]
) -> None:
    with pytest.raises(expected):
        choose_target(CONFIG, workers, request(), NOW)


def test_unknown_pool_is_refused() -> None:
    with pytest.raises(errors.PoolNotFound):
        choose_target(CONFIG, [worker("a", "cpu")], request(pool="eval"), NOW)


def test_default_pool_is_accepted() -> None:
    assert (
        choose_target(CONFIG, [worker("a", "cpu")], request(pool="default"), NOW).profile == "cpu"
    )
