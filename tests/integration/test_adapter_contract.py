"""The engine contract, held against both engines: one list of scenarios runs through the fake
engine (tests/fakes/fake_engine.py) and the real vLLM adapter (app/engine/vllm_adapter.py), each
already loaded in the session's Serve apps (`fake`, `poolserve`), and the shapes of their chunk
sequences must be equal, so the layers tested over the fake see the chunks vLLM makes.

A shape keeps what the layers above rely on (which chunk ends the stream and what it carries,
per-choice runs of deltas, finish reasons, logprob entries per token, usage and timings) and
drops what may differ between engines (the words, how many tokens one engine step delivers)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import groupby
from typing import Any

import pytest

from app.errors import ServiceError
from app.protocol.generation import (
    GenerationChunk,
    GenerationRequest,
    OpenAICall,
    SamplingOptions,
    StructuredOutput,
)
from tests.conftest import FAKE_MODEL, REAL_MODEL, Stack
from tests.support.sse import DONE, parse
from tests.support.worker_calls import worker_items

pytestmark = pytest.mark.integration

PROMPT = "The quick brown fox"
ENGINES = {"fake": ("fake", FAKE_MODEL), "vllm": ("poolserve", REAL_MODEL)}


@dataclass(frozen=True)
class Scenario:
    name: str
    sampling: SamplingOptions
    check: Callable[[list[GenerationChunk]], None] = field(default=lambda chunks: None)
    """Checks of content both engines must pass (the shape says nothing of the words)."""


def _regex_matched(chunks: list[GenerationChunk]) -> None:
    assert re.fullmatch("(yes|no)", "".join(c.text_delta for c in chunks)), chunks


def _eight_tokens(chunks: list[GenerationChunk]) -> None:
    assert chunks[-1].completion_tokens == 8 and chunks[-1].finish_reason == "length", chunks


def _two_choices(chunks: list[GenerationChunk]) -> None:
    texts = {i: "".join(c.text_delta for c in chunks if c.choice_index == i) for i in (0, 1)}
    assert texts[0] and texts[1], texts


SCENARIOS = [
    Scenario(
        "length", SamplingOptions(max_new_tokens=8, temperature=0.0, ignore_eos=True), _eight_tokens
    ),
    Scenario("one-token", SamplingOptions(max_new_tokens=1, temperature=0.0, ignore_eos=True)),
    Scenario(
        "logprobs",
        SamplingOptions(
            max_new_tokens=5, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2
        ),
    ),
    Scenario(
        "n=2",
        SamplingOptions(max_new_tokens=4, temperature=0.8, seed=7, ignore_eos=True, n=2),
        _two_choices,
    ),
    Scenario(
        "regex",
        SamplingOptions(
            max_new_tokens=8, temperature=0.0, structured=StructuredOutput("regex", "(yes|no)")
        ),
        _regex_matched,
    ),
    Scenario("greedy-n=2-refused", SamplingOptions(max_new_tokens=4, temperature=0.0, n=2)),
    Scenario("over-long-refused", SamplingOptions(max_new_tokens=1_000_000, temperature=0.0)),
]


def run(stack: Stack, engine: str, sampling: SamplingOptions) -> list[Any]:
    """The adapter's items as the Generator streams them, batches flattened (coalescing only
    groups chunks; a refusal is the stream's one item)."""
    app, model = ENGINES[engine]
    request = GenerationRequest(uuid.uuid4().hex, model, sampling, prompt=PROMPT)
    items: list[Any] = []
    for batch in worker_items(stack.handle("Generator-cpu", app), request):
        items.extend(batch if isinstance(batch, list) else [batch])
    return items


def delta_shape(chunk: GenerationChunk) -> tuple[Any, ...]:
    """A chunk without its words and token count."""
    logprobs: Any = None
    if chunk.logprobs is not None:
        per_token = len(chunk.logprobs) == len(chunk.token_ids)
        logprobs = (
            "per-token" if per_token else "count-mismatch",
            sorted({key for entry in chunk.logprobs for key in entry}),
            sorted({len(entry["top_logprobs"]) for entry in chunk.logprobs}),
        )
    return (bool(chunk.text_delta), bool(chunk.token_ids), chunk.finish_reason, logprobs)


