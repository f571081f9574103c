"""The OpenAI relay on the ingress (app/api/openai_routes.py): vLLM's SSE events as the worker
made them, one write per coalesced batch (each write is a trip through the ASGI stack and a
socket send), nothing after the terminal reply, and an in-band error when the stream breaks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from app.api.openai_routes import ChatChunks, _events
from app.api.streaming import ChunkStream, Final
from app.errors import WorkerUnavailable
from app.protocol.generation import GenerationChunk, WireReply


def event(text: str) -> bytes:
    return b"data: " + json.dumps({"choices": [{"delta": {"content": text}}]}).encode() + b"\n\n"


def writes(batches: list[list[Any]], then: BaseException | None = None) -> list[bytes]:
    async def rest() -> AsyncIterator[list[Any]]:
        for batch in batches[1:]:
            yield batch
        if then is not None:
            raise then

    async def run() -> list[bytes]:
        return [chunk async for chunk in _events(ChunkStream(batches[0], rest()))]

    return asyncio.run(run())


def test_one_write_per_batch_and_nothing_after_the_terminal_reply() -> None:
    first = [WireReply(event("a"), stream=True), WireReply(event("b"), stream=True)]
    second = [
        WireReply(event("c"), stream=True),
        WireReply(b"data: [DONE]\n\n", stream=True),
        WireReply(b"", stream=True, done=True),
    ]
    after = [WireReply(event("late"), stream=True)]
    assert writes([first, second, after]) == [
        event("a") + event("b"),
        event("c") + b"data: [DONE]\n\n",
    ]


def test_an_empty_batch_writes_nothing() -> None:
    empty = [WireReply(b"", stream=True)]
    last = [WireReply(b"data: [DONE]\n\n", stream=True, done=True)]
    assert writes([[WireReply(event("a"), stream=True)], empty, last]) == [
        event("a"),
        b"data: [DONE]\n\n",
    ]


def test_a_broken_stream_ends_with_an_error_event_and_done_in_its_last_write() -> None:
    chunks = writes([[WireReply(event("a"), stream=True)]], then=WorkerUnavailable("gone"))
    assert chunks[0] == event("a")
    assert not isinstance(chunks[0], Final)
    assert isinstance(chunks[1], Final)  # the response's last body message
    error_event, done, rest = chunks[1].split(b"\n\n")
    error = json.loads(error_event.decode().removeprefix("data: "))["error"]
    assert error["message"] == "gone"
    assert (done, rest) == (b"data: [DONE]", b"")
    assert len(chunks) == 2


def test_the_terminal_reply_is_the_final_write() -> None:
    last = [WireReply(event("b") + b"data: [DONE]\n\n", stream=True, done=True)]
    chunks = writes([[WireReply(event("a"), stream=True)], last])
    assert [type(chunk) for chunk in chunks] == [bytes, Final]


def test_a_chat_split_ahead_of_its_bill_keeps_its_finish_reason_and_first_text() -> None:
    """The handles' parse of a streamed chat: the finish reason and the first text are the
    whole reply's, though its last events came in a reply of their own (ahead of the bill)."""
    head = event("a")
    ahead = b'data: {"choices":[{"index":0,"delta":{"content":"b"},"finish_reason":"length"}]}\n\n'
    stats = GenerationChunk("", done=True, prompt_tokens=3, completion_tokens=2)
    chat = ChatChunks()
    chunks = [
        *chat.feed(WireReply(head, stream=True)),
        *chat.feed(WireReply(ahead, stream=True)),
        *chat.feed(WireReply(b"data: [DONE]\n\n", stream=True, done=True, stats=stats)),
    ]
    assert [(c.text_delta, c.is_first) for c in chunks[:2]] == [("a", True), ("b", False)]
    assert chunks[-1].done and chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 2
