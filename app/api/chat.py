"""`POST /v1/chat/completions`: OpenAI chat, buffered and streamed (SSE ending in [DONE]), with
n choices, tool calls and logprobs."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.api.context import ApiContext, read_json
from app.api.convert import chat_request
from app.api.errors import error_object
from app.api.openapi import GENERATION_ERRORS, STREAMED_OK, error_responses, json_body
from app.api.streaming import ChunkStream, sse_response
from app.errors import GenerationCancelled, GenerationFailed, ServiceError
from app.protocol.generation import ChoiceResult, GenerationChunk, GenerationResult
from app.protocol.openai import ChatCompletionRequest

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


def result_usage(result: GenerationResult) -> dict[str, Any]:
    return usage_of(result.prompt_tokens, result.completion_tokens, result.cached_tokens)


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


def chat_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    return None if entries is None else {"content": entries, "refusal": None}


def choice_message(choice: ChoiceResult) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": choice.text or None}
    if choice.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in choice.tool_calls
        ]
    elif message["content"] is None:
        message["content"] = ""
    return message


@router.post(
    "/v1/chat/completions",
    openapi_extra=json_body(ChatCompletionRequest),
    responses={**STREAMED_OK, **error_responses("openai", *GENERATION_ERRORS)},
)
async def chat_completions(request: Request) -> Response:
    context = ApiContext.of(request)
    body = ChatCompletionRequest.model_validate(await read_json(request, context))
    generation = chat_request(context.config, body, request.headers)
    stream = await ChunkStream.open(context.backend, generation)
    headers = {"X-SIE-Request-ID": generation.request_id}
    completion_id = f"chatcmpl-{generation.request_id}"
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        formatter = ChatStreamFormatter(completion_id, body.model, include_usage)
        return sse_response(stream, formatter, keepalive_s=context.keepalive_s, headers=headers)
    result = GenerationResult.collect(await stream.collect())
    raise_if_failed(result)
    choices = [
        {
            "index": choice.index,
            "message": choice_message(choice),
            "finish_reason": choice.finish_reason,
            "logprobs": chat_logprobs(choice.logprobs),
        }
        for choice in sorted(result.choices.values(), key=lambda c: c.index)
    ]
    payload = {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": result_usage(result),
    }
    return JSONResponse(payload, headers=headers)


class ChatStreamFormatter:
    """Chunk batches -> `chat.completion.chunk` payloads. Consecutive text of one choice in a
    batch becomes one delta; the role goes on each choice's first delta; tool calls go out as
    announcement + arguments deltas; usage comes last when asked for."""

    def __init__(self, completion_id: str, model: str, include_usage: bool) -> None:
        self._id = completion_id
        self._model = model
        self._created = int(time.time())
        self._include_usage = include_usage
        self._started: set[int] = set()
        self._tool_calls: set[int] = set()
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

    def _choice(
        self,
        index: int,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        logprobs: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        if index not in self._started:
            self._started.add(index)
            delta = {"role": "assistant", **delta}
        return self._chunk(
            [
                {
                    "index": index,
                    "delta": delta,
                    "finish_reason": finish_reason,
                    "logprobs": chat_logprobs(logprobs),
                }
            ]
        )

    def feed(self, batch: list[GenerationChunk]) -> list[dict[str, Any]]:
        payloads: list[dict[str, Any]] = []
        pending: GenerationChunk | None = None  # text being merged
        pending_logprobs: list[dict[str, Any]] | None = None

        def flush() -> None:
            nonlocal pending, pending_logprobs
            if pending is not None:
                payloads.append(
                    self._choice(
                        pending.choice_index,
                        {"content": pending.text_delta},
                        logprobs=pending_logprobs,
                    )
                )
            pending, pending_logprobs = None, None

        for chunk in batch:
            index = chunk.choice_index
            if chunk.text_delta and not chunk.done:
                if pending is not None and pending.choice_index == index:
                    pending = GenerationChunk(
                        pending.text_delta + chunk.text_delta, choice_index=index
                    )
                else:
                    flush()
                    pending = chunk
                if chunk.logprobs is not None:
                    pending_logprobs = (pending_logprobs or []) + list(chunk.logprobs)
                if chunk.finish_reason is None:
                    continue
            flush()
            if chunk.tool_call is not None:
                self._tool_calls.add(index)
                call = chunk.tool_call
                delta: dict[str, Any] = {
                    "index": call.index,
                    "function": {"arguments": call.arguments_delta},
                }
                if call.id is not None:
                    delta = {
                        "index": call.index,
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": ""},
                    }
                payloads.append(self._choice(index, {"tool_calls": [delta]}))
            if chunk.done:
                payloads.extend(self._terminal(chunk))
                return payloads
            if chunk.finish_reason is not None:
                payloads.append(self._choice(index, {}, finish_reason=chunk.finish_reason))
        flush()
        if not payloads and not self._started:
            payloads.append(self._choice(0, {"content": ""}))
        return payloads

    def _terminal(self, terminal: GenerationChunk) -> list[dict[str, Any]]:
        self.finished = True
        result = GenerationResult.collect([terminal])
        if result.failed or result.finish_reason == "cancelled":
            return [self.error(terminal_error(result))]
        payloads = []
        if terminal.text_delta:
            payloads.append(
                self._choice(
                    terminal.choice_index,
                    {"content": terminal.text_delta},
                    logprobs=list(terminal.logprobs) if terminal.logprobs else None,
                )
            )
        if len(self._started) <= 1:
            payloads.append(
                self._choice(terminal.choice_index, {}, finish_reason=result.finish_reason)
            )
        if self._include_usage:
            payloads.append(self._chunk([], usage=result_usage(result)))
        return payloads

    def error(self, error: ServiceError) -> dict[str, Any]:
        self.finished = True
        return self._chunk([], error=error_object(error, "openai"))
