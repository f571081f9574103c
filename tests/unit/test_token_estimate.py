"""The tokens-per-minute reservation against SmolLM2's real token counts (issue 28, "Limits you
can trust"): for chats and completions of every kind of text the ingress's reservation is at
least the engine's prompt tokens (chat template rendered) + the completion budget, and for
English prose it stays within 5x of the prompt. The tokenizer and template are the ones `make
model` writes; without them the test is skipped (tests/e2e/test_tpm_estimate.py checks the
same on the running engine)."""

from __future__ import annotations

import json
import random
import string
from typing import Any

import pytest

from app.api.openai_routes import openai_request
from app.config import AppConfig
from app.engine.default_model import default_model_dir
from app.pools.model import PoolRecord, PoolRequest, spec_from_request
from app.protocol.generation import OpenAIRoute
from app.tenancy.requests import ticket_for

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
CONFIG = AppConfig.model_validate(
    {"models": [{"id": MODEL, "engine": {"max_model_len": 2048}}], "profiles": [{"name": "cpu"}]}
)
RANDOM = random.Random(28)
ENGLISH = (
    "Distributed systems fail in partial ways: a node stops answering while the others go on, "
    "and a client cannot tell a slow reply from a lost one. Explain retries and timeouts. "
)
TEXTS = {
    "english": ENGLISH * 4,
    "code": "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n" * 3,
    "digits": "".join(RANDOM.choice(string.digits) for _ in range(300)),
    "hex": "".join(RANDOM.choice("0123456789abcdef") for _ in range(300)),
    "letters": "".join(RANDOM.choice(string.ascii_letters) for _ in range(300)),
    "punctuation": "".join(RANDOM.choice(string.punctuation) for _ in range(300)),
    "cjk": "我们今天讨论分布式系统的可靠性问题。日本語のテキストも少し。한국어 문장도 있습니다."
    * 3,
    "emoji": "🙂😀🎉🚀🔥💡✨🌍🤖👍🏽🇫🇷👨‍👩‍👧‍👦" * 4,
    "whitespace": "a\n\n\n  b \t\t c" * 10,
    "empty": "",
}


def _tools() -> list[dict[str, Any]]:
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
    return [
        {"type": "function", "function": {"name": "weather", "parameters": parameters}},
    ]


def bodies() -> list[tuple[str, OpenAIRoute, dict[str, Any]]]:
    found: list[tuple[str, OpenAIRoute, dict[str, Any]]] = []
    for name, text in TEXTS.items():
        chat = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4}
        found.append((f"chat-{name}", "chat", chat))
        found.append((f"completion-{name}", "completion", {"model": MODEL, "prompt": text}))
    conversation = [
        {"role": "system", "content": "Answer in French. 答えは短く。"},
        *(
            {"role": "user" if i % 2 == 0 else "assistant", "content": text}
            for i, text in enumerate(TEXTS.values())
        ),
    ]
    found.append(("chat-conversation", "chat", {"model": MODEL, "messages": conversation}))
    parts = [{"type": "text", "text": TEXTS["emoji"]}, {"type": "text", "text": TEXTS["digits"]}]
    found.append(
        ("chat-parts", "chat", {"model": MODEL, "messages": [{"role": "user", "content": parts}]})
    )
    tools = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": _tools(),
    }
    found.append(("chat-tools", "chat", tools))
    batch = {"model": MODEL, "prompt": [TEXTS["hex"], TEXTS["cjk"], "x"], "n": 2}
    found.append(("completion-batch", "completion", batch))
    for _, _, body in found:
        body.setdefault("max_tokens", 8)
    return found


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    directory = default_model_dir()
    if not (directory / "tokenizer.json").exists():
        pytest.skip("the SmolLM2 model is not prepared (make model)")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(directory / "tokenizer.json"))


@pytest.fixture(scope="module")
def template() -> Any:
    import jinja2

    path = default_model_dir() / "chat_template.jinja"
    if not path.exists():
        pytest.skip("the SmolLM2 model is not prepared (make model)")
    return jinja2.Template(path.read_text())


def _content(content: Any) -> str:
    """vLLM's "string" content format: text parts joined by newlines."""
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content)


def real_tokens(tokenizer: Any, template: Any, route: str, body: dict[str, Any]) -> int:
    """The most the engine can count for the request: its prompt tokens + its budget."""
    candidates = body.get("n", 1)
    if route == "chat":
        messages = [{**m, "content": _content(m["content"])} for m in body["messages"]]
        prompts = [template.render(messages=messages, add_generation_prompt=True)]
    else:
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
    return sum(len(tokenizer.encode(p).ids) + candidates * body["max_tokens"] for p in prompts)


def reservation(route: OpenAIRoute, body: dict[str, Any]) -> int:
    request_spec = PoolRequest.model_validate({"name": "metered", "tokens_per_minute": 10**9})
    spec = spec_from_request(request_spec, CONFIG)
    record = PoolRecord(spec=spec, created_at=0.0, last_renewed=0.0, lease_seconds=600)
    raw = json.dumps(body, ensure_ascii=False).encode()
    request = openai_request(CONFIG, route, body, {"x-sie-pool": "metered"}, len(raw))
    return ticket_for(request, CONFIG, record).estimated_tokens


@pytest.mark.parametrize(("name", "route", "body"), bodies(), ids=[b[0] for b in bodies()])
def test_the_reservation_never_falls_short_of_the_real_count(
    tokenizer: Any, template: Any, name: str, route: OpenAIRoute, body: dict[str, Any]
) -> None:
    real = real_tokens(tokenizer, template, route, body)
    reserved = reservation(route, body)
    assert reserved >= real, (name, reserved, real)


def test_english_chat_is_over_reserved_at_most_5x_its_prompt(tokenizer: Any, template: Any) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": ENGLISH * 6}], "max_tokens": 1}
    prompt = real_tokens(tokenizer, template, "chat", body) - 1
    over = (reservation("chat", body) - 1) / prompt
    assert 1 < over <= 5, over
