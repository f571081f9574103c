"""The Anthropic routes' own pieces, in process over the fake engine (no Ray): Anthropic-shaped
errors with Anthropic's statuses, `x-api-key`, the fields vLLM's Anthropic models would drop,
its in-band error events, and what routing reads of a Messages body. The real answers (the
`anthropic` SDK against vLLM's layer) are tests/e2e/test_anthropic.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from app.api.anthropic_routes import anthropic_error_events
from app.api.errors import error_response
from app.api.openai_routes import _events, prompt_chars, routing_text
from app.api.streaming import ChunkStream
from app.config import AppConfig
from app.engine.anthropic import error_event, error_event_message, ignored_fields
from app.engine.openai_frontend import public_event
from app.errors import (
    ConcurrencyLimited,
    InvalidRequest,
    ModelNotFound,
    Provisioning,
    QueueFull,
    WorkerUnavailable,
)
from app.protocol.generation import WireReply
from app.server import create_app
from tests.fakes.local_backend import LocalBackend

MODEL = "org/fake-model"
MESSAGES = "/v1/messages"
API_KEY = "sk-api-0f1e2d3c4b5a"


def message(**fields: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "hello"}],
        **fields,
    }


def make_client(monkeypatch: pytest.MonkeyPatch, keys: str | None = None) -> TestClient:
    monkeypatch.delenv("POOLSERVE_API_KEYS", raising=False)
    if keys is not None:
        monkeypatch.setenv("POOLSERVE_API_KEYS", keys)
    config = AppConfig.model_validate(
        {
            "engine_adapter": "tests.fakes.fake_engine:FakeAdapter",
            "models": [{"id": MODEL}],
            "ingress": {"max_body_bytes": 64 * 1024},
        }
    )
    backend = LocalBackend(config)
    client = TestClient(create_app(config, backend))
    client.__enter__()
    client.portal.call(backend.start)  # type: ignore[union-attr]
    return client


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    test_client = make_client(monkeypatch)
    yield test_client
    test_client.__exit__(None, None, None)


def anthropic_error(response: Any, status: int, kind: str, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and set(body) == {"type", "error"}, body
    assert body["error"]["type"] == kind, body
    if code is not None:
        assert response.headers["x-sie-error-code"] == code
    message: str = body["error"]["message"]
    assert message
    return message


def test_ingress_errors_are_anthropic_shaped(client: TestClient) -> None:
    unknown = client.post(MESSAGES, json=message(model="nope/model"))
    assert "nope/model" in anthropic_error(unknown, 404, "not_found_error", "MODEL_NOT_FOUND")
    headers = {"content-type": "application/json"}
    bad_json = client.post(MESSAGES, content=b"{not json", headers=headers)
    anthropic_error(bad_json, 400, "invalid_request_error", "invalid_request")
    anthropic_error(client.post(MESSAGES, json=[1]), 400, "invalid_request_error")
    no_model = client.post(MESSAGES, json={"max_tokens": 4, "messages": []})
    assert "model" in anthropic_error(no_model, 400, "invalid_request_error")
    big = client.post(MESSAGES, json=message(system="x" * 70_000))
    anthropic_error(big, 413, "request_too_large", "INPUT_TOO_LONG")
    text = client.post(MESSAGES, content=b"hi", headers={"content-type": "text/plain"})
    anthropic_error(text, 415, "invalid_request_error")
    anthropic_error(client.get(MESSAGES), 405, "invalid_request_error", "method_not_allowed")
    anthropic_error(client.post(f"{MESSAGES}/nope", json={}), 404, "not_found_error")
    tokens = client.post(f"{MESSAGES}/count_tokens", json={"model": "nope", "messages": []})
    anthropic_error(tokens, 404, "not_found_error", "MODEL_NOT_FOUND")
    # the fake engine serves no Messages: a worker's refusal has the same shape
    refused = client.post(MESSAGES, json=message())
    assert "messages" in anthropic_error(refused, 400, "invalid_request_error")


@pytest.mark.parametrize(
    ("error", "status", "kind", "retry_after"),
    [
        (QueueFull("the queue is full"), 529, "overloaded_error", "1"),
        (Provisioning("no worker yet"), 503, "overloaded_error", "5"),
        (ConcurrencyLimited("too many streams"), 429, "rate_limit_error", "1"),
        (ModelNotFound("m"), 404, "not_found_error", None),
        (InvalidRequest("bad"), 400, "invalid_request_error", None),
        (RuntimeError("secret internals"), 500, "api_error", None),
    ],
)
def test_statuses_and_types_are_anthropics(
    error: Exception, status: int, kind: str, retry_after: str | None
) -> None:
    response = error_response(error, "anthropic")
    assert response.status_code == status
    body = json.loads(bytes(response.body))
    assert body["error"]["type"] == kind
    assert "secret internals" not in body["error"]["message"]
    assert response.headers.get("retry-after") == retry_after


def test_x_api_key_is_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    client = make_client(monkeypatch, API_KEY)
    try:
        missing = client.post(MESSAGES, json=message())
        assert "x-api-key" in anthropic_error(missing, 401, "authentication_error")
        wrong = client.post(MESSAGES, json=message(), headers={"x-api-key": "sk-wrong"})
        assert "sk-wrong" not in anthropic_error(wrong, 401, "authentication_error")
        empty = client.post(MESSAGES, json=message(), headers={"x-api-key": " "})
        anthropic_error(empty, 401, "authentication_error")
        right = client.post(MESSAGES, json=message(), headers={"x-api-key": API_KEY})
        anthropic_error(right, 400, "invalid_request_error")  # past the key: the fake's refusal
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert (
            client.post("/v1/chat/completions", json=chat, headers={"x-api-key": API_KEY})
        ).status_code == 200  # every route takes it
    finally:
        client.__exit__(None, None, None)


class Block(BaseModel):
    type: str
    text: str | None = None


class Message(BaseModel):
    role: str
    content: str | list[Block]


class Body(BaseModel):
    model: str
    messages: list[Message]
    metadata: dict[str, Any] | None = None


def test_ignored_fields_are_found_at_any_depth_except_cache_control() -> None:
    raw: dict[str, Any] = {
        "model": "m",
        "metadata": {"user_id": "u", "anything": 1},  # a free-form dict: not walked
        "messages": [
            {"role": "user", "content": "hi", "cache_control": {"type": "ephemeral"}},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a", "cache_control": {}, "citation": 1}],
            },
        ],
    }
    assert list(ignored_fields(raw, Body.model_validate(raw))) == [
        "messages[1].content[0].citation"
    ]
    raw["temperture"] = 0.5
    assert list(ignored_fields(raw, Body.model_validate(raw))) == [
        "messages[1].content[0].citation",
        "temperture",
    ]


def test_vllms_in_band_error_becomes_an_api_error_without_internals() -> None:
    vllm_event = error_event("internal_error", "Traceback: /secret/path.py")
    assert error_event_message(vllm_event) == "Traceback: /secret/path.py"
    assert error_event_message('event: ping\ndata: {"type": "ping"}\n\n') is None
    public = public_event(vllm_event, "req-1")
    payload = json.loads(public.split("data: ", 1)[1])
    assert public.startswith("event: error\n")
    assert payload["error"]["type"] == "api_error"
    assert "secret" not in payload["error"]["message"] and "req-1" in payload["error"]["message"]
    text = 'event: content_block_delta\ndata: {"delta": {"text": "hi"}}\n\n'
    assert public_event(text, "req-1") == text


def test_a_broken_stream_ends_with_an_anthropic_error_event() -> None:
    start = WireReply(b'event: message_start\ndata: {"type": "message_start"}\n\n', stream=True)

    async def rest() -> AsyncIterator[list[Any]]:
        raise WorkerUnavailable("the worker went away")
        yield []

    async def run() -> list[bytes]:
        stream = ChunkStream([start], rest())
        return [chunk async for chunk in _events(stream, anthropic_error_events)]

    writes = asyncio.run(run())
    assert writes[0] == start.data
    assert writes[1].startswith(b"event: error\ndata: ")
    error = json.loads(writes[1].split(b"data: ", 1)[1])
    assert error == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "the worker went away"},
    }
    assert len(writes) == 2  # no [DONE]: Anthropic's streams have none


def test_routing_reads_the_system_prompt_and_block_texts() -> None:
    body = {
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}],
    }
    assert routing_text("messages", body) == "\x1esystem\x1fBe brief.\x1euser\x1fHi there"
    assert prompt_chars("messages", body) == len("Be brief.") + len("Hi there")
    assert prompt_chars("count_tokens", {**body, "system": "abc"}) == 3 + len("Hi there")
