"""sageLLM v0.1 types and the generation chunk contract types."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from app.protocol.generation import GenerationChunk, GenerationResult
from app.protocol.sagellm import (
    ErrorCode,
    KVAllocateParams,
    KVHandle,
    Metrics,
    Request,
    Response,
    StreamEvent,
    StreamEventDelta,
)


def test_request_requires_positive_max_tokens() -> None:
    with pytest.raises(ValidationError):
        Request(request_id="r", trace_id="t", max_tokens=0)
    assert Request(request_id="r", trace_id="t", max_tokens=1, prompt="hi").prompt == "hi"


def test_request_temperature_is_capped_at_two() -> None:
    with pytest.raises(ValidationError):
        Request(request_id="r", trace_id="t", max_tokens=1, temperature=2.5)


def test_response_rejects_finish_reasons_outside_the_protocol() -> None:
    metrics = Metrics(ttft_ms=1, throughput_tps=1, peak_mem_mb=1, error_rate=0)
    with pytest.raises(ValidationError):
        Response(
            request_id="r",
            trace_id="t",
            output_text="",
            output_tokens=[],
            finish_reason="cancelled",
            metrics=metrics,
        )  # type: ignore[arg-type]


def test_stream_event_is_discriminated_by_event() -> None:
    adapter = TypeAdapter(StreamEvent)
    event = adapter.validate_json(
        '{"event":"delta","request_id":"r","trace_id":"t","engine_id":"e","content":"hi","content_tokens":[1]}'
    )
    assert isinstance(event, StreamEventDelta)
    with pytest.raises(ValidationError):
        adapter.validate_python(
            {"event": "nope", "request_id": "r", "trace_id": "t", "engine_id": "e"}
        )


def test_kv_types() -> None:
    params = KVAllocateParams(
        request_id="r", num_tokens=10, kv_dtype="fp16", layout="bshd", block_size=128
    )
    assert params.kv_dtype.value == "fp16"
    with pytest.raises(ValidationError):
        KVAllocateParams(
            request_id="r", num_tokens=0, kv_dtype="fp16", layout="bshd", block_size=128
        )
    assert KVHandle(handle_id="h", request_id="r", num_tokens=10, device="cpu").device == "cpu"


def test_error_code_has_the_23_protocol_values() -> None:
    assert len(ErrorCode) == 23
    assert ErrorCode("resource_exhausted") is ErrorCode.RESOURCE_EXHAUSTED


def test_result_collects_text_and_stops_at_the_terminal_chunk() -> None:
    result = GenerationResult.collect(
        [
            GenerationChunk("Hel", is_first=True),
            GenerationChunk("lo"),
            GenerationChunk(
                "!",
                done=True,
                finish_reason="length",
                prompt_tokens=3,
                completion_tokens=3,
                cached_tokens=0,
            ),
            GenerationChunk("ignored"),
        ]
    )
    assert (result.text, result.finish_reason, result.prompt_tokens, result.completion_tokens) == (
        "Hello!",
        "length",
        3,
        3,
    )
    assert not result.failed


def test_result_without_finish_reason_defaults_to_stop_and_errors_fail() -> None:
    assert GenerationResult.collect([GenerationChunk("", done=True)]).finish_reason == "stop"
    failed = GenerationResult.collect(
        [GenerationChunk("", done=True, finish_reason="stop", error_code="empty_model_output")]
    )
    assert failed.failed
