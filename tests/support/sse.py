"""Server-sent events as tests and benchmarks read them: httpx-sse's parser (the WHATWG rules:
`data:` with or without its space, comments, multi-line data, CR/LF line ends), and the OpenAI
stream's end marker. The one SSE reader of tests/ and benchmarks/."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import httpx
from httpx_sse import EventSource

DONE = "[DONE]"


def data(response: httpx.Response) -> Iterator[str]:
    """Each event's data as it arrives (a streamed response) or in order (a read one);
    `[DONE]` included, keep-alive comments not."""
    for event in EventSource(response).iter_sse():
        yield event.data


async def adata(response: httpx.Response) -> AsyncIterator[str]:
    """`data` for an httpx.AsyncClient stream."""
    async for event in EventSource(response).aiter_sse():
        yield event.data


def parse(text: str) -> list[str]:
    """The data of each event of an SSE body already in hand (curl's output, a test body)."""
    body = httpx.Response(200, headers={"content-type": "text/event-stream"}, text=text)
    return list(data(body))


def payloads(items: Iterable[str]) -> tuple[list[Any], bool]:
    """The JSON payloads, and whether the stream ended with `[DONE]`."""
    events: list[Any] = []
    done = False
    for item in items:
        if item == DONE:
            done = True
        else:
            events.append(json.loads(item))
    return events, done
