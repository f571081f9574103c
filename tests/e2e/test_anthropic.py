"""The Anthropic Messages API through the official `anthropic` SDK, unmodified, on the session
stack's real model (issue 31): create, system prompt, stop sequences, stream (text deltas and
the final usage), count_tokens, a forced tool call and a tool_result turn; errors 400, 404,
413 and 429 as the SDK's own exceptions; a pool (`X-SIE-Pool`) billed in /v1/usage and
/metrics exactly as the usage blocks say; and `Client.messages` on the handles. The
differential test against bare vLLM is test_anthropic_parity.py; 401 (`x-api-key`) is in
test_security_clients.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from tests.conftest import REAL_MODEL, Stack, wait_serving

pytestmark = pytest.mark.e2e

COLORS: list[Any] = [{"role": "user", "content": "Name three colors."}]
WEATHER: Any = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
    },
}
POOL = "anthropic-e2e"
LIMITED_POOL = "anthropic-e2e-limited"


@pytest.fixture(scope="module")
def client(stack: Stack) -> anthropic.Anthropic:
    wait_serving(stack.base_url)
    return anthropic.Anthropic(base_url=stack.base_url, api_key="unused", max_retries=0)


# anthropic 2.x dropped the sampling parameters from its signatures (temperature, top_p,
# top_k): they travel in `extra_body`, and vLLM's Anthropic layer honours them
GREEDY = {"temperature": 0}


def create(client: anthropic.Anthropic, sampling: Any = GREEDY, **fields: Any) -> Any:
    fields.setdefault("extra_body", {}).update(sampling)
    return client.messages.create(
        **{"model": REAL_MODEL, "max_tokens": 12, "messages": COLORS, **fields}
    )


def text_of(message: Any) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def test_create_with_a_system_prompt_and_stop_sequences(client: anthropic.Anthropic) -> None:
    plain = create(client)
    assert plain.type == "message" and plain.role == "assistant" and plain.model == REAL_MODEL
    assert text_of(plain).strip() and plain.stop_reason in ("end_turn", "max_tokens")
    assert plain.usage.input_tokens > 0 and 0 < plain.usage.output_tokens <= 12
    assert plain._request_id  # the request-id header
    system = create(client, system="Answer in one word.")  # replaces the template's default
    longer = create(client, system="Answer in one word. " * 4)
    assert longer.usage.input_tokens > system.usage.input_tokens  # the system prompt counted
    counted = client.messages.count_tokens(
        model=REAL_MODEL, messages=COLORS, system="Answer in one word."
    )
    assert counted.input_tokens == system.usage.input_tokens
    # a stop sequence taken from the greedy answer cuts it there
    words = text_of(plain).split()
    stop = words[len(words) // 2]
    sampling = {**GREEDY, "top_p": 0.9, "top_k": 20}
    stopped = create(client, sampling, stop_sequences=[stop], metadata={"user_id": "u"})
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert text_of(plain).startswith(text_of(stopped)) and stop not in text_of(stopped)


def test_stream_text_deltas_and_final_usage(client: anthropic.Anthropic) -> None:
    buffered = create(client)
    kinds: list[str] = []
    deltas: list[str] = []
    with client.messages.stream(
        model=REAL_MODEL, max_tokens=12, messages=COLORS, extra_body=GREEDY
    ) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                deltas.append(event.delta.text)
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert {"content_block_start", "content_block_delta", "content_block_stop"} <= set(kinds)
    assert kinds.index("message_delta") > kinds.index("content_block_stop")
    assert len(deltas) > 1  # token by token
    assert "".join(deltas) == text_of(final) == text_of(buffered)
    assert final.usage.output_tokens == buffered.usage.output_tokens
    assert final.usage.input_tokens == buffered.usage.input_tokens
    assert final.stop_reason == buffered.stop_reason


def test_a_forced_tool_call_and_its_result(client: anthropic.Anthropic) -> None:
    """A forced call goes through vLLM's conversion as bare vLLM runs it: SmolLM2-135M's
    arguments are not always JSON, which vLLM's layer refuses with a 400 (never a 5xx); a
    tool_result turn is answered."""
    paris: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    for choice in ({"type": "tool", "name": "get_weather"}, {"type": "any"}, {"type": "auto"}):
        try:
            forced = create(client, messages=paris, tools=[WEATHER], tool_choice=choice)
        except anthropic.BadRequestError as refused:
            assert refused.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
            continue
        calls = [block for block in forced.content if block.type == "tool_use"]
        assert all(call.name == "get_weather" for call in calls)
        assert forced.stop_reason == ("tool_use" if calls else forced.stop_reason)
    call = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
    turn = [
        *paris,
        {"role": "assistant", "content": [call]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 21 C"}
            ],
        },
    ]
    answer = create(client, messages=turn, tools=[WEATHER], max_tokens=16)
    assert answer.stop_reason in ("end_turn", "max_tokens", "tool_use")
    counted = client.messages.count_tokens(model=REAL_MODEL, messages=turn, tools=[WEATHER])
    assert counted.input_tokens == answer.usage.input_tokens


def test_errors_are_the_sdks_own_exceptions(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as not_found:
        create(client, model="no/such-model")
    assert not_found.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as bad:
        create(client, max_tokens=0)
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as unknown:
        create(client, extra_body={"temperture": 0.5})
    assert unknown.value.response.headers["x-sie-error-code"] == "unsupported_field"
    assert "temperture" in unknown.value.message
    with pytest.raises(anthropic.BadRequestError) as too_long:  # over the context
        create(client, max_tokens=5000)
    assert too_long.value.response.headers["x-sie-error-code"] == "INPUT_TOO_LONG"
    with pytest.raises(anthropic.BadRequestError):  # before the first byte of a stream too
        with client.messages.stream(model=REAL_MODEL, max_tokens=0, messages=COLORS) as stream:
            stream.until_done()
    with pytest.raises(anthropic.RequestTooLargeError) as large:  # over max_body_bytes (8 MiB)
        create(client, system="x" * (9 << 20))
    assert large.value.body["error"]["type"] == "request_too_large"  # type: ignore[index]


@pytest.fixture(scope="module")
def pools(stack: Stack) -> Iterator[None]:
    specs = {
        POOL: {"gpus": {"cpu": 1}, "shared": True},
        LIMITED_POOL: {"gpus": {"cpu": 1}, "shared": True, "requests_per_minute": 1},
    }
    for name, spec in specs.items():
        response = httpx.post(f"{stack.base_url}/v1/pools", json={"name": name, **spec}, timeout=30)
        assert response.status_code == 200, response.text
    try:
        yield
    finally:
        for name in specs:
            httpx.delete(f"{stack.base_url}/v1/pools/{name}", timeout=30)


def pool_client(stack: Stack, pool: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=stack.base_url,
        api_key="unused",
        max_retries=8,  # 503 PROVISIONING while the pool gets its share: the SDK waits it out
        default_headers={"X-SIE-Pool": pool},
    )


def test_a_pool_is_billed_what_the_usage_blocks_say(stack: Stack, pools: None) -> None:
    client = pool_client(stack, POOL)
    buffered = create(client)
    with client.messages.stream(
        model=REAL_MODEL, max_tokens=8, messages=COLORS, extra_body=GREEDY
    ) as stream:
        streamed = stream.get_final_message()
    client.messages.count_tokens(model=REAL_MODEL, messages=COLORS)  # not billed
    expected = {
        "requests": 2,
        "prompt_tokens": buffered.usage.input_tokens + streamed.usage.input_tokens,
        "completion_tokens": buffered.usage.output_tokens + streamed.usage.output_tokens,
    }
    deadline = time.monotonic() + 20
    while True:
        report = httpx.get(f"{stack.base_url}/v1/usage", params={"pool": POOL}, timeout=30).json()
        total = {name: report["total"][name] for name in expected}
        if total == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert total == expected, report
    while True:  # the ingress replicas' shares reach /metrics within ~2 s
        metrics = httpx.get(f"{stack.base_url}/metrics", timeout=30).text
        lines = [
            line
            for line in metrics.splitlines()
            if line.startswith("poolserve_usage_requests_total{") and f'pool="{POOL}"' in line
        ]
        if sum(float(line.rsplit(" ", 1)[1]) for line in lines) == 2:
            break
        assert time.monotonic() < deadline + 10, lines
        time.sleep(0.5)


def test_a_pools_limit_is_a_rate_limit_error(stack: Stack, pools: None) -> None:
    client = pool_client(stack, LIMITED_POOL)
    create(client, max_tokens=2)
    with pytest.raises(anthropic.RateLimitError) as limited:
        create(client.with_options(max_retries=0), max_tokens=2)
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert int(limited.value.response.headers["retry-after"]) >= 1


def test_messages_through_the_handles(client: anthropic.Anthropic) -> None:
    from app.handles import connect

    with connect("poolserve") as handles:
        message = handles.messages(COLORS, max_tokens=12, temperature=0, system="Be brief.")
        assert message["type"] == "message" and message["usage"]["output_tokens"] > 0
        via_http = create(client, system="Be brief.")
        assert message["content"][0]["text"] == text_of(via_http)
        with pytest.raises(Exception) as refused:
            handles.messages(COLORS, max_tokens=0)
        assert getattr(refused.value, "status", None) == 400
