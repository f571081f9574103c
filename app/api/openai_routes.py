"""The OpenAI routes (`/v1/chat/completions`, `/v1/completions`, `/v1/responses`, `/tokenize`,
`/detokenize`): vLLM's own OpenAI layer answers them on the worker; here we only authenticate
(middleware), check sizes, route (pool, profile, affinity, KV estimate) and relay the bytes the
worker made. What vLLM accepts is accepted; a field neither vLLM nor the SIE contract knows is
a 400 `unsupported_field` (the worker checks it against vLLM's own request models)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.auth import request_key_id
from app.api.body import read_json_bytes
from app.api.convert import new_request_id, request_priority, routing_from_headers
from app.api.errors import as_service_error, error_object, parse_json_object
from app.api.openapi import GENERATION_ERRORS, STREAMED_OK, error_responses
from app.api.streaming import (
    DONE_EVENT,
    KEEPALIVE_EVENT,
    SSE_HEADERS,
    ChunkStream,
    Final,
    StreamResponse,
    sse_event,
)
from app.config import AppConfig
from app.errors import InvalidRequest, ModelNotFound, ServiceError, UnknownLora
from app.protocol.generation import (
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    OpenAICall,
    OpenAIRoute,
    SamplingOptions,
    WireReply,
)
from app.web.context import ApiContext

router = APIRouter()

# Request headers vLLM's serving layer reads (X-Request-Id is set to ours on the worker).
FORWARDED_HEADERS = ("x-session-id", "traceparent", "tracestate")
ROUTING_TEXT_CHARS = 1 << 16
UNMETERED = frozenset({"tokenize", "detokenize", "count_tokens"})  # no generation: no limits
MESSAGE_ROUTES = frozenset({"chat", "messages", "count_tokens"})  # a `messages` list
# vLLM's request models are the schema; documented at https://docs.vllm.ai (OpenAI server)
ANY_JSON_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
}  # affinity hashes look at the prompt's first blocks only


def _texts(content: Any) -> Iterator[str]:
    """The plain text of a message's (or a Responses input item's) content."""
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]


def _messages(body: Mapping[str, Any]) -> list[Any]:
    """The messages of a chat body, an Anthropic body's `system` first as a message."""
    messages = body.get("messages")
    messages = messages if isinstance(messages, list) else []
    system = body.get("system")
    return messages if system is None else [{"role": "system", "content": system}, *messages]


def routing_text(route: OpenAIRoute, body: Mapping[str, Any]) -> str:
    """The prompt text prefix routing hashes (never parsed beyond plain strings)."""
    if route in MESSAGE_ROUTES or (route == "tokenize" and "messages" in body):
        parts: list[str] = []
        size = 0
        for message in _messages(body):
            if not isinstance(message, dict):
                continue
            # separators cannot occur in JSON-decoded text without being escaped first
            parts.append(f"\x1e{message.get('role')}\x1f" + "".join(_texts(message.get("content"))))
            size += len(parts[-1])
            if size > ROUTING_TEXT_CHARS:
                break
        return "".join(parts)[:ROUTING_TEXT_CHARS]
    prompt = body.get("input") if route == "responses" else body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    return prompt[:ROUTING_TEXT_CHARS] if isinstance(prompt, str) else ""


def prompt_chars(route: OpenAIRoute, body: Mapping[str, Any]) -> int:
    """Characters of the longest prompt text the call makes vLLM render and tokenize (all of
    it ends up in the prompt, so the prompt has at least as many), or 0 where unknown or where
    the call asks vLLM to truncate the prompt (`truncate_prompt_tokens`)."""
    if body.get("truncate_prompt_tokens") is not None:
        return 0
    if route in MESSAGE_ROUTES or (route == "tokenize" and "messages" in body):
        return sum(
            len(text)
            for message in _messages(body)
            if isinstance(message, dict)
            for text in _texts(message.get("content"))
        )
    if route == "responses":
        items = body.get("input")
        if isinstance(items, str):
            return len(items)
        return sum(
            len(text)
            for item in (items if isinstance(items, list) else ())
            if isinstance(item, dict)
            for text in _texts(item.get("content"))
        )
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list):  # a batch of prompts: each is checked on its own
        return max((len(p) for p in prompt if isinstance(p, str)), default=0)
    return 0


