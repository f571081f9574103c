"""The HTTP layer over the fake engine, in process (no Ray): shapes, SSE framing, errors."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api.models import tools_supported
from app.config import AppConfig, ModelConfig
from app.server import create_app
from app.web.health import gpus_of
from tests.fakes.local_backend import LocalBackend
from tests.support.sse import DONE, parse

MODEL = "org/fake-model"
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
CHAT = "/v1/chat/completions"
GENERATE = "/v1/generate/org__fake-model"


@pytest.fixture
def backend() -> LocalBackend:
    config = AppConfig.model_validate(
        {
            "engine_adapter": "tests.fakes.fake_engine:FakeAdapter",
            "models": [{"id": MODEL}],
            "ingress": {"max_body_bytes": 64 * 1024},
        }
    )
    return LocalBackend(config)


@pytest.fixture
def client(backend: LocalBackend) -> Iterator[TestClient]:
    with TestClient(create_app(backend.config, backend)) as test_client:
        test_client.portal.call(backend.start)  # type: ignore[union-attr]
        yield test_client


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], **fields}


def sse(text: str) -> list[Any]:
    """The JSON payloads of a streamed body, `[DONE]` kept as it is."""
    return [item if item == DONE else json.loads(item) for item in parse(text)]


def test_big_bodies_wait_on_the_ingress_byte_bucket_and_small_ones_never_do(
    backend: LocalBackend,
) -> None:
    """With the bucket spent (a flood before), a body's bytes beyond UNPACED_BYTES are read at
    the configured rate; a small body neither waits nor touches the bucket."""
    from app.web.pacing import UNPACED_BYTES

    rate = 1 << 20
    ingress = backend.config.ingress.model_copy(
        update={"max_body_bytes": 4 << 20, "body_bytes_per_second": rate}
    )
    config = backend.config.model_copy(update={"ingress": ingress})
    with TestClient(create_app(config, backend)) as test_client:
        test_client.portal.call(backend.start)  # type: ignore[union-attr]
        bucket = test_client.app.state.context.body_bucket  # type: ignore[attr-defined]
        assert bucket.rate == rate and bucket.capacity == 4 << 20
        bucket.take(4 << 20, time.monotonic())  # spent
        spent = (bucket.level, bucket.stamp)
        headers = {"content-type": "application/json"}
        small = json.dumps(chat(max_tokens=1, user="x" * 30_000)).encode()
        assert test_client.post(CHAT, content=small, headers=headers).status_code == 200
        assert (bucket.level, bucket.stamp) == spent  # not touched
        big = json.dumps(chat(max_tokens=1, user="x" * (UNPACED_BYTES + rate // 2))).encode()
        started = time.monotonic()
        assert test_client.post(CHAT, content=big, headers=headers).status_code == 200
        # ~half a second of bytes beyond the unpaced part, at 1 MiB/s (a lower bound only)
        assert time.monotonic() - started >= 0.4


def test_buffered_chat(client: TestClient) -> None:
    response = client.post(CHAT, json=chat(max_tokens=3))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "alpha beta gamma "}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 3
    assert response.headers["x-sie-server-version"]
    assert response.headers["x-sie-request-id"] in body["id"]


def test_max_completion_tokens_wins_over_max_tokens(client: TestClient) -> None:
    body = client.post(CHAT, json=chat(max_tokens=9, max_completion_tokens=2)).json()
    assert body["usage"]["completion_tokens"] == 2


def test_stop_string_ends_with_stop(client: TestClient) -> None:
    body = client.post(CHAT, json=chat(max_tokens=20, stop=["gamma"])).json()
    assert body["choices"][0]["finish_reason"] == "stop"


def test_developer_role_and_text_parts_are_accepted(client: TestClient) -> None:
    messages = [
        {"role": "developer", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "hi"}, {"type": "input_text", "text": " there"}],
        },
    ]
    assert (
        client.post(CHAT, json={"model": MODEL, "messages": messages, "max_tokens": 1}).status_code
        == 200
    )


def test_streamed_chat_framing(client: TestClient) -> None:
    response = client.post(
        CHAT, json=chat(max_tokens=4, stream=True, stream_options={"include_usage": True})
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:] if c["choices"])
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "alpha beta gamma delta "
    finishing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in finishing] == ["length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert len({c["id"] for c in chunks}) == 1


def test_streamed_chat_without_usage_has_no_usage_chunk(client: TestClient) -> None:
    events = sse(client.post(CHAT, json=chat(max_tokens=2, stream=True)).text)
    assert all("usage" not in event for event in events[:-1])


def test_buffered_generate(client: TestClient) -> None:
    response = client.post(GENERATE, json={"prompt": "one two", "max_new_tokens": 2})
    assert response.status_code == 200
    body = response.json()
    assert (body["model"], body["text"], body["finish_reason"]) == (MODEL, "alpha beta ", "length")
    assert body["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 2,
        "total_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 0},  # engines report cached tokens, even 0
    }
    assert body["ttft_ms"] >= 0


def test_streamed_generate_framing(client: TestClient) -> None:
    response = client.post(GENERATE, json={"prompt": "one", "max_new_tokens": 5, "stream": True})
    events = sse(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert len({c["request_id"] for c in chunks}) == 1
    assert [c["done"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert "".join(c["text_delta"] for c in chunks) == "alpha beta gamma delta epsilon "
    terminal = chunks[-1]
    assert terminal["text_delta"] == "" and terminal["finish_reason"] == "length"
    assert terminal["usage"]["completion_tokens"] == 5 and "ttft_ms" in terminal


@pytest.mark.parametrize(
    ("path", "payload", "status", "code", "param"),
    [
        # the OpenAI bodies are vLLM's to validate (tests/e2e/test_vllm_parity.py); the ingress
        # still resolves the model and the LoRA adapter before routing
        (CHAT, chat(lora_adapter="mine"), 400, "unknown_lora", "lora_adapter"),
        (CHAT, chat(model=5), 400, "invalid_request", "model"),
        (
            GENERATE,
            {"prompt": "x", "max_new_tokens": 1, "grammar": {"regex": "a", "ebnf": "b"}},
            400,
            "invalid_request",
            "grammar",
        ),
        (
            GENERATE,
            {"prompt": "x", "max_new_tokens": 1, "grammar": {"ebnf": "root ::= a", "strict": True}},
            400,
            "unsupported_field",
            "grammar",
        ),
        (
            GENERATE,
            {"prompt": "x", "max_new_tokens": 1, "grammar": {"regex": "a" * 5000}},
            413,
            "INPUT_TOO_LONG",
            "grammar",
        ),
        (
            GENERATE,
            {"prompt": "x", "max_new_tokens": 1, "stream": True, "top_logprobs": 2},
            400,
            "invalid_request",
            "top_logprobs",
        ),
        (
            GENERATE,
            {"prompt": "x", "max_new_tokens": 1, "images": [{"data": "AA=="}]},
            400,
            "unsupported_field",
            "images",
        ),
        (
            GENERATE,
            {"prompt": "x", "max_new_tokens": 1, "lora_adapter": "mine"},
            400,
            "unknown_lora",
            "lora_adapter",
        ),
        (
            CHAT,
            {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            404,
            "MODEL_NOT_FOUND",
            "model",
        ),
        (GENERATE, {"prompt": "x"}, 400, "invalid_request", "max_new_tokens"),
        (
            GENERATE,
            {"prompt": "x", "max_new_tokens": 1, "logprobs": True},
            400,
            "unsupported_field",
            "logprobs",
        ),
        (
            GENERATE,
            {"prompt": "x", "max_new_tokens": 1, "extra": 1},
            400,
            "unsupported_field",
            "extra",
        ),
        (
            GENERATE,
            {"prompt": "x", "max_new_tokens": 1, "stop": [""]},
            400,
            "invalid_request",
            "stop[0]",
        ),
        (
            "/v1/generate/org/fake-model",
            {"prompt": "x", "max_new_tokens": 1},
            400,
            "MODEL_NOT_FOUND",
            "model",
        ),
        (
            "/v1/generate/other__model",
            {"prompt": "x", "max_new_tokens": 1},
            404,
            "MODEL_NOT_FOUND",
            "model",
        ),
    ],
)
def test_bad_requests_get_the_contract_error(
    client: TestClient, path: str, payload: dict[str, Any], status: int, code: str, param: str
) -> None:
    response = client.post(path, json=payload)
    assert response.status_code == status, response.text
    body = response.json()
    error = body["error"] if path == CHAT else body["detail"]
    assert (error["code"], error.get("param")) == (code, param)
    assert response.headers["x-sie-error-code"] == code
    assert len(response.headers["x-sie-request-id"]) == 32


def test_malformed_json_wrong_content_type_and_oversized_bodies(client: TestClient) -> None:
    assert (
        client.post(
            CHAT, content=b"{nope", headers={"content-type": "application/json"}
        ).status_code
        == 400
    )
    assert (
        client.post(CHAT, content=b"\xff", headers={"content-type": "application/json"}).status_code
        == 400
    )
    wrong = client.post(
        CHAT, content=b"a=b", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert wrong.status_code == 415
    huge = client.post(CHAT, json=chat(padding="x" * 70_000))
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "INPUT_TOO_LONG"


def test_unknown_routes_and_methods(client: TestClient) -> None:
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json()["detail"]["code"] == "not_found"
    assert client.get(CHAT).status_code == 405


def test_routing_headers(client: TestClient) -> None:
    ok = client.post(
        CHAT,
        json=chat(max_tokens=1),
        headers={"X-SIE-Pool": "DEFAULT", "X-SIE-MACHINE-PROFILE": "CPU"},
    )
    assert ok.status_code == 200
    unknown_pool = client.post(CHAT, json=chat(max_tokens=1), headers={"X-SIE-Pool": "eval"})
    assert (
        unknown_pool.status_code == 404 and unknown_pool.json()["error"]["code"] == "POOL_NOT_FOUND"
    )
    unknown_profile = client.post(
        CHAT, json=chat(max_tokens=1), headers={"X-SIE-MACHINE-PROFILE": "h100"}
    )
    assert unknown_profile.status_code == 400


def test_health_and_models(client: TestClient) -> None:
    health = client.get("/health").json()
    assert health["type"] == "gateway" and health["status"] == "healthy"
    assert health["cluster"]["worker_count"] == 1 and health["workers"][0]["gpu"] == "cpu"
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL] and models["models"] == models["data"]
    assert client.get(f"/v1/models/{MODEL}").json()["state"] == "loaded"
    assert client.get("/v1/models/org/other").status_code == 404
    # a CPU worker holds no GPU; no auto tool choice configured: tools are not offered
    assert health["workers"][0]["gpu_count"] == 0 and health["cluster"]["gpu_count"] == 0
    assert models["data"][0]["capabilities"]["tools"] is False


@pytest.mark.parametrize(
    ("openai", "tools"),
    [
        ({}, False),
        ({"tool_call_parser": "hermes"}, False),
        ({"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}, True),
    ],
)
def test_tools_capability_follows_the_models_tool_settings(
    openai: dict[str, object], tools: bool
) -> None:
    model = ModelConfig.model_validate({"id": MODEL, "openai": openai})
    assert tools_supported(model) is tools


@pytest.mark.parametrize(("num_gpus", "count"), [(0, 0), (0.5, 1), (1, 1), (4, 4)])
def test_gpu_count_is_the_profiles_gpus(num_gpus: float, count: int) -> None:
    config = AppConfig.model_validate(
        {
            "models": [{"id": MODEL, "profiles": ["p"]}],
            "profiles": [{"name": "p", "num_gpus": num_gpus}],
        }
    )
    assert gpus_of(config, "p") == count


def test_nothing_is_left_running_after_requests(client: TestClient, backend: LocalBackend) -> None:
    for _ in range(3):
        client.post(CHAT, json=chat(max_tokens=3, stream=True))
    adapter = backend.workers_by_profile["cpu"]._adapters[MODEL]
    assert adapter.active == set()  # type: ignore[attr-defined]
    assert backend.workers_by_profile["cpu"].active_requests == 0


def test_sse_events_survive_clients_that_split_lines_like_splitlines() -> None:
    """Model text may hold U+2028, U+2029 or U+0085: valid raw in JSON and in SSE, but httpx's
    `iter_lines` (the sie-sdk reads streams with it) breaks lines there too. Each event must
    still arrive as one line that parses back to the same text."""
    from httpx._decoders import LineDecoder

    from app.api.streaming import sse_event

    text = "line\u2028sep\u2029para\x85next \u00e9 \u4e2d \U0001f600"
    event = sse_event({"choices": [{"delta": {"content": text}}]})
    lines = LineDecoder().decode(event.decode("utf-8"))
    assert lines[0].startswith("data: ") and lines[1:] == [""]
    assert json.loads(lines[0][len("data: ") :])["choices"][0]["delta"]["content"] == text
    assert "\u00e9".encode() in event  # other non-ASCII text stays raw UTF-8
