"""`app.handles` against the session's Serve apps (real vLLM engine and the fake engine):
buffered and streamed generation as sageLLM types, routing arguments like the HTTP headers,
typed errors, and early close cancelling the engine request."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from app.errors import (
    InputTooLong,
    InvalidRequest,
    ModelNotFound,
    PoolNotFound,
    UnsupportedField,
)
from app.handles import Client, connect
from app.protocol.sagellm import StreamEvent, StreamEventDelta, StreamEventEnd, StreamEventStart
from tests.conftest import FAKE_MODEL, REAL_MODEL, Stack

pytestmark = pytest.mark.integration

APPS = [
    pytest.param(("fake", FAKE_MODEL), id="fake"),
    pytest.param(("poolserve", REAL_MODEL), id="vllm"),
]


@pytest.fixture(scope="module")
def clients(stack: Stack) -> Iterator[dict[str, Client]]:
    opened = {app: connect(app) for app in ("poolserve", "fake")}
    yield opened
    for client in opened.values():
        client.close()


def engine_running(stack: Stack, app: str, model: str) -> tuple[int, int]:
    status = stack.worker_status(app)
    stats = status.model_state(model).stats
    return stats.running_requests, status.active_requests


def wait_idle(stack: Stack, app: str, model: str, timeout_s: float = 10.0) -> tuple[int, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        running = engine_running(stack, app, model)
        if running == (0, 0) or time.monotonic() > deadline:
            return running
        time.sleep(0.2)


def check_event_sequence(events: list[StreamEvent]) -> StreamEventEnd:
    assert isinstance(events[0], StreamEventStart)
    end = events[-1]
    assert isinstance(end, StreamEventEnd)
    deltas = [event for event in events[1:-1] if isinstance(event, StreamEventDelta)]
    assert len(deltas) == len(events) - 2, [event.event for event in events]
    assert "".join(delta.content for delta in deltas) == end.content
    assert [t for delta in deltas for t in delta.content_tokens] == end.output_tokens
    assert len({event.request_id for event in events}) == 1
    assert end.metrics.ttft_ms > 0 and end.metrics.throughput_tps > 0
    return end


def test_connect_reads_the_apps_config(clients: dict[str, Client]) -> None:
    assert clients["poolserve"].models == [REAL_MODEL]
    assert clients["fake"].models == [FAKE_MODEL]
    assert [p.name for p in clients["poolserve"].config.profiles] == ["cpu"]


def test_chat_answers_with_the_real_model(clients: dict[str, Client]) -> None:
    response = clients["poolserve"].chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=24,
        trace_id="trace-1",
    )
    assert "Paris" in response.output_text
    assert response.trace_id == "trace-1"
    assert response.finish_reason in ("stop", "length") and response.error is None
    assert response.prompt_tokens and response.prompt_tokens > 5
    assert len(response.output_tokens) > 0
    assert response.metrics.ttft_ms > 0 and response.metrics.throughput_tps > 0


@pytest.mark.parametrize("target", APPS)
def test_generate_is_buffered_with_usage(
    clients: dict[str, Client], target: tuple[str, str]
) -> None:
    app, model = target
    response = clients[app].generate(
        "The quick brown fox", max_new_tokens=6, temperature=0, model=model, profile="cpu"
    )
    assert response.output_text.strip()
    assert response.finish_reason in ("stop", "length")
    assert 0 < len(response.output_tokens) <= 6
    if app == "fake":
        assert response.output_text == "alpha beta gamma delta epsilon zeta "
        assert response.prompt_tokens == 4


@pytest.mark.parametrize("target", APPS)
def test_sync_stream_yields_start_deltas_end(
    clients: dict[str, Client], target: tuple[str, str]
) -> None:
    app, _ = target
    events = list(clients[app].stream(prompt="Once upon a time", max_new_tokens=12, temperature=0))
    end = check_event_sequence(events)
    assert len(end.output_tokens) <= 12 and end.content.strip()


@pytest.mark.parametrize("target", APPS)
async def test_async_stream_yields_start_deltas_end(
    clients: dict[str, Client], target: tuple[str, str]
) -> None:
    app, _ = target
    events = [
        event
        async for event in clients[app].astream(
            messages=[{"role": "user", "content": "Say hello."}], max_tokens=10, temperature=0
        )
    ]
    end = check_event_sequence(events)
    assert end.finish_reason in ("stop", "length")


def test_buffered_and_streamed_text_agree(clients: dict[str, Client]) -> None:
    client = clients["poolserve"]
    buffered = client.generate("The capital of Italy is", max_new_tokens=8, temperature=0)
    streamed = list(
        client.stream(prompt="The capital of Italy is", max_new_tokens=8, temperature=0)
    )
    assert isinstance(streamed[-1], StreamEventEnd)
    assert streamed[-1].content == buffered.output_text


def test_closing_the_sync_stream_cancels_the_engine_request(
    stack: Stack, clients: dict[str, Client]
) -> None:
    """400 tokens take ~25 s here; after close the engine must be idle within seconds."""
    events = clients["poolserve"].stream(prompt="Tell me a story", max_new_tokens=400)
    assert isinstance(next(events), StreamEventStart)
    assert isinstance(next(events), StreamEventDelta)
    assert engine_running(stack, "poolserve", REAL_MODEL)[0] == 1
    with contextlib.closing(events):
        pass
    assert wait_idle(stack, "poolserve", REAL_MODEL) == (0, 0)


async def test_closing_the_async_stream_cancels_the_engine_request(
    stack: Stack, clients: dict[str, Client]
) -> None:
    events = clients["poolserve"].astream(
        messages=[{"role": "user", "content": "Write a long story."}], max_tokens=400
    )
    assert isinstance(events, AsyncIterator)
    seen = [await anext(events), await anext(events)]
    assert [event.event for event in seen] == ["start", "delta"]
    await events.aclose()  # type: ignore[attr-defined]
    assert await asyncio.to_thread(wait_idle, stack, "poolserve", REAL_MODEL) == (0, 0)


def test_errors_are_typed(clients: dict[str, Client]) -> None:
    client = clients["fake"]
    with pytest.raises(ModelNotFound):
        client.generate("x", max_new_tokens=2, model="nope/model")
    with pytest.raises(InvalidRequest) as unknown_profile:
        client.generate("x", max_new_tokens=2, profile="h100")
    assert unknown_profile.value.param == "X-SIE-MACHINE-PROFILE"
    with pytest.raises(PoolNotFound):
        client.generate("x", max_new_tokens=2, pool="team-a")
    with pytest.raises(UnsupportedField) as unknown_field:  # vLLM's request model decides
        clients["poolserve"].chat([{"role": "user", "content": "x"}], max_tokenz=3)
    assert unknown_field.value.param == "max_tokenz"
    with pytest.raises(InvalidRequest) as bad_value:
        client.generate("x", max_new_tokens=0)
    assert bad_value.value.param == "max_new_tokens"
    with pytest.raises(InvalidRequest):
        client.stream(max_new_tokens=2)  # neither prompt nor messages


def test_engine_refusals_cross_ray_as_typed_errors(clients: dict[str, Client]) -> None:
    with pytest.raises(InputTooLong):
        clients["poolserve"].generate("x", max_new_tokens=1_000_000)
