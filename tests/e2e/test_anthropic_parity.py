"""Differential test of the Anthropic Messages API (issue 31), as tests/e2e/test_vllm_parity.py
does for the OpenAI routes: the same requests go to bare vLLM's `/v1/messages` and
`/v1/messages/count_tokens` (its own server, started here on the same model and settings) and
to our stack, and the replies are compared: status, shape (the recursive key set of the body,
or of each event type of a stream) and content (greedy, so deterministic: text, tool calls,
stop reasons, usage; ids ignored). A stream's content is compared joined over its deltas.

Deliberate differences (`Differs` names each case's):
- every error body is Anthropic's, `{"type": "error", "error": {"type", "message"}}` with
  Anthropic's error types (`invalid_request_error`, `not_found_error`, ...) and our code in
  `X-SIE-Error-Code`; vLLM answers its own errors in that shape but with OpenAI's exception
  names as the type (`BadRequestError`, `NotFoundError`), and a body its request model refuses
  in the OpenAI shape (`{"error": {...}}`);
- a field vLLM's Anthropic models do not know is 400 `unsupported_field` (vLLM drops it);
  Anthropic's `cache_control` hint is accepted (vLLM's prefix caching is automatic).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.conftest import REAL_MODEL, Stack, wait_serving
from tests.e2e.test_vllm_parity import (
    TIMEOUT_S,
    Differs,
    differences,
    normalized,
    shape,
)
from tests.support.sse import parse, payloads

pytestmark = pytest.mark.e2e

MESSAGES, COUNT = "/v1/messages", "/v1/messages/count_tokens"
COLORS = [{"role": "user", "content": "Name three colors."}]
WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
    },
}
PARIS = [{"role": "user", "content": "Weather in Paris?"}]
TOOL_TURN = [
    *PARIS,
    {
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
        ],
    },
    {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 21 C"}],
    },
]
ANTHROPIC_TYPES = {400: "invalid_request_error", 404: "not_found_error"}
UNKNOWN_FIELD = "a field vLLM's Anthropic models do not know is refused (vLLM drops it)"


def message(messages: list[dict[str, Any]] | None = None, **fields: Any) -> dict[str, Any]:
    return {
        "model": REAL_MODEL,
        "messages": COLORS if messages is None else messages,
        "max_tokens": 12,
        "temperature": 0,
        **fields,
    }


@dataclass(frozen=True)
class Case:
    id: str
    path: str
    body: dict[str, Any]
    differs: Differs | None = None


FORCED = {"type": "tool", "name": "get_weather"}
CASES = [
    Case("create", MESSAGES, message()),
    Case("system", MESSAGES, message(system="Answer in French.")),
    Case("system-blocks", MESSAGES, message(system=[{"type": "text", "text": "Be brief."}])),
    Case("stream", MESSAGES, message(stream=True)),
    Case("stream-system", MESSAGES, message(system="Answer in French.", stream=True)),
    Case("stop_sequences", MESSAGES, message(stop_sequences=[" Blue", "Green"])),
    Case("stop_sequences-stream", MESSAGES, message(stop_sequences=[" Blue"], stream=True)),
    Case("sampling", MESSAGES, message(top_p=0.9, top_k=20, metadata={"user_id": "u-7"})),
    Case("max_tokens-stop", MESSAGES, message(max_tokens=3)),
    Case(
        "multi-turn", MESSAGES, message([*COLORS, {"role": "assistant", "content": "Red"}, *COLORS])
    ),
    Case(
        "tool-forced", MESSAGES, message(PARIS, tools=[WEATHER], tool_choice=FORCED, max_tokens=40)
    ),
    Case(
        "tool-forced-stream",
        MESSAGES,
        message(PARIS, tools=[WEATHER], tool_choice=FORCED, max_tokens=40, stream=True),
    ),
    Case(
        "tool-any",
        MESSAGES,
        message(PARIS, tools=[WEATHER], tool_choice={"type": "any"}, max_tokens=40),
    ),
    Case(
        "tool-auto",
        MESSAGES,
        message(PARIS, tools=[WEATHER], tool_choice={"type": "auto"}, max_tokens=24),
    ),
    Case("tool_result", MESSAGES, message(TOOL_TURN, tools=[WEATHER], max_tokens=16)),
    Case("count_tokens", COUNT, {"model": REAL_MODEL, "messages": COLORS}),
    Case(
        "count_tokens-system-tools",
        COUNT,
        {"model": REAL_MODEL, "messages": TOOL_TURN, "system": "Be brief.", "tools": [WEATHER]},
    ),
    Case(
        "cache_control",
        MESSAGES,
        message(
            system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
        ),
    ),
    # --- bad inputs
    Case(
        "bad-unknown-model",
        MESSAGES,
        message(model="no/such-model"),
        Differs("Anthropic's type (vLLM: NotFoundError)", 404, "MODEL_NOT_FOUND", 404),
    ),
    Case(
        "bad-max_tokens-zero",
        MESSAGES,
        message(max_tokens=0),
        Differs("Anthropic's shape (vLLM: the OpenAI shape)", 400, "invalid_request", 400),
    ),
    Case(
        "bad-no-max_tokens",
        MESSAGES,
        {"model": REAL_MODEL, "messages": COLORS},
        Differs("Anthropic's shape (vLLM: the OpenAI shape)", 400, "invalid_request", 400),
    ),
    Case(
        "bad-role",
        MESSAGES,
        message([{"role": "tool", "content": "x"}]),
        Differs("Anthropic's shape (vLLM: the OpenAI shape)", 400, "invalid_request", 400),
    ),
    Case(
        "bad-tool_choice-tool-without-name",
        MESSAGES,
        message(PARIS, tools=[WEATHER], tool_choice={"type": "tool"}),
        Differs("Anthropic's shape (vLLM: the OpenAI shape)", 400, "invalid_request", 400),
    ),
    Case(
        "bad-over-context",
        MESSAGES,
        message(max_tokens=5000),
        Differs(
            "Anthropic's type, our INPUT_TOO_LONG (vLLM: BadRequestError)",
            400,
            "INPUT_TOO_LONG",
            400,
        ),
    ),
    Case(
        "bad-unknown-field",
        MESSAGES,
        message(temperture=0.5),
        Differs(UNKNOWN_FIELD, 400, "unsupported_field", 200, "temperture"),
    ),
    Case(
        "bad-unknown-nested-field",
        MESSAGES,
        message([{"role": "user", "content": [{"type": "text", "text": "Hi", "citation": 1}]}]),
        Differs(UNKNOWN_FIELD, 400, "unsupported_field", 200, "messages[0].content[0].citation"),
    ),
]


@dataclass
class Reply:
    status: int
    headers: httpx.Headers
    body: Any = None
    events: list[Any] | None = None


def send(client: httpx.Client, case: Case) -> Reply:
    deadline = time.monotonic() + TIMEOUT_S
    response = client.post(case.path, json=case.body)
    # a worker's heartbeat late on a starved machine: 503 PROVISIONING, waited out as the SDK does
    while response.status_code == 503 and time.monotonic() < deadline:
        time.sleep(float(response.headers.get("retry-after", 1)))
        response = client.post(case.path, json=case.body)
    reply = Reply(response.status_code, response.headers)
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        reply.events, _ = payloads(parse(response.text))
    else:
        reply.body = response.json()
    return reply


def transcript(events: list[Any]) -> dict[str, Any]:
    """What an Anthropic stream says, however its deltas were cut: the event types in order
    (runs of deltas as one), each content block with its deltas joined, the message_start's
    message and the message_delta (stop reason, usage)."""
    types: list[str] = []
    blocks: dict[int, dict[str, Any]] = {}
    story: dict[str, Any] = {"types": types, "blocks": blocks}
    for event in events:
        kind = event["type"]
        if not types or types[-1] != kind or kind != "content_block_delta":
            types.append(kind)
        if kind == "content_block_start":
            blocks[event["index"]] = {"start": event["content_block"], "text": "", "json": ""}
        elif kind == "content_block_delta":
            delta = event["delta"]
            block = blocks[event["index"]]
            block["text"] += delta.get("text") or ""
            block["json"] += delta.get("partial_json") or ""
        elif kind == "message_start":
            story["message"] = event["message"]
        elif kind == "message_delta":
            story["delta"] = {"delta": event["delta"], "usage": event.get("usage")}
    return story


@pytest.fixture(scope="module")
def replies(
    vllm_url: str,  # tests/e2e/conftest.py: bare vLLM, shared with test_vllm_parity
    stack: Stack,
) -> dict[str, tuple[Reply | Exception, Reply | Exception]]:
    """(ours, vLLM's) per case; one server answers every case, then the other (see
    test_vllm_parity.replies: each server only waits on itself)."""
    answers: dict[str, list[Reply | Exception]] = {case.id: [] for case in CASES}
    for url, vllm in ((vllm_url, True), (stack.base_url, False)):
        if not vllm:
            wait_serving(url)
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as client:
            for case in CASES:
                try:
                    answer: Reply | Exception = send(client, case)
                except Exception as error:  # reported by the case's own test
                    answer = error
                answers[case.id].append(answer)
    return {name: (both[1], both[0]) for name, both in answers.items()}


def compare(case: Case, ours: Reply, theirs: Reply) -> None:
    context = f"{case.id}: ours {ours.status} {ours.body or ours.events!r:.400}"
    context += f" | vLLM {theirs.status} {theirs.body or theirs.events!r:.400}"
    differs = case.differs
    if differs is not None:
        assert theirs.status == differs.vllm_status, context
        assert ours.status == differs.status, context
        assert ours.headers["x-sie-error-code"] == differs.code, context
        assert ours.body["type"] == "error", context
        assert ours.body["error"]["type"] == ANTHROPIC_TYPES[ours.status], context
        assert set(ours.body) == {"type", "error"} and ours.body["error"]["message"], context
        if differs.param is not None:
            assert differs.param in ours.body["error"]["message"], context
        return
    assert ours.status == theirs.status, context
    if theirs.status != 200:  # vLLM's own refusal (e.g. a forced tool's arguments not JSON)
        assert ours.body["type"] == "error", context
        assert ours.body["error"]["type"] == ANTHROPIC_TYPES[ours.status], context
        return
    assert ours.headers["request-id"] == ours.headers["x-sie-request-id"], context
    if theirs.events is None:
        assert ours.events is None, context
        assert shape(ours.body) == shape(theirs.body), context
        found = differences(normalized(ours.body), normalized(theirs.body))
    else:
        assert ours.events is not None and theirs.events, context
        our_shapes = {(e["type"], frozenset(shape(e))) for e in ours.events}
        their_shapes = {(e["type"], frozenset(shape(e))) for e in theirs.events}
        assert our_shapes == their_shapes, context
        our_story, their_story = transcript(ours.events), transcript(theirs.events)
        found = differences(normalized(our_story), normalized(their_story))
    assert not found, f"{context}\n  " + "\n  ".join(found[:10])


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_anthropic_parity(
    case: Case, replies: dict[str, tuple[Reply | Exception, Reply | Exception]]
) -> None:
    ours, theirs = replies[case.id]
    if isinstance(theirs, Exception):
        raise AssertionError(f"bare vLLM did not answer {case.id}") from theirs
    if isinstance(ours, Exception):
        raise AssertionError(f"our stack did not answer {case.id}") from ours
    compare(case, ours, theirs)
