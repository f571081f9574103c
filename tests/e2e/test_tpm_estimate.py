"""The tokens-per-minute reservation against the real engine's counts (issue 28, "Limits you
can trust"): for a varied set of chats and completions (English, code, digits, CJK, emoji,
several messages, a system message, tools, n > 1, a batch of prompts) the reservation the
service makes is at least the prompt tokens the engine counts (SmolLM2's chat template
included) + the completion budget, so never under by 10 % of the real count.

The reservation is read where the service states it: a pool whose `tokens_per_minute` is 1
refuses every request with 400 "this request may use N tokens", N being the request's
reservation. The same body then runs on the default pool, whose usage block is the engine's
count."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from tests.conftest import REAL_MODEL, Stack

pytestmark = pytest.mark.e2e
POOL = "tpm-probe"
ENGLISH = (
    "Distributed systems fail in partial ways: a node stops answering while the others go on. "
    "Explain how retries, timeouts and idempotency keys work together. "
)
CODE = "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n" * 3
DIGITS = "3141592653 5897932384 6264338327 9502884197 1693993751 0582097494 4592307816 " * 3
CJK = "我们今天讨论分布式系统的可靠性问题。请用中文回答。日本語のテキストも少し。한국어 문장도." * 2
EMOJI = "🙂😀🎉🚀🔥💡✨🌍🤖👍🏽🇫🇷👨‍👩‍👧‍👦" * 3
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def chat(*messages: tuple[str, Any], **extra: Any) -> tuple[str, dict[str, Any]]:
    body = {
        "model": REAL_MODEL,
        "messages": [{"role": role, "content": content} for role, content in messages],
        "max_tokens": 12,
        "temperature": 0,
        **extra,
    }
    return "/v1/chat/completions", body


CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "english": chat(("user", ENGLISH * 3)),
    "code": chat(("user", "Explain this code:\n" + CODE)),
    "digits": chat(("user", DIGITS)),
    "cjk": chat(("user", CJK)),
    "emoji": chat(("user", EMOJI), ignore_eos=True),
    "short": chat(("user", "Hi")),
    "system and several messages": chat(
        ("system", "Answer briefly, in French."),
        ("user", "What is 2 + 2?"),
        ("assistant", "4"),
        ("user", [{"type": "text", "text": "And 3 x 3? "}, {"type": "text", "text": EMOJI}]),
        ("assistant", "9"),
        ("user", "Thanks! " + DIGITS[:40]),
    ),
    "tools": chat(("user", "What is the weather in Paris?"), tools=TOOLS),
    "n=2": chat(("user", ENGLISH), n=2, temperature=0.8, ignore_eos=True),
    "completion": (
        "/v1/completions",
        {"model": REAL_MODEL, "prompt": CODE + DIGITS, "max_tokens": 10, "ignore_eos": True},
    ),
    "completion batch": (
        "/v1/completions",
        {"model": REAL_MODEL, "prompt": [ENGLISH, CJK, EMOJI], "max_tokens": 6, "temperature": 0},
    ),
    "responses": (
        "/v1/responses",
        {"model": REAL_MODEL, "input": ENGLISH + CJK, "max_output_tokens": 8},
    ),
}


def reservation(stack: Stack, path: str, body: dict[str, Any]) -> int:
    response = httpx.post(
        stack.base_url + path, json=body, headers={"X-SIE-Pool": POOL}, timeout=60
    )
    assert response.status_code == 400, response.text
    found = re.search(r"may use (\d+) tokens", response.json()["error"]["message"])
    assert found is not None, response.text
    return int(found.group(1))


def usage(stack: Stack, path: str, body: dict[str, Any]) -> tuple[int, int]:
    response = httpx.post(stack.base_url + path, json=body, timeout=120)
    assert response.status_code == 200, response.text
    counted = response.json()["usage"]
    if "input_tokens" in counted:  # the Responses API's names
        return counted["input_tokens"], counted["output_tokens"]
    return counted["prompt_tokens"], counted["completion_tokens"]


def test_the_reservation_never_falls_short_of_the_engines_count(stack: Stack) -> None:
    created = httpx.post(
        f"{stack.base_url}/v1/pools",
        json={"name": POOL, "gpus": {"cpu": 1}, "shared": True, "tokens_per_minute": 1},
        timeout=30,
    )
    assert created.status_code == 200, created.text
    rows = []
    try:
        for name, (path, body) in CASES.items():
            reserved = reservation(stack, path, body)
            prompt, completion = usage(stack, path, body)
            prompts = len(body["prompt"]) if isinstance(body.get("prompt"), list) else 1
            budget = prompts * body.get("n", 1) * (body.get("max_tokens") or 0)
            budget = budget or body.get("max_output_tokens", 0)
            rows.append((name, reserved, prompt, completion, budget))
    finally:
        httpx.delete(f"{stack.base_url}/v1/pools/{POOL}", timeout=30)
    for name, reserved, prompt, completion, _ in rows:
        print(
            f"{name:28s} reserved {reserved:5d}  engine {prompt:4d} + {completion:3d}"
            f"  x{reserved / (prompt + completion):.2f}"
        )
    for name, reserved, prompt, completion, budget in rows:
        assert completion <= budget, (name, completion, budget)
        assert reserved >= 0.9 * (prompt + completion), (name, reserved, prompt, completion)
        assert reserved >= prompt + budget, (name, reserved, prompt, budget)  # not even 1 short