def shape(items: list[Any]) -> dict[str, Any]:
    """What the layers above rely on, and nothing an engine may legitimately vary."""
    if len(items) == 1 and isinstance(items[0], ServiceError):
        return {"refused": (type(items[0]).__name__, items[0].status, items[0].code)}
    assert all(isinstance(item, GenerationChunk) for item in items), items
    chunks: list[GenerationChunk] = items
    terminal = chunks[-1]
    body = chunks[:-1]
    per_choice = {
        index: [key for key, _ in groupby(delta_shape(c) for c in body if c.choice_index == index)]
        for index in sorted({c.choice_index for c in body})
    }
    tokens = sum(len(c.token_ids) for c in chunks)
    first_text = next((c for c in chunks if c.text_delta), None)
    return {
        "terminals": [i for i, c in enumerate(chunks) if c.done] == [len(chunks) - 1],
        "terminal": (*delta_shape(terminal), terminal.choice_index),
        "terminal_finish": terminal.finish_reason,
        "choices": per_choice,
        "is_first_once_on_first_text": (
            first_text is not None and first_text.is_first and sum(c.is_first for c in chunks) == 1
        ),
        "usage": (
            bool(terminal.prompt_tokens),
            terminal.completion_tokens == tokens,
            type(terminal.cached_tokens).__name__,
        ),
        "timings": (
            terminal.ttft_ms is not None and terminal.ttft_ms >= 0,
            terminal.tpot_ms is not None if tokens >= 2 else terminal.tpot_ms is None,
        ),
        "errors": (terminal.error_code, terminal.error_message),
    }


@pytest.fixture(scope="module")
def shapes(stack: Stack) -> dict[str, dict[str, Any]]:
    """Every scenario on both engines once; the tests below read the results."""
    return {
        scenario.name: {
            engine: (items := run(stack, engine, scenario.sampling), shape(items))
            for engine in ENGINES
        }
        for scenario in SCENARIOS
    }


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_the_fake_makes_the_chunk_shapes_vllm_makes(
    shapes: dict[str, dict[str, Any]], scenario: Scenario
) -> None:
    (fake_items, fake), (real_items, real) = (
        shapes[scenario.name]["fake"],
        shapes[scenario.name]["vllm"],
    )
    assert fake == real, f"fake: {fake_items}\nvllm: {real_items}"
    if "refused" not in real:
        assert real["terminals"] and real["is_first_once_on_first_text"], real
        for items in (fake_items, real_items):
            scenario.check(items)


def test_a_stop_string_ends_the_text_before_it_on_both_engines(stack: Stack) -> None:
    """The stop string (a word from each engine's own free run) is cut out, the text before
    it kept, and the terminal chunk says `stop`: same shape on both."""
    results = {}
    for engine in ENGINES:
        free_sampling = SamplingOptions(max_new_tokens=16, temperature=0.0, ignore_eos=True)
        free = "".join(c.text_delta for c in run(stack, engine, free_sampling))
        stop = free.split()[2]
        items = run(
            stack,
            engine,
            SamplingOptions(max_new_tokens=16, temperature=0.0, ignore_eos=True, stop=(stop,)),
        )
        text = "".join(c.text_delta for c in items)
        assert stop not in text and free.startswith(text), (engine, free, stop, text)
        results[engine] = shape(items)
    fake, real = results["fake"], results["vllm"]
    assert fake["terminal_finish"] == real["terminal_finish"] == "stop"
    # the terminal carries the token that completed the stop string; its text may be empty
    assert fake["terminal"][1:] == real["terminal"][1:] and real["terminal"][1] is True
    assert {k: v for k, v in fake.items() if k not in ("terminal", "choices")} == {
        k: v for k, v in real.items() if k not in ("terminal", "choices")
    }


# --- the OpenAI routes: the fake's imitation of vLLM's wire shapes (serve_openai)

