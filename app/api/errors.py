"""Render every error in one place: OpenAI routes get `{"error": {...}}`, the Anthropic routes
`{"type": "error", "error": {"type", "message"}}` (Anthropic's types and statuses: a full queue
is 529 `overloaded_error`), SIE-native routes and pools `{"detail": {...}}`; all carry
`X-SIE-Error-Code` and, for capacity errors, `Retry-After`. Unknown exceptions become 500 `internal_error` with a request id."""

from __future__ import annotations

import json
import logging
import math
import uuid
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from app.errors import InternalError, InvalidRequest, ServiceError, UnsupportedField

logger = logging.getLogger(__name__)

ErrorShape = Literal["openai", "anthropic", "sie"]

# Anthropic's error type per status (https://docs.anthropic.com/en/api/errors); 529 is theirs
ANTHROPIC_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
ANTHROPIC_OVERLOADED = 529  # Anthropic's status for "overloaded": our QUEUE_FULL


def as_service_error(error: BaseException) -> ServiceError:
    """Map any exception to a ServiceError; unknown ones are logged with a fresh request id."""
    if isinstance(error, ServiceError):
        return error
    cause = getattr(error, "cause", None)  # ray.exceptions.RayTaskError keeps the original
    if isinstance(cause, ServiceError):
        return cause
    request_id = uuid.uuid4().hex
    logger.error("unhandled error (request id %s)", request_id, exc_info=error)
    return InternalError(request_id)


def error_object(error: ServiceError, shape: ErrorShape) -> dict[str, Any]:
    body: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.param is not None:
        body["param"] = error.param
    if shape == "openai":
        body["type"] = error.openai_type
        body.setdefault("param", None)
    body.update(error.extra)
    return body


def anthropic_status(error: ServiceError) -> int:
    return ANTHROPIC_OVERLOADED if error.code == "QUEUE_FULL" else error.status


def anthropic_error(error: ServiceError) -> dict[str, Any]:
    """The Anthropic error body (our code travels in `X-SIE-Error-Code`)."""
    status = anthropic_status(error)
    kind = ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def error_response(error: BaseException, shape: ErrorShape) -> JSONResponse:
    service_error = as_service_error(error)
    headers = {"X-SIE-Error-Code": service_error.code}
    if service_error.retry_after_s is not None:
        headers["Retry-After"] = _retry_after(service_error.retry_after_s)
    if shape == "anthropic":
        return JSONResponse(
            anthropic_error(service_error),
            status_code=anthropic_status(service_error),
            headers=headers,
        )
    key = "error" if shape == "openai" else "detail"
    return JSONResponse(
        {key: error_object(service_error, shape)},
        status_code=service_error.status,
        headers=headers,
    )


def _retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def validation_error(error: ValidationError) -> InvalidRequest:
    """The first pydantic error as a contract error: unknown keys -> unsupported_field."""
    first = error.errors(include_url=False)[0]
    param = format_location(first.get("loc", ()))
    if first["type"] == "extra_forbidden":
        return UnsupportedField(param, f"unknown field '{param}'")
    message = first.get("msg", "invalid value")
    return InvalidRequest(f"{param}: {message}" if param else message, param=param or None)


def format_location(location: tuple[Any, ...] | list[Any]) -> str:
    """('messages', 0, 'role') -> 'messages[0].role', dropping pydantic's union-branch tags
    ('str', 'list[str]', 'function-after[...]'), which never look like our snake_case fields."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in part or "-" in part:
            continue
        else:
            text += f".{part}" if text else str(part)
    return text


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Strict JSON parse of a request body: invalid UTF-8, bad JSON, NaN, or a non-object -> 400."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidRequest("request body is not valid UTF-8") from error
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as error:
        raise InvalidRequest(f"request body is not valid JSON: {error}") from error
    except RecursionError:  # the parser's own bound (~1,000 levels), not a server failure
        raise InvalidRequest("request body nests too deeply") from None
    if not isinstance(value, dict):
        raise InvalidRequest("request body must be a JSON object")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
