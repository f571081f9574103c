"""SSE framing and the stream plumbing shared by every streaming route.

A stream's first batch is awaited before any byte is sent, so errors raised before generation
starts become ordinary HTTP error responses; after that they travel in-band."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, Protocol

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.api.errors import as_service_error
from app.errors import ServiceError
from app.metrics import StreamWatch
from app.protocol.generation import GenerationChunk, GenerationRequest, StreamBatch
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


def chunks(batch: StreamBatch) -> list[GenerationChunk]:
    """The generation chunks of a batch (a generate request's stream has nothing else)."""
    return [item for item in batch if isinstance(item, GenerationChunk)]


class ChunkStream:
    """An opened generation: the first batch already received, the rest still to come."""

    def __init__(self, first: StreamBatch, rest: AsyncIterator[StreamBatch]):
        self.first = first
        self.rest = rest
        self.watch = StreamWatch()  # metrics hook (issue 6): TTFT/TPOT, in-flight, cancellations

    @classmethod
    async def open(cls, backend: GenerationBackend, request: GenerationRequest) -> ChunkStream:
        batches = backend.stream(request)
        try:
            first = await anext(batches)
            while not first:  # keep-alives before the first batch: the headers wait anyway
                first = await anext(batches)
        except StopAsyncIteration:
            first = []
        except BaseException:
            await _close(batches)
            raise
        return cls(first, batches)

    async def batches(self) -> AsyncIterator[StreamBatch]:
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
        """Every chunk up to the terminal one (for an OpenAI reply: none; this drains it)."""
        collected: list[GenerationChunk] = []
        async for batch in self.batches():
            collected.extend(chunks(batch))
            if any(item.done for item in batch):
                break
        return collected


async def _close(iterator: AsyncIterable[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


class Final(bytes):
    """A stream's last bytes: `StreamResponse` sends them as the response's last body message
    (one write and one trip through every ASGI layer fewer per response)."""


async def _events(stream: ChunkStream, formatter: StreamFormatter) -> AsyncIterator[bytes]:
    batches = stream.batches()
    try:
        async for batch in batches:
            if not batch:  # the backend's sign of a silent stream
                yield KEEPALIVE_EVENT
                continue
            # one write per batch, not per token: a coalesced batch carries many events
            data = b"".join(sse_event(payload) for payload in formatter.feed(chunks(batch)))
            if formatter.finished:
                yield Final(data + DONE_EVENT)
                return
            if data:
                yield data
        ended = ServiceError("generation stream ended before a terminal event")
        error = sse_event(formatter.error(ended))
    except Exception as failure:  # noqa: BLE001 - every failure mid-stream is reported in-band
        error = sse_event(formatter.error(as_service_error(failure)))
    finally:
        await _close(batches)
    yield Final(error + DONE_EVENT)


class StreamResponse(StreamingResponse):
    """Starlette's StreamingResponse without its anyio task group per response (two tasks and
    cancel scopes: about a tenth of the ingress's CPU on one-token streams): the body is sent
    from the request's own task, and one plain asyncio task waits for the client to leave and
    then cancels the sending, as Starlette's does. Servers of ASGI spec 2.4 (a send to a gone
    client raises) need no watcher at all; Starlette's own path serves them. A `Final` item
    ends the response in the same message (no empty last one)."""

    complete = False  # the last body message went out

    async def stream_response(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        body = self.body_iterator
        async for chunk in body:
            if not isinstance(chunk, bytes | memoryview):
                chunk = chunk.encode(self.charset)
            if isinstance(chunk, Final):
                self.complete = True  # the client leaving now is no reason to cancel the close
                await send({"type": "http.response.body", "body": bytes(chunk), "more_body": False})
                await _close(body)  # (its cleanup runs now, not when it is collected)
                return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        spec = str(scope.get("asgi", {}).get("spec_version", "2.0"))
        if scope["type"] != "http" or tuple(map(int, spec.split("."))) >= (2, 4):
            await super().__call__(scope, receive, send)
            return
        sending = asyncio.current_task()
        assert sending is not None
        left = done = False

        async def watch() -> None:
            nonlocal left
            while (await receive())["type"] != "http.disconnect":
                pass
            if not done and not self.complete:
                left = True
                sending.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not left:
                raise
            sending.uncancel()  # the client left: the response ends here, as Starlette's
        finally:
            done = True
            watcher.cancel()
        if self.background is not None and not left:
            await self.background()


def sse_response(
    stream: ChunkStream, formatter: StreamFormatter, *, headers: dict[str, str]
) -> StreamingResponse:
    """SSE events of the stream; an empty batch from the backend (a silent stream) becomes
    a keep-alive comment."""
    return StreamResponse(
        _events(stream, formatter),
        media_type="text/event-stream",
        headers={**SSE_HEADERS, **headers},
    )
