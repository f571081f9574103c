"""`POST /v1/generate/{model}`: the SIE-native route, buffered JSON or SSE `GenerateChunk`s."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.api.auth import request_key_id
from app.api.body import read_json
from app.api.convert import generate_request, model_from_path
from app.api.errors import error_object
from app.api.openapi import GENERATION_ERRORS, STREAMED_OK, error_responses, json_body
from app.api.streaming import ChunkStream, sse_response
from app.errors import GenerationCancelled, GenerationFailed, ServiceError
from app.protocol.generation import GenerationChunk, GenerationResult
from app.protocol.sie import GenerateRequest
from app.web.context import ApiContext

router = APIRouter()


def usage_of(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int | None
) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return usage


def terminal_error(result: GenerationResult) -> ServiceError:
    if result.finish_reason == "cancelled":
        return GenerationCancelled("generation was cancelled")
    return GenerationFailed(
        result.error_message or "internal error during generation",
        result.error_code or "inference_error",
    )


def raise_if_failed(result: GenerationResult) -> None:
    if result.failed or result.finish_reason == "cancelled":
        raise terminal_error(result)


@router.post(
    "/v1/generate/{model:path}",
    openapi_extra=json_body(GenerateRequest),
    responses={**STREAMED_OK, **error_responses("sie", *GENERATION_ERRORS)},
)
async def generate(model: str, request: Request) -> Response:
    context = ApiContext.of(request)
    model_id = model_from_path(model)
    body = GenerateRequest.model_validate(await read_json(request, context))
    generation = generate_request(context.config, model_id, body, request.headers)
    generation = dataclasses.replace(generation, key_id=request_key_id(request))
    stream = await ChunkStream.open(context.backend, generation)
    headers = {"X-SIE-Request-ID": generation.request_id}
    if body.stream:
        formatter = GenerateStreamFormatter(generation.request_id)
        return sse_response(stream, formatter, headers=headers)
    result = GenerationResult.collect(await stream.collect())
    raise_if_failed(result)
    payload: dict[str, Any] = {
        "model": model_id,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "usage": usage_of(result.prompt_tokens, result.completion_tokens, result.cached_tokens),
        "ttft_ms": result.ttft_ms,
        "tpot_ms": result.tpot_ms,
    }
    return JSONResponse(payload, headers=headers)


class GenerateStreamFormatter:
    """Chunk batches -> SIE `GenerateChunk` payloads: one delta event per batch, `seq` from 0,
    then one terminal event with finish_reason, usage and timings."""

    def __init__(self, request_id: str) -> None:
        self._request_id = request_id
        self._seq = 0
        self.finished = False

    def _event(self, text: str, done: bool, **extra: Any) -> dict[str, Any]:
        event = {
            "request_id": self._request_id,
            "seq": self._seq,
            "text_delta": text,
            "done": done,
            **extra,
        }
        self._seq += 1
        return event

    def feed(self, batch: list[GenerationChunk]) -> list[dict[str, Any]]:
        text = "".join(chunk.text_delta for chunk in batch)
        terminal = next((chunk for chunk in batch if chunk.done), None)
        logprobs = [entry for chunk in batch if chunk.logprobs for entry in chunk.logprobs]
        delta_extra: dict[str, Any] = {"logprobs": logprobs} if logprobs else {}
        events = [self._event(text, False, **delta_extra)] if text else []
        if terminal is None:
            return events
        self.finished = True
        result = GenerationResult.collect([terminal])
        if result.failed:
            events.append(self.error(terminal_error(result)))
            return events
        extra: dict[str, Any] = {
            "finish_reason": result.finish_reason,
            "usage": usage_of(result.prompt_tokens, result.completion_tokens, result.cached_tokens),
        }
        if result.ttft_ms is not None:
            extra["ttft_ms"] = result.ttft_ms
        if result.tpot_ms is not None:
            extra["tpot_ms"] = result.tpot_ms
        events.append(self._event("", True, **extra))
        return events

    def error(self, error: ServiceError) -> dict[str, Any]:
        self.finished = True
        body = error_object(error, "sie")
        return self._event("", True, finish_reason="error", error=body)
