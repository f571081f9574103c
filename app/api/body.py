"""JSON request bodies: content type, the size limit of `ingress.max_body_bytes`, parsing."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from app.api.errors import parse_json_object
from app.errors import UnsupportedMediaType
from app.web.context import ApiContext, read_body


async def read_json_bytes(request: Request, context: ApiContext) -> bytes:
    """The body of a JSON request, within the size limit (not parsed yet)."""
    content_type = request.headers.get("content-type", "application/json").lower()
    if "json" not in content_type:
        raise UnsupportedMediaType(f"content-type must be application/json, not '{content_type}'")
    return await read_body(request, context.config.ingress.max_body_bytes, context.body_bucket)


async def read_json(request: Request, context: ApiContext) -> dict[str, Any]:
    return parse_json_object(await read_json_bytes(request, context))