def _count(body: Mapping[str, Any], *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _text(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string", param=name)
    return value or None


def resolve_target(
    config: AppConfig, route: OpenAIRoute, body: Mapping[str, Any]
) -> tuple[str, str | None]:
    """(served model id, LoRA adapter or None). `model` names a served model or, as in vLLM,
    one of its LoRA adapters; `lora_adapter` (SIE) names an adapter of the model."""
    model = body.get("model")
    if model is None and route in ("tokenize", "detokenize") and config.models:
        return config.models[0].id, None
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model must be a non-empty string", param="model")
    adapter = _text(body, "lora_adapter")
    served = config.model(model)
    if served is None:
        owner = next((m for m in config.models if model in m.lora_adapters), None)
        if owner is None:
            raise ModelNotFound(model)
        return owner.id, model
    if adapter is not None and adapter not in served.lora_adapters:
        raise UnknownLora(adapter, model)
    return served.id, adapter


def openai_request(
    config: AppConfig,
    route: OpenAIRoute,
    body: dict[str, Any],
    headers: Mapping[str, str],
    size_bytes: int = 0,
) -> GenerationRequest:
    """The routing envelope of an OpenAI call: the body rides along untouched."""
    model, adapter = resolve_target(config, route, body)
    pool, profile = routing_from_headers(config, headers)
    n = _count(body, "n") or 1
    return GenerationRequest(
        request_id=new_request_id(),
        model=model,
        prompt=routing_text(route, body),
        sampling=SamplingOptions(
            max_new_tokens=_count(body, "max_completion_tokens", "max_tokens", "max_output_tokens"),
            n=n,
            best_of=_count(body, "best_of"),
        ),
        pool=pool,
        machine_profile=profile,
        routing_key=_text(body, "routing_key"),
        prompt_cache_key=_text(body, "prompt_cache_key"),
        lora_adapter=adapter,
        priority=None if route in UNMETERED else request_priority(headers, body.get("priority")),
        openai=OpenAICall(
            route,
            body,
            tuple((name, headers[name]) for name in FORWARDED_HEADERS if name in headers),
            size_bytes,
        ),
        prompt_chars=prompt_chars(route, body),
    )


ErrorEvents = Callable[[ServiceError], tuple[bytes, ...]]


def openai_error_events(error: ServiceError) -> tuple[bytes, ...]:
    """An in-band error in the OpenAI error shape, then [DONE]."""
    return sse_event({"error": error_object(error, "openai")}), DONE_EVENT


async def relay(
    request: Request,
    route: OpenAIRoute,
    error_events: ErrorEvents = openai_error_events,
) -> Response:
    context = ApiContext.of(request)
    raw = await read_json_bytes(request, context)
    body = parse_json_object(raw)
    generation = openai_request(context.config, route, body, request.headers, len(raw))
    generation = dataclasses.replace(generation, key_id=request_key_id(request))
    stream = await ChunkStream.open(context.backend, generation)
    headers = {"X-SIE-Request-ID": generation.request_id}
    first = stream.first[0] if stream.first else None
    if not isinstance(first, WireReply):
        await stream.collect()  # closes the stream
        raise ServiceError("the worker sent no reply")
    if not first.stream:
        await stream.collect()  # the one reply is the whole answer (and feeds the metrics)
        return Response(first.data, media_type="application/json", headers=headers)
    return StreamResponse(
        _events(stream, error_events),
        media_type="text/event-stream",
        headers={**SSE_HEADERS, **headers},
    )


async def _events(
    stream: ChunkStream, error_events: ErrorEvents = openai_error_events
) -> AsyncIterator[bytes]:
    """vLLM's SSE events as the worker made them; a failure after the first byte (the worker
    lost, the stream cut) is an in-band error event in the route's error shape."""
    try:
        async for batch in stream.batches():
            if not batch:  # the backend's sign of a silent stream
                yield KEEPALIVE_EVENT
                continue
            # one write per batch, not per event: a coalesced batch carries many events
            data: list[bytes] = []
            done = False
            for reply in batch:
                if isinstance(reply, WireReply):
                    data.append(reply.data)
                    done = done or reply.done
            if done:
                yield Final(b"".join(data))
                return
            if any(data):
                yield b"".join(data)
        error: ServiceError = ServiceError("generation stream ended before a terminal event")
    except Exception as failure:  # noqa: BLE001 - every failure mid-stream is reported in-band
        error = as_service_error(failure)
    yield Final(b"".join(error_events(error)))


def _route(path: str, route: OpenAIRoute, summary: str) -> None:
    async def handler(request: Request) -> Response:
        return await relay(request, route)

    handler.__name__ = f"openai_{route}"
    router.add_api_route(
        path,
        handler,
        methods=["POST"],
        summary=summary,
        openapi_extra=ANY_JSON_BODY,
        responses={**STREAMED_OK, **error_responses("openai", *GENERATION_ERRORS)},
    )


_route("/v1/chat/completions", "chat", "OpenAI chat completions (vLLM's fields and semantics)")
_route("/v1/completions", "completion", "OpenAI completions (vLLM's fields and semantics)")
_route("/v1/responses", "responses", "OpenAI Responses (vLLM's implementation)")
_route("/tokenize", "tokenize", "vLLM's /tokenize (prompt or chat messages)")
_route("/detokenize", "detokenize", "vLLM's /detokenize")


class ChatChunks:
    """One streamed chat's replies as generation chunks (for callers that want events, not
    bytes: app/handles.py): text deltas of choice 0, then a terminal chunk with the usage. The
    finish reason and the first text are tracked across replies: a reply's last events can
    arrive ahead of its terminal one (`app.tenancy.requests.ahead_of_bill`)."""

    def __init__(self) -> None:
        self.finish: FinishReason = "stop"
        self.texts = 0

    def feed(self, reply: WireReply) -> list[GenerationChunk]:
        chunks: list[GenerationChunk] = []
        for line in reply.data.split(b"\n"):
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[len(b"data: ") :])
            error = event.get("error")
            if isinstance(error, dict):
                message = str(error.get("message", "generation failed"))
                code = str(error.get("code", "inference_error"))
                return [
                    *chunks,
                    GenerationChunk(
                        "", done=True, finish_reason="error", error_code=code, error_message=message
                    ),
                ]
            for choice in event.get("choices") or ():
                if choice.get("index", 0) != 0:
                    continue
                text = (choice.get("delta") or {}).get("content") or ""
                token_ids = tuple(choice.get("token_ids") or ())
                if text or token_ids:
                    chunks.append(
                        GenerationChunk(text, is_first=not self.texts, token_ids=token_ids)
                    )
                    self.texts += 1
                if choice.get("finish_reason") == "length":
                    self.finish = "length"
        if reply.done:
            stats = reply.stats or GenerationChunk("", done=True)
            chunks.append(
                GenerationChunk(
                    "",
                    done=True,
                    finish_reason=self.finish,
                    prompt_tokens=stats.prompt_tokens,
                    completion_tokens=stats.completion_tokens,
                    cached_tokens=stats.cached_tokens,
                    ttft_ms=stats.ttft_ms,
                    tpot_ms=stats.tpot_ms,
                )
            )
        return chunks
