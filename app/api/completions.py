"""`POST /v1/completions` (OpenAI legacy text completions, buffered and streamed) and
`POST /v1/responses` (stateless OpenAI Responses, buffered)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.api.chat import raise_if_failed, result_usage, terminal_error
from app.api.context import ApiContext, read_json
from app.api.convert import completion_request, responses_request
from app.api.errors import error_object
from app.api.openapi import GENERATION_ERRORS, STREAMED_OK, error_responses, json_body
from app.api.streaming import ChunkStream, sse_response
from app.errors import ServiceError
from app.protocol.generation import GenerationChunk, GenerationResult
from app.protocol.openai import CompletionRequest, ResponsesRequest

router = APIRouter()


def completion_logprobs(entries: list[dict[str, Any]] | None, top_n: int) -> dict[str, Any] | None:
    """OpenAI legacy logprobs: parallel lists of tokens, logprobs and top alternatives."""
    if entries is None:
        return None
    return {
        "tokens": [entry["token"] for entry in entries],
        "token_logprobs": [entry["logprob"] for entry in entries],
        "top_logprobs": [
            {top["token"]: top["logprob"] for top in entry["top_logprobs"][:top_n]}
            for entry in entries
        ],
        "text_offset": [],
    }


@router.post(
    "/v1/completions",
    openapi_extra=json_body(CompletionRequest),
    responses={**STREAMED_OK, **error_responses("openai", *GENERATION_ERRORS)},
)
async def completions(request: Request) -> Response:
    context = ApiContext.of(request)
    body = CompletionRequest.model_validate(await read_json(request, context))
    generation = completion_request(context.config, body, request.headers)
    stream = await ChunkStream.open(context.backend, generation)
    headers = {"X-SIE-Request-ID": generation.request_id}
    completion_id = f"cmpl-{generation.request_id}"
    top_n = body.logprobs or 0
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        formatter = CompletionStreamFormatter(completion_id, body.model, include_usage, top_n)
        return sse_response(stream, formatter, keepalive_s=context.keepalive_s, headers=headers)
    result = GenerationResult.collect(await stream.collect())
    raise_if_failed(result)
    payload = {
        "id": completion_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": choice.index,
                "text": choice.text,
                "finish_reason": choice.finish_reason,
                "logprobs": completion_logprobs(choice.logprobs, top_n),
            }
            for choice in sorted(result.choices.values(), key=lambda c: c.index)
        ],
        "usage": result_usage(result),
    }
    return JSONResponse(payload, headers=headers)


class CompletionStreamFormatter:
    """Chunk batches -> `text_completion` stream payloads (one per batch)."""

    def __init__(self, completion_id: str, model: str, include_usage: bool, top_n: int) -> None:
        self._base = {
            "id": completion_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        self._include_usage = include_usage
        self._top_n = top_n
        self.finished = False

    def _chunk(
        self, text: str, finish_reason: str | None, logprobs: list[dict[str, Any]] | None
    ) -> dict[str, Any]:
        choice = {
            "index": 0,
            "text": text,
            "finish_reason": finish_reason,
            "logprobs": completion_logprobs(logprobs, self._top_n),
        }
        return {**self._base, "choices": [choice]}

    def feed(self, batch: list[GenerationChunk]) -> list[dict[str, Any]]:
        text = "".join(chunk.text_delta for chunk in batch)
        logprobs = [entry for chunk in batch if chunk.logprobs for entry in chunk.logprobs] or None
        terminal = next((chunk for chunk in batch if chunk.done), None)
        if terminal is None:
            return [self._chunk(text, None, logprobs)] if text else []
        self.finished = True
        result = GenerationResult.collect([terminal])
        payloads = [self._chunk(text, None, logprobs)] if text else []
        if result.failed or result.finish_reason == "cancelled":
            return [*payloads, self.error(terminal_error(result))]
        payloads.append(self._chunk("", result.finish_reason, None))
        if self._include_usage:
            payloads.append({**self._base, "choices": [], "usage": result_usage(result)})
        return payloads

    def error(self, error: ServiceError) -> dict[str, Any]:
        self.finished = True
        return {**self._base, "choices": [], "error": error_object(error, "openai")}


@router.post(
    "/v1/responses",
    openapi_extra=json_body(ResponsesRequest),
    responses={**STREAMED_OK, **error_responses("openai", *GENERATION_ERRORS)},
)
async def responses(request: Request) -> Response:
    context = ApiContext.of(request)
    body = ResponsesRequest.model_validate(await read_json(request, context))
    generation = responses_request(context.config, body, request.headers)
    stream = await ChunkStream.open(context.backend, generation)
    result = GenerationResult.collect(await stream.collect())
    raise_if_failed(result)
    usage = result_usage(result)
    payload = {
        "id": f"resp_{generation.request_id}",
        "object": "response",
        "created_at": int(time.time()),
        "model": body.model,
        "status": "completed" if result.finish_reason != "length" else "incomplete",
        "incomplete_details": {"reason": "max_output_tokens"}
        if result.finish_reason == "length"
        else None,
        "output": [
            {
                "type": "message",
                "id": f"msg_{uuid.uuid4().hex}",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": result.text, "annotations": []}],
            }
        ],
        "usage": {
            "input_tokens": usage["prompt_tokens"],
            "output_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"],
            "input_tokens_details": {"cached_tokens": result.cached_tokens or 0},
        },
        "metadata": body.metadata or {},
    }
    return JSONResponse(payload, headers={"X-SIE-Request-ID": generation.request_id})
