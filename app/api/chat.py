"""`POST /v1/chat/completions`: OpenAI chat, buffered and streamed (SSE ending in [DONE])."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.api.context import ApiContext, read_json
from app.api.convert import chat_request
from app.api.errors import error_object
from app.api.streaming import ChunkStream, sse_response
from app.errors import GenerationCancelled, GenerationFailed, ServiceError
from app.protocol.generation import GenerationChunk, GenerationResult
from app.protocol.openai import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
)

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


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    context = ApiContext.of(request)
    body = ChatCompletionRequest.model_validate(await read_json(request, context))
    generation = chat_request(context.config, body, request.headers)
    stream = await ChunkStream.open(context.backend, generation)
    headers = {"X-SIE-Request-ID": generation.request_id}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        formatter = ChatStreamFormatter(
            f"chatcmpl-{generation.request_id}", body.model, include_usage
        )
        return sse_response(stream, formatter, keepalive_s=context.keepalive_s, headers=headers)
    result = GenerationResult.collect(await stream.collect())
    if result.failed or result.finish_reason == "cancelled":
        raise terminal_error(result)
    response = ChatCompletionResponse(
        id=f"chatcmpl-{generation.request_id}",
        created=int(time.time()),
        model=body.model,
        choices=[
            ChatChoice(
                index=0,
                message=ChatMessageOut(content=result.text),
                finish_reason=result.finish_reason,
            )
        ],
        usage=usage_of(result.prompt_tokens, result.completion_tokens, result.cached_tokens),
    )
    return JSONResponse(response.model_dump(exclude_none=False), headers=headers)


class ChatStreamFormatter:
    """Chunk batches -> `chat.completion.chunk` payloads; role on the first, usage at the end."""

    def __init__(self, completion_id: str, model: str, include_usage: bool) -> None:
        self._id = completion_id
        self._model = model
        self._created = int(time.time())
        self._include_usage = include_usage
        self._sent_role = False
        self.finished = False

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "system_fingerprint": None,
            "choices": choices,
            **extra,
        }

    def _delta(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if not self._sent_role:
            delta["role"] = "assistant"
            self._sent_role = True
        if text or finish_reason is None:
            delta["content"] = text
        return self._chunk(
            [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
        )

    def feed(self, batch: list[GenerationChunk]) -> list[dict[str, Any]]:
        text = "".join(chunk.text_delta for chunk in batch)
        terminal = next((chunk for chunk in batch if chunk.done), None)
        payloads = []
        if text or (terminal is None and not self._sent_role):
            payloads.append(self._delta(text))
        if terminal is None:
            return payloads
        self.finished = True
        result = GenerationResult.collect([terminal])
        if result.failed or result.finish_reason == "cancelled":
            payloads.append(self.error(terminal_error(result)))
            return payloads
        payloads.append(self._delta("", finish_reason=result.finish_reason))
        if self._include_usage:
            usage = usage_of(result.prompt_tokens, result.completion_tokens, result.cached_tokens)
            payloads.append(self._chunk([], usage=usage))
        return payloads

    def error(self, error: ServiceError) -> dict[str, Any]:
        self.finished = True
        return self._chunk([], error=error_object(error, "openai"))
