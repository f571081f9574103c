"""Per-app state the routes share (config, backend) and body reading with the size limit."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from app.config import AppConfig
from app.errors import PayloadTooLarge
from app.web.backend import GenerationBackend


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
