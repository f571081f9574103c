"""Chunk batches -> sageLLM stream events and buffered responses (app/protocol/events.py)."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter

from app.protocol.events import StreamEventBuilder, response_of
from app.protocol.generation import GenerationChunk
from app.protocol.sagellm import (
    ErrorCode,
    StreamEvent,
    StreamEventDelta,
    StreamEventEnd,
    StreamEventStart,
)

T0 = 1_000.0


def builder() -> StreamEventBuilder:
    return StreamEventBuilder(request_id="r1", trace_id="t1", engine_id="e", started_at=T0)


def terminal(finish: str = "length", **fields: object) -> GenerationChunk:
    values: dict[str, object] = {
        "prompt_tokens": 5,
        "completion_tokens": 3,
        "ttft_ms": 40.0,
        "tpot_ms": 12.5,
    }
    values.update(fields)
    return GenerationChunk(text_delta="", done=True, finish_reason=finish, **values)  # type: ignore[arg-type]


def test_start_delta_per_batch_then_end_with_metrics() -> None:
    events = builder()
    first = events.feed([GenerationChunk("Hel", is_first=True, token_ids=(1,))], T0 + 0.05)
    second = events.feed(
        [GenerationChunk("lo", token_ids=(2,)), GenerationChunk("!", token_ids=(3,))], T0 + 0.1
    )
    last = events.feed([terminal(cached_tokens=4)], T0 + 0.5)

    assert [type(e) for e in first] == [StreamEventStart, StreamEventDelta]
    assert isinstance(first[1], StreamEventDelta) and first[1].content == "Hel"
    assert len(second) == 1 and isinstance(second[0], StreamEventDelta)
    assert second[0].content == "lo!" and second[0].content_tokens == [2, 3]
    assert len(last) == 1 and isinstance(last[0], StreamEventEnd)
    end = last[0]
    assert end.content == "Hello!" and end.output_tokens == [1, 2, 3]
    assert end.finish_reason == "length" and end.prompt_tokens == 5 and end.error is None
    assert end.metrics.ttft_ms == 40.0 and end.metrics.tpot_ms == 12.5
    assert end.metrics.throughput_tps == pytest.approx(3 / 0.5)
    assert end.metrics.prefix_hit_rate == pytest.approx(4 / 5)
    assert end.metrics.error_rate == 0.0
    assert end.metrics.timestamps is not None
    assert end.metrics.timestamps.executed_at == T0 + 0.05
    assert end.metrics.timestamps.completed_at == T0 + 0.5
    assert all(e.request_id == "r1" and e.trace_id == "t1" for e in first + second + last)


def test_single_batch_with_text_and_terminal_and_nothing_after_end() -> None:
    events = builder()
    out = events.feed(
        [GenerationChunk("Paris", is_first=True, token_ids=(7,)), terminal("stop"), terminal()],
        T0 + 1,
    )
    assert [e.event for e in out] == ["start", "delta", "end"]
    assert isinstance(out[2], StreamEventEnd) and out[2].finish_reason == "stop"
    assert events.feed([GenerationChunk("late")], T0 + 2) == []


def test_tool_calls_finish_maps_to_stop_and_ttft_falls_back_to_first_batch() -> None:
    events = builder()
    out = events.feed([terminal("tool_calls", ttft_ms=None, tpot_ms=None)], T0 + 0.2)
    end = out[-1]
    assert isinstance(end, StreamEventEnd)
    assert end.finish_reason == "stop"
    assert end.metrics.ttft_ms == pytest.approx(200.0)
    assert end.metrics.tpot_ms == 0.0


@pytest.mark.parametrize(
    ("finish", "code", "expected", "retryable"),
    [
        ("error", "INPUT_TOO_LONG", ErrorCode.INVALID_ARGUMENT, False),
        ("error", "QUEUE_FULL", ErrorCode.RESOURCE_EXHAUSTED, True),
        ("error", "inference_error", ErrorCode.UNAVAILABLE, True),
        ("cancelled", None, ErrorCode.UNAVAILABLE, True),
    ],
)
def test_failed_generations_end_with_an_error(
    finish: str, code: str | None, expected: ErrorCode, retryable: bool
) -> None:
    out = builder().feed(
        [terminal(finish, error_code=code, error_message="boom" if code else None)], T0 + 1
    )
    end = out[-1]
    assert isinstance(end, StreamEventEnd)
    assert end.finish_reason == "error"
    assert end.error is not None and end.error.code == expected
    assert end.error.retryable is retryable
    assert end.metrics.error_rate == 1.0


def test_events_round_trip_through_the_discriminated_union() -> None:
    events = builder()
    out = events.feed([GenerationChunk("a", token_ids=(1,)), terminal()], T0 + 1)
    adapter: TypeAdapter[StreamEvent] = TypeAdapter(StreamEvent)
    for event in out:
        assert adapter.validate_python(event.model_dump()) == event


def test_response_of_mirrors_the_end_event() -> None:
    events = builder()
    out = events.feed([GenerationChunk("ok", token_ids=(1, 2)), terminal()], T0 + 1)
    end = out[-1]
    assert isinstance(end, StreamEventEnd)
    response = response_of(end)
    assert response.output_text == "ok" and response.output_tokens == [1, 2]
    assert response.finish_reason == "length" and response.metrics == end.metrics
    assert response.request_id == "r1" and response.trace_id == "t1"