CHAT = {"messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "ignore_eos": True}
OPENAI_SCENARIOS = {
    "chat-stream-usage": (
        "chat",
        {**CHAT, "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}},
    ),
    "chat-stream": ("chat", {**CHAT, "max_tokens": 6, "stream": True}),
    "chat-buffered": ("chat", {**CHAT, "max_tokens": 6}),
    "completion-stream-usage": (
        "completion",
        {
            "prompt": PROMPT,
            "max_tokens": 6,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ),
    "completion-buffered": (
        "completion",
        {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True},
    ),
}


def run_openai(stack: Stack, engine: str, route: str, body: dict[str, Any]) -> list[Any]:
    """The wire events of one OpenAI-route call as the worker makes them (JSON payloads;
    `[DONE]` kept), or the one JSON body of a buffered call."""
    app, model = ENGINES[engine]
    call = OpenAICall(route, {**body, "model": model})  # type: ignore[arg-type]
    request = GenerationRequest(uuid.uuid4().hex, model, SamplingOptions(), openai=call)
    replies = [
        reply
        for batch in worker_items(stack.handle("Generator-cpu", app), request)
        for reply in batch
    ]
    data = b"".join(reply.data for reply in replies).decode()
    if not replies[-1].stream:
        return [json.loads(data)]
    return [item if item == DONE else json.loads(item) for item in parse(data)]


def without_nulls(value: Any) -> Any:
    """vLLM writes every optional field, mostly as null; clients read null as absent."""
    if isinstance(value, dict):
        return {key: without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [without_nulls(item) for item in value]
    return value


def wire_shape(payloads: list[Any]) -> list[Any]:
    """Each event's type and keys (and its choices' and deltas' keys, whether text or a finish
    reason is there; nulls dropped), runs of equal events collapsed: what a client's parser
    meets, without the words."""

    def one(payload: Any) -> Any:
        if payload == DONE:
            return DONE
        payload = without_nulls(payload)
        choices = tuple(
            (
                tuple(sorted(choice)),
                tuple(sorted(choice.get("delta") or choice.get("message") or {})),
                bool((choice.get("delta") or choice.get("message") or {}).get("content"))
                or bool(choice.get("text")),
                choice.get("finish_reason") is not None,
            )
            for choice in payload.get("choices", [])
        )
        usage = tuple(sorted(payload["usage"])) if payload.get("usage") else None
        return (payload.get("object"), tuple(sorted(payload)), choices, usage)

    return [key for key, _ in groupby(one(payload) for payload in payloads)]


@pytest.mark.parametrize("scenario", OPENAI_SCENARIOS)
def test_the_fakes_openai_replies_have_vllms_wire_shape(stack: Stack, scenario: str) -> None:
    route, body = OPENAI_SCENARIOS[scenario]
    fake = run_openai(stack, "fake", route, body)
    real = run_openai(stack, "vllm", route, body)
    assert wire_shape(fake) == wire_shape(real), f"fake: {fake}\nvllm: {real}"


# --- the comparison itself (no Ray)


def _reference() -> list[GenerationChunk]:
    """A vLLM-like stream: two deltas, then a terminal chunk carrying the last token."""
    return [
        GenerationChunk("The", is_first=True, token_ids=(1,)),
        GenerationChunk(" quick", token_ids=(2,)),
        GenerationChunk(
            " fox",
            done=True,
            finish_reason="length",
            token_ids=(3,),
            prompt_tokens=4,
            completion_tokens=3,
            cached_tokens=0,
            ttft_ms=1.0,
            tpot_ms=2.0,
        ),
    ]


MUTATIONS: dict[str, Callable[[list[GenerationChunk]], list[GenerationChunk]]] = {
    "terminal without text": lambda c: [
        *c[:-1],
        replace(c[-1], text_delta="", token_ids=()),
    ],
    "no terminal": lambda c: c[:-1],
    "two terminals": lambda c: [replace(c[0], done=True), *c[1:]],
    "second choice": lambda c: [*c[:-1], replace(c[1], choice_index=1), c[-1]],
    "logprobs": lambda c: [
        replace(x, logprobs=({"token": "x", "logprob": 0.0, "bytes": [], "top_logprobs": []},))
        for x in c
    ],
    "finish reason": lambda c: [*c[:-1], replace(c[-1], finish_reason="stop")],
    "usage off by one": lambda c: [*c[:-1], replace(c[-1], completion_tokens=2)],
    "no cached tokens": lambda c: [*c[:-1], replace(c[-1], cached_tokens=None)],
    "no ttft": lambda c: [*c[:-1], replace(c[-1], ttft_ms=None)],
    "is_first twice": lambda c: [c[0], replace(c[1], is_first=True), c[2]],
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_the_shape_sees_each_difference_the_contract_names(mutation: str) -> None:
    """No Ray needed: the comparison above fails on each of these differences."""
    assert shape(MUTATIONS[mutation](_reference())) != shape(_reference())


def test_the_shape_ignores_words_and_tokens_per_step() -> None:
    merged = _reference()
    merged = [
        replace(merged[0], text_delta="A slow", token_ids=(7, 8)),
        replace(merged[2], text_delta=" cat", token_ids=(9,), completion_tokens=3),
    ]
    assert shape(merged) == shape(_reference())
