"""Internal chunk batches -> sageLLM v0.1 stream events (start, deltas, end with Metrics) and
buffered `Response`s, for the programmatic handles. Pure: the caller passes clock readings."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from app.protocol.generation import GenerationChunk, GenerationResult
from app.protocol.sagellm import (
    Error,
    ErrorCode,
    Metrics,
    Response,
    StreamEvent,
    StreamEventDelta,
    StreamEventEnd,
    StreamEventStart,
    Timestamps,
)

# Contract error codes (app/errors.py) -> the closest sageLLM code; anything else: UNAVAILABLE.
_ERROR_CODES = {
    "invalid_request": ErrorCode.INVALID_ARGUMENT,
    "unsupported_field": ErrorCode.INVALID_ARGUMENT,
    "input_too_long": ErrorCode.INVALID_ARGUMENT,
    "resource_exhausted": ErrorCode.RESOURCE_EXHAUSTED,
    "queue_full": ErrorCode.RESOURCE_EXHAUSTED,
    "rate_limit_exceeded": ErrorCode.RESOURCE_EXHAUSTED,
    "not_implemented": ErrorCode.NOT_IMPLEMENTED,
}
_RETRYABLE = {ErrorCode.RESOURCE_EXHAUSTED, ErrorCode.UNAVAILABLE}


def sagellm_error(result: GenerationResult) -> Error | None:
    """The sageLLM error of a failed or cancelled generation; None when it succeeded."""
    if result.finish_reason == "cancelled":
        return Error(code=ErrorCode.UNAVAILABLE, message="generation was cancelled", retryable=True)
    if not result.failed:
        return None
    code = _ERROR_CODES.get((result.error_code or "").lower(), ErrorCode.UNAVAILABLE)
    return Error(
        code=code,
        message=result.error_message or "internal error during generation",
        retryable=code in _RETRYABLE,
    )


def metrics_of(
    result: GenerationResult, *, started_at: float, first_batch_at: float, ended_at: float
) -> Metrics:
    """Metrics of one finished generation. Times are Unix seconds seen by the caller; TTFT and
    TPOT come from the worker when it measured them (they exclude the trip through Ray)."""
    elapsed_s = max(ended_at - started_at, 0.0)
    ttft_ms = result.ttft_ms if result.ttft_ms is not None else (first_batch_at - started_at) * 1000
    prefix_hit_rate = 0.0
    if result.cached_tokens and result.prompt_tokens:
        prefix_hit_rate = min(result.cached_tokens / result.prompt_tokens, 1.0)
    return Metrics(
        ttft_ms=max(ttft_ms, 0.0),
        tpot_ms=max(result.tpot_ms or 0.0, 0.0),
        throughput_tps=result.completion_tokens / elapsed_s if elapsed_s > 0 else 0.0,
        peak_mem_mb=0,
        error_rate=1.0 if sagellm_error(result) is not None else 0.0,
        prefix_hit_rate=prefix_hit_rate,
        timestamps=Timestamps(
            queued_at=started_at,
            scheduled_at=started_at,
            executed_at=first_batch_at,
            completed_at=ended_at,
        ),
    )


@dataclass(slots=True)
class StreamEventBuilder:
    """Feed the batches of one generation in order; get `start` with the first batch, one
    `delta` per batch that carries text, and `end` (full text, tokens, metrics) at the
    terminal chunk. Nothing is emitted after `end`."""

    request_id: str
    trace_id: str
    engine_id: str
    started_at: float
    result: GenerationResult = field(default_factory=GenerationResult)
    first_batch_at: float | None = None
    ended: bool = False

    def feed(self, batch: Iterable[GenerationChunk], now: float) -> list[StreamEvent]:
        if self.ended:
            return []
        events: list[StreamEvent] = []
        if self.first_batch_at is None:
            self.first_batch_at = now
            events.append(
                StreamEventStart(
                    request_id=self.request_id, trace_id=self.trace_id, engine_id=self.engine_id
                )
            )
        text, tokens = "", list[int]()
        for chunk in batch:
            if self.result.terminated:
                break
            self.result.add(chunk)
            text += chunk.text_delta
            tokens.extend(chunk.token_ids)
        if text or tokens:
            events.append(
                StreamEventDelta(
                    request_id=self.request_id,
                    trace_id=self.trace_id,
                    engine_id=self.engine_id,
                    content=text,
                    content_tokens=tokens,
                )
            )
        if self.result.terminated:
            self.ended = True
            events.append(self.end_event(now))
        return events

    def end_event(self, now: float) -> StreamEventEnd:
        result = self.result
        error = sagellm_error(result)
        return StreamEventEnd(
            request_id=self.request_id,
            trace_id=self.trace_id,
            engine_id=self.engine_id,
            prompt_tokens=result.prompt_tokens,
            content=result.text,
            output_tokens=list(result.token_ids),
            finish_reason="error" if error is not None else _finish_reason(result),
            metrics=metrics_of(
                result,
                started_at=self.started_at,
                first_batch_at=self.first_batch_at if self.first_batch_at is not None else now,
                ended_at=now,
            ),
            error=error,
        )


def _finish_reason(result: GenerationResult) -> Literal["stop", "length"]:
    return "length" if result.finish_reason == "length" else "stop"


def response_of(end: StreamEventEnd) -> Response:
    """The buffered sageLLM Response equivalent to a stream's `end` event."""
    return Response(
        request_id=end.request_id,
        trace_id=end.trace_id,
        output_text=end.content,
        output_tokens=end.output_tokens,
        prompt_tokens=end.prompt_tokens,
        finish_reason=end.finish_reason,
        metrics=end.metrics,
        error=end.error,
    )
