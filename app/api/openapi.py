"""The contract in the OpenAPI document. Routes read their bodies themselves (strict JSON, size
limit, contract error codes), so FastAPI cannot see them: these helpers describe each body from
its pydantic model, and the error responses, content types and headers a route can answer with,
so clients and schemathesis (tests/e2e/test_schemathesis.py) see what the service really does."""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel

ErrorShape = Literal["openai", "anthropic", "sie"]
_STRING = {"type": "string"}
_ERROR_FIELDS = {"code": _STRING, "message": _STRING, "param": {"type": ["string", "null"]}}
ERROR_SCHEMAS: dict[ErrorShape, dict[str, Any]] = {
    "openai": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "type"],
                "properties": {**_ERROR_FIELDS, "type": _STRING},
            }
        },
    },
    "anthropic": {
        "type": "object",
        "required": ["type", "error"],
        "properties": {
            "type": {"const": "error"},
            "error": {
                "type": "object",
                "required": ["type", "message"],
                "properties": {"type": _STRING, "message": _STRING},
            },
        },
    },
    "sie": {
        "type": "object",
        "required": ["detail"],
        "properties": {
            "detail": {
                "type": "object",
                "required": ["code", "message"],
                "properties": _ERROR_FIELDS,
            }
        },
    },
}
STATUS_TEXT = {
    400: "Invalid request (`invalid_request`, `unsupported_field`, `INPUT_TOO_LONG`, ...)",
    404: "Unknown model, pool or route",
    410: "The pool's lease expired",
    413: "Request body too large",
    415: "Body is not application/json",
    429: "Rate limited (Retry-After)",
    500: "Internal error, with a request id",
    503: "No capacity now: provisioning, model loading, queue full, worker lost (Retry-After)",
    529: "Overloaded: the worker's queue is full (Retry-After; Anthropic routes)",
}


def error_responses(shape: ErrorShape, *statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for the error statuses a route can answer with, in its error shape."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        headers: dict[str, Any] = {"X-SIE-Error-Code": {"schema": _STRING}}
        if status in (429, 503, 529):
            headers["Retry-After"] = {"schema": _STRING}
        responses[status] = {
            "description": STATUS_TEXT[status],
            "content": {"application/json": {"schema": ERROR_SCHEMAS[shape]}},
            "headers": headers,
        }
    return responses


GENERATION_ERRORS = (400, 404, 413, 415, 429, 500, 503)
STREAMED_OK: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A JSON body, or with `stream: true` server-sent events ending in "
        "`data: [DONE]` (errors after the first byte arrive in-band)",
        "content": {"application/json": {}, "text/event-stream": {"schema": _STRING}},
    }
}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra=` declaring a required JSON body of `model` (its schema inlined, so the
    document needs no extra components)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _inline(schema, definitions, ())}},
        }
    }


def _inline(node: Any, definitions: dict[str, Any], seen: tuple[str, ...]) -> Any:
    if isinstance(node, list):
        return [_inline(item, definitions, seen) for item in node]
    if not isinstance(node, dict):
        return node
    reference = node.get("$ref")
    if isinstance(reference, str) and reference.startswith("#/$defs/"):
        name = reference.removeprefix("#/$defs/")
        if name in seen:  # a recursive model: stop at any object
            return {"type": "object"}
        target = copy.deepcopy(definitions[name])
        rest = {key: value for key, value in node.items() if key != "$ref"}
        return _inline({**target, **rest}, definitions, (*seen, name))
    return {key: _inline(value, definitions, seen) for key, value in node.items()}
