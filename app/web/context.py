"""Per-app state the routes share (config, backend) and body reading with the size limit."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from fastapi import Request

from app.config import AppConfig
from app.errors import PayloadTooLarge
from app.web.backend import GenerationBackend
from app.web.pacing import UNPACED_BYTES, ByteBucket


@dataclass(frozen=True, slots=True)
class ApiContext:
    config: AppConfig
    backend: GenerationBackend
    body_bucket: ByteBucket = field(init=False)

    def __post_init__(self) -> None:
        ingress = self.config.ingress
        bucket = ByteBucket(rate=ingress.body_bytes_per_second, capacity=ingress.max_body_bytes)
        object.__setattr__(self, "body_bucket", bucket)

    @staticmethod
    def of(request: Request) -> ApiContext:
        context: ApiContext = request.app.state.context
        return context


async def read_body(request: Request, limit: int, bucket: ByteBucket | None = None) -> bytes:
    """The body, refused past `limit` bytes. Beyond its first UNPACED_BYTES it is read no faster
    than `bucket` allows (pacing.py): a small request never waits behind a flood of big ones."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    body = bytearray()
    async for piece in request.stream():
        body.extend(piece)
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        paced = min(len(piece), len(body) - UNPACED_BYTES)
        if bucket is not None and paced > 0:
            wait = bucket.take(paced, time.monotonic())
            if wait > 0:
                await asyncio.sleep(wait)
    return bytes(body)
