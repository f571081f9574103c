"""What the tokens-per-minute estimate costs the ingress per request, and how far above the real
token count it reserves (issue 28, "Limits you can trust").

    .venv/bin/python benchmarks/tpm_estimate.py [--tokenizer PATH/tokenizer.json]

Times `app.tenancy.requests.ticket_for` (the limit ticket the ingress builds for every
request, the estimate included) on the envelope `openai_request` builds from each body, for a
pool with a tokens-per-minute limit. With `--tokenizer` (the SmolLM2 `tokenizer.json` that
`make model` writes under ~/.cache/poolserve/models) it also prints each body's reservation
against its real prompt tokens (the chat template rendered as SmolLM2's does, with jinja2) plus
its completion budget: the over-reservation.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from app.api.openai_routes import openai_request
from app.config import AppConfig, Limits
from app.pools.model import PoolRecord, PoolSpec
from app.tenancy.requests import ticket_for

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
ENGLISH = (
    "Distributed systems fail in partial ways: a node stops answering while the others go on, "
    "and a client cannot tell a slow reply from a lost one. Explain how retries, timeouts and "
    "idempotency keys work together, with an example from a payment service. "
)
BODIES: dict[str, tuple[str, dict[str, Any]]] = {
    "chat, 1 short message": (
        "chat",
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 64},
    ),
    "chat, English ~500 tokens": (
        "chat",
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "You are a careful senior engineer."},
                {"role": "user", "content": ENGLISH * 10},
            ],
            "max_tokens": 256,
        },
    ),
    "chat, 8 messages": (
        "chat",
        {
            "model": MODEL,
            "messages": [
                {"role": "user" if i % 2 == 0 else "assistant", "content": ENGLISH}
                for i in range(8)
            ],
            "max_tokens": 128,
        },
    ),
    "completions, 3 prompts": (
        "completion",
        {"model": MODEL, "prompt": [ENGLISH, ENGLISH * 2, "Hello"], "max_tokens": 32},
    ),
}
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def config() -> AppConfig:
    return AppConfig.model_validate(
        {
            "models": [{"id": MODEL, "engine": {"max_model_len": 2048}}],
            "profiles": [{"name": "cpu"}],
        }
    )


def record() -> PoolRecord:
    spec = PoolSpec(name="metered", limits=Limits(tokens_per_minute=1_000_000))
    return PoolRecord(spec=spec, created_at=0.0, last_renewed=0.0, lease_seconds=600)


def real_tokens(tokenizer_path: str, route: str, body: dict[str, Any]) -> int:
    """Prompt tokens as the engine counts them (SmolLM2's template) + the completion budget."""
    import jinja2
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_path)
    if route == "chat":
        text = jinja2.Template(TEMPLATE).render(
            messages=body["messages"], add_generation_prompt=True
        )
        prompts = [text]
    else:
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
    return sum(len(tokenizer.encode(p).ids) + body["max_tokens"] for p in prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", help="a tokenizer.json: print the over-reservation too")
    parser.add_argument("--rounds", type=int, default=20_000)
    args = parser.parse_args()
    app_config, pool = config(), record()
    print(f"load average {os.getloadavg()[0]:.2f}")
    for name, (route, body) in BODIES.items():
        raw = json.dumps(body).encode()
        request = openai_request(app_config, route, body, {"x-sie-pool": "metered"}, len(raw))  # type: ignore[arg-type]
        ticket = ticket_for(request, app_config, pool)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(args.rounds):
                ticket_for(request, app_config, pool)
            best = min(best, (time.perf_counter() - start) / args.rounds)
        line = f"{name:28s} {best * 1e6:6.2f} us  reserves {ticket.estimated_tokens:6d}"
        if args.tokenizer:
            real = real_tokens(args.tokenizer, route, body)
            line += f"  real {real:6d} (prompt + max_tokens)  x{ticket.estimated_tokens / real:.2f}"
        print(line)


if __name__ == "__main__":
    main()
