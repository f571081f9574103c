"""Per-app state the routes share (config, backend) and body reading with the size limit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request

from app.api.backend import GenerationBackend
from app.api.errors import parse_json_object
from app.config import AppConfig
from app.errors import PayloadTooLarge, UnsupportedMediaType


@dataclass(frozen=True, slots=True)
class ApiContext:
    config: AppConfig
    backend: GenerationBackend

    @property
    def keepalive_s(self) -> float:
        return self.config.streaming.keepalive_seconds

    @staticmethod
    def of(request: Request) -> ApiContext:
        context: ApiContext = request.app.state.context
        return context


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    body = bytearray()
    async for piece in request.stream():
        body.extend(piece)
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    return bytes(body)


async def read_json_bytes(request: Request, context: ApiContext) -> bytes:
    """The body of a JSON request, within the size limit (not parsed yet)."""
    content_type = request.headers.get("content-type", "application/json").lower()
    if "json" not in content_type:
        raise UnsupportedMediaType(f"content-type must be application/json, not '{content_type}'")
    return await read_body(request, context.config.ingress.max_body_bytes)


async def read_json(request: Request, context: ApiContext) -> dict[str, Any]:
    return parse_json_object(await read_json_bytes(request, context))
