"""Choosing the worker group for a request from the registry snapshot (pure)."""

from __future__ import annotations

import pytest

from app import errors
from app.api.openai_routes import prompt_chars
from app.config import AppConfig
from app.protocol.generation import GenerationRequest, OpenAICall, OpenAIRoute, SamplingOptions
from app.protocol.workers import EngineStats, ModelStatus, WorkerStatus
from app.routing.targets import carry_over, choose_target

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


def sized_worker(worker_id: str, max_chars_per_token: int) -> WorkerStatus:
    stats = EngineStats("org/m", 100, 16, 0.0, 0, 64, max_chars_per_token=max_chars_per_token)
    return WorkerStatus(
        worker_id=worker_id,
        deployment="Generator-cpu",
        profile="cpu",
        node_id="n",
        pool="default",
        models=(ModelStatus("org/m", "loaded", stats=stats),),
        active_requests=0,
        reported_at=NOW,
    )


def openai_call(route: OpenAIRoute, body: dict[str, object]) -> GenerationRequest:
    return GenerationRequest(
        "r",
        "org/m",
        SamplingOptions(),
        openai=OpenAICall(route, body),
        prompt_chars=prompt_chars(route, body),
    )


def test_a_prompt_no_context_could_hold_is_refused_before_tokenizing() -> None:
    """64 tokens x at most 10 characters each: 640 characters fit at most."""
    workers = [sized_worker("a", 10)]
    fits = GenerationRequest("r", "org/m", SamplingOptions(), prompt="x" * 640)
    assert choose_target(CONFIG, workers, fits, NOW).ready_workers == ("a",)
    for oversized in (
        GenerationRequest("r", "org/m", SamplingOptions(), prompt="x" * 641),
        openai_call("chat", {"messages": [{"role": "user", "content": "x" * 641}]}),
        openai_call(
            "chat",
            {
                "messages": [
                    {"role": "system", "content": "x" * 400},
                    {"role": "user", "content": [{"type": "text", "text": "y" * 241}]},
                ]
            },
        ),
        openai_call("completion", {"prompt": ["short", "x" * 641]}),
        openai_call("responses", {"input": "x" * 641}),
        openai_call("responses", {"input": [{"role": "user", "content": "x" * 641}]}),
        openai_call("tokenize", {"prompt": "x" * 641}),
    ):
        with pytest.raises(errors.InputTooLong) as refusal:
            choose_target(CONFIG, workers, oversized, NOW)
        assert "64 tokens" in refusal.value.message


def test_no_size_refusal_without_a_known_bound_or_when_vllm_truncates() -> None:
    unknown = [sized_worker("a", 0)]
    huge = GenerationRequest("r", "org/m", SamplingOptions(), prompt="x" * 100_000)
    assert choose_target(CONFIG, unknown, huge, NOW).ready_workers == ("a",)
    truncated = openai_call("completion", {"prompt": "x" * 100_000, "truncate_prompt_tokens": 8})
    assert choose_target(CONFIG, [sized_worker("a", 10)], truncated, NOW).ready_workers == ("a",)
    tokens = openai_call("completion", {"prompt": list(range(10_000))})
    assert choose_target(CONFIG, [sized_worker("a", 10)], tokens, NOW).ready_workers == ("a",)


def test_a_restarted_registry_does_not_empty_the_snapshot_until_workers_report_again() -> None:
    previous = [worker("a", "cpu", age_s=1.0), worker("b", "cpu", age_s=9.0)]
    assert [w.worker_id for w in carry_over(previous, [], NOW, keep_s=4.0)] == ["a"]
    fresh = worker("a", "cpu", "loading")
    merged = carry_over(previous, [fresh, worker("c", "l4")], NOW, keep_s=4.0)
    assert [w.worker_id for w in merged] == ["a", "c"]
    assert merged[0] is fresh  # the registry's own report wins
