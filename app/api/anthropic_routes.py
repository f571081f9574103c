"""The Anthropic Messages API (`/v1/messages`, `/v1/messages/count_tokens`): vLLM's own Anthropic
layer answers it on the worker, over the same engine, KV admission and billing as the OpenAI
routes; here, as there, we only authenticate (`x-api-key` or a Bearer key), check sizes, route
and relay the bytes the worker made. Errors are Anthropic's: `{"type": "error", "error":
{"type", "message"}}` with Anthropic's statuses (app/api/errors.py), in-band as `event: error`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.errors import anthropic_error
from app.api.openai_routes import ANY_JSON_BODY, relay
from app.api.openapi import GENERATION_ERRORS, error_responses
from app.api.streaming import sse_event
from app.errors import ServiceError
from app.protocol.generation import OpenAIRoute

router = APIRouter()
STREAMED_OK: dict[int | str, dict[str, object]] = {
    200: {
        "description": "A Message, or with `stream: true` Anthropic's server-sent events "
        "(`message_start` ... `message_stop`; errors after the first byte arrive in-band)",
        "content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}},
    }
}


def anthropic_error_events(error: ServiceError) -> tuple[bytes, ...]:
    """A failure after the first byte, as Anthropic's streams report one."""
    return (b"event: error\n" + sse_event(anthropic_error(error)),)


async def anthropic_relay(request: Request, route: OpenAIRoute) -> Response:
    response = await relay(request, route, anthropic_error_events)
    # the header Anthropic's clients read a request's id from (`_request_id` in the SDK)
    response.headers["request-id"] = response.headers["x-sie-request-id"]
    return response


@router.post(
    "/v1/messages",
    summary="Anthropic Messages (vLLM's implementation)",
    openapi_extra=ANY_JSON_BODY,
    responses={**STREAMED_OK, **error_responses("anthropic", *GENERATION_ERRORS, 529)},
)
async def anthropic_messages(request: Request) -> Response:
    return await anthropic_relay(request, "messages")


@router.post(
    "/v1/messages/count_tokens",
    summary="Anthropic token count of a Messages request (vLLM's implementation)",
    openapi_extra=ANY_JSON_BODY,
    responses=error_responses("anthropic", *GENERATION_ERRORS),
)
async def anthropic_count_tokens(request: Request) -> Response:
    return await anthropic_relay(request, "count_tokens")
