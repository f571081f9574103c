"""SSE framing and the stream plumbing shared by every streaming route.

A stream's first batch is awaited before any byte is sent, so errors raised before generation
starts become ordinary HTTP error responses; after that they travel in-band."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi.responses import StreamingResponse

from app.api.errors import as_service_error
from app.errors import ServiceError
from app.metrics import StreamWatch
from app.protocol.generation import GenerationChunk, GenerationRequest
from app.web.backend import GenerationBackend

DONE_EVENT = b"data: [DONE]\n\n"
KEEPALIVE_EVENT = b": keep-alive\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# JSON may carry these raw, and SSE ends lines only at CR/LF, but clients that read the stream
# with str.splitlines semantics (httpx's iter_lines, which the sie-sdk uses) break lines there
# too and get half an event: send them escaped (still the same JSON string).
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def sse_event(payload: dict[str, Any]) -> bytes:
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return b"data: " + text.translate(_LINE_BREAKS).encode() + b"\n\n"


class StreamFormatter(Protocol):
    """Turns chunk batches of one request into wire payloads (one surface: chat or generate)."""

    finished: bool

    def feed(self, batch: list[GenerationChunk]) -> list[dict[str, Any]]: ...

    def error(self, error: ServiceError) -> dict[str, Any]: ...


class ChunkStream:
    """An opened generation: the first batch already received, the rest still to come."""

    def __init__(self, first: list[GenerationChunk], rest: AsyncIterator[list[GenerationChunk]]):
        self.first = first
        self.rest = rest
        self.watch = StreamWatch()  # metrics hook (issue 6): TTFT/TPOT, in-flight, cancellations

    @classmethod
    async def open(cls, backend: GenerationBackend, request: GenerationRequest) -> ChunkStream:
        batches = backend.stream(request)
        try:
            first = await anext(batches)
        except StopAsyncIteration:
            first = []
        except BaseException:
            await _close(batches)
            raise
        return cls(first, batches)

    async def batches(self) -> AsyncIterator[list[GenerationChunk]]:
        try:
            self.watch.batch(self.first)  # metrics hook
            yield self.first
            async for batch in self.rest:
                self.watch.batch(batch)  # metrics hook
                yield batch
        except Exception as error:
            self.watch.error(error)  # metrics hook
            raise
        finally:
            self.watch.close()  # metrics hook
            await _close(self.rest)

    async def collect(self) -> list[GenerationChunk]:
        chunks: list[GenerationChunk] = []
        async for batch in self.batches():
            chunks.extend(batch)
            if any(chunk.done for chunk in batch):
                break
        return chunks


async def _close(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


async def sse_body(
    stream: ChunkStream, formatter: StreamFormatter, *, keepalive_s: float
) -> AsyncIterator[bytes]:
    events = _events(stream, formatter)
    async for event in with_keepalive(events, keepalive_s):
        yield event


async def _events(stream: ChunkStream, formatter: StreamFormatter) -> AsyncIterator[bytes]:
    batches = stream.batches()
    try:
        async for batch in batches:
            # one write per batch, not per token: a coalesced batch carries many events
            payloads = formatter.feed(batch)
            if payloads:
                yield b"".join(sse_event(payload) for payload in payloads)
            if formatter.finished:
                break
        else:
            ended = ServiceError("generation stream ended before a terminal event")
            yield sse_event(formatter.error(ended))
    except Exception as error:  # noqa: BLE001 - every failure mid-stream is reported in-band
        yield sse_event(formatter.error(as_service_error(error)))
    finally:
        await _close(batches)
    yield DONE_EVENT


async def with_keepalive(source: AsyncIterator[bytes], interval_s: float) -> AsyncIterator[bytes]:
    """Forward `source`, inserting an SSE comment whenever it is silent for `interval_s`."""
    pending: asyncio.Future[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(source))
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield KEEPALIVE_EVENT
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield item
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        await _close(source)


def sse_response(
    stream: ChunkStream,
    formatter: StreamFormatter,
    *,
    keepalive_s: float,
    headers: dict[str, str],
) -> StreamingResponse:
    return StreamingResponse(
        sse_body(stream, formatter, keepalive_s=keepalive_s),
        media_type="text/event-stream",
        headers={**SSE_HEADERS, **headers},
    )
