"""HTTP end to end against the running app with the real model: the openai SDK (buffered and
streaming), plain httpx for /v1/generate (buffered and SSE), bad requests, and disconnects."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import REAL_MODEL, Stack
from tests.support.sse import data

pytestmark = pytest.mark.e2e
GENERATE_PATH = "/v1/generate/" + REAL_MODEL.replace("/", "__")


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)


def test_openai_buffered_answers_the_capital_of_france(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=REAL_MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=32,
    )
    assert "Paris" in (completion.choices[0].message.content or "")
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens > 0


def test_openai_streaming(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=REAL_MODEL,
        messages=[{"role": "user", "content": "Count from one to five."}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces).strip()
    assert finish in ("stop", "length")
    assert usage is not None, "include_usage asked for a usage chunk"
    if finish == "length":
        assert usage.completion_tokens == 24
    else:
        assert 0 < usage.completion_tokens < 24
    assert len([piece for piece in pieces if piece]) <= usage.completion_tokens
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="no/such-model", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=REAL_MODEL,
            messages=[{"role": "user", "content": "x"}],
            extra_body={"bogus": True},
        )
    assert caught.value.body["code"] == "unsupported_field"  # type: ignore[index]
    assert [m.id for m in client.models.list().data] == [REAL_MODEL]


def test_generate_buffered(stack: Stack) -> None:
    response = httpx.post(
        stack.base_url + GENERATE_PATH,
        json={"prompt": "The capital of France is", "max_new_tokens": 8, "temperature": 0},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == REAL_MODEL and body["text"]
    assert body["usage"]["completion_tokens"] <= 8 and body["finish_reason"] in ("stop", "length")


def test_generate_sse(stack: Stack) -> None:
    events = []
    with httpx.stream(
        "POST",
        stack.base_url + GENERATE_PATH,
        json={"prompt": "Once upon a time", "max_new_tokens": 16, "stream": True},
        headers={"accept": "text/event-stream"},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        events = list(data(response))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    terminal = chunks[-1]
    assert terminal["done"] and terminal["usage"]["total_tokens"] > 0 and terminal["ttft_ms"] > 0


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        (GENERATE_PATH, {"prompt": "x", "max_new_tokens": 0}, 400, "invalid_request"),
        (GENERATE_PATH, {"prompt": "x", "max_new_tokens": 4000}, 400, "INPUT_TOO_LONG"),
        (
            "/v1/generate/unknown__model",
            {"prompt": "x", "max_new_tokens": 1},
            404,
            "MODEL_NOT_FOUND",
        ),
        ("/v1/chat/completions", {"model": REAL_MODEL, "messages": "hi"}, 400, "invalid_request"),
    ],
)
def test_bad_requests(stack: Stack, path: str, body: dict, status: int, code: str) -> None:  # type: ignore[type-arg]
    response = httpx.post(stack.base_url + path, json=body, timeout=30)
    assert response.status_code == status, response.text
    assert response.headers["x-sie-error-code"] == code


LONG_STREAMS = [
    (GENERATE_PATH, {"prompt": "Tell me a long story.", "max_new_tokens": 1500}),
    (  # through vLLM's OpenAI layer: the KV handle and the engine request must go too
        "/v1/chat/completions",
        {
            "model": REAL_MODEL,
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 1500,
            "ignore_eos": True,
        },
    ),
    ("/v1/completions", {"model": REAL_MODEL, "prompt": "Once", "max_tokens": 1500, "n": 2}),
]


@pytest.mark.parametrize(("path", "body"), LONG_STREAMS, ids=["generate", "chat", "completions"])
def test_client_disconnect_aborts_the_engine_request(
    stack: Stack, path: str, body: dict[str, Any]
) -> None:
    with httpx.stream(
        "POST", stack.base_url + path, json={**body, "stream": True}, timeout=60
    ) as response:
        assert next(data(response))
    assert stack.wait_idle(), f"engine still busy after disconnect: {stack.worker_status()}"


def test_health_reports_the_worker(stack: Stack) -> None:
    health = httpx.get(stack.base_url + "/health", timeout=10).json()
    assert health["type"] == "gateway" and health["status"] == "healthy"
    (worker,) = health["workers"]
    assert worker["gpu"] == "cpu" and worker["healthy"] and worker["loaded_models"] == [REAL_MODEL]
