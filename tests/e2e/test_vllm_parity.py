"""Differential test (issue 15): the same requests go to bare vLLM's OpenAI server
(`python -m vllm.entrypoints.openai.api_server`, started here on the same model directory with
the session stack's engine settings, tool parser and LoRA adapter) and to our stack
(`stack.base_url`), and the replies are compared: status code, response shape (the recursive key
set of the JSON body, or of every SSE event), and the content, which is deterministic in every
case (temperature 0, or a fixed seed): text, tool calls, token ids, logprobs (within 1e-3),
usage; ids, timestamps, fingerprints and prefix-cache hits ignored. A stream's content is
compared per choice index, joined over its events (how deltas are cut into events may differ).

Where we differ from vLLM on purpose, the case says so (`Differs`: the reason, our documented
status and error code, and what vLLM does instead). Differences that hold for every case:
- error bodies: ours `{"error": {"message", "type", "param", "code": <string>}}` plus the
  `X-SIE-Error-Code` header; vLLM's `code` is the HTTP status as an integer;
- response headers: ours carry `X-SIE-Request-ID` (and the other X-SIE-* headers).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.conftest import REAL_MODEL, Stack, wait_serving
from tests.support.sse import parse, payloads

pytestmark = pytest.mark.e2e

TIMEOUT_S = 180
# values that differ between any two servers (or two runs) and say nothing about parity
VOLATILE = frozenset(
    {"id", "created", "created_at", "completed_at", "system_fingerprint", "call_id", "item_id"}
)
# prefix-cache hits depend on what each server served before
CACHE_DEPENDENT = frozenset(
    {"cached_tokens", "cached_tokens_per_turn", "cache_write_tokens", "num_cached_tokens"}
)
# our error code for a status, where a case does not say otherwise
OUR_CODES = {400: "invalid_request", 404: "MODEL_NOT_FOUND", 413: "INPUT_TOO_LONG"}

MODEL = REAL_MODEL
COLORS = [{"role": "user", "content": "Name three colors."}]  # greedy: "1. Red\n2. Blue\n..."
PROMPT = "The three primary colors are"
LONG_PROMPT = "one two three four five six seven eight " * 8
# SmolLM2's tokenizer: " Red", " Blue", " Green", "\n", "<|im_end|>" (eos)
RED, BLUE, GREEN, NEWLINE, EOS = 3950, 10062, 4910, 198, 2
TO_EOS = {str(EOS): 100}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
        },
    },
}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class Differs:
    """A deliberate difference: what we answer (status, error code) and what vLLM answers."""

    reason: str
    status: int
    code: str | None  # our error code (None: a success)
    vllm_status: int
    param: str | None = None  # our error's param, where it matters


@dataclass(frozen=True)
class Case:
    id: str
    path: str
    body: dict[str, Any]
    differs: Differs | None = None
    bug: str | None = None  # a known bug of ours: xfail(strict)
    vllm_body: dict[str, Any] | None = None  # the same request in vLLM's spelling, if it differs


def chat(messages: list[dict[str, Any]] | None = None, **fields: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": COLORS if messages is None else messages,
        "max_tokens": 8,
        "temperature": 0,
        **fields,
    }


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **fields}


def responses(**fields: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "input": "Name three colors.",
        "max_output_tokens": 8,
        "temperature": 0,
        **fields,
    }


CHAT, COMPLETIONS, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/responses"
STREAM_USAGE: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
BEST_OF = "best_of is the SIE contract's (vLLM 0.32 dropped it and ignores it)"
UNKNOWN_FIELD = "a field neither vLLM's request model nor the SIE contract knows is refused"

CASES = [
    # --- plain requests, buffered and streamed
    Case("chat", CHAT, chat()),
    Case("chat-stream", CHAT, chat(**STREAM_USAGE)),
    Case("completion", COMPLETIONS, completion()),
    Case("completion-stream", COMPLETIONS, completion(**STREAM_USAGE)),
    Case("completion-prompt-list", COMPLETIONS, completion(prompt=[PROMPT, "Once upon a time"])),
    Case("completion-token-prompt", COMPLETIONS, completion(prompt=[504, 1075, 4334, 3397, 359])),
    # --- vLLM's extra sampling parameters
    # eos made likely (logit_bias), so that ignore_eos, min_tokens and the special-token
    # options have something to act on
    Case(
        "ignore_eos",
        CHAT,
        chat(max_tokens=4, logit_bias=TO_EOS, ignore_eos=True, return_token_ids=True),
    ),
    Case("min_tokens", CHAT, chat(max_tokens=8, logit_bias={str(EOS): 8}, min_tokens=3)),
    Case("min_p-seeded", CHAT, chat(temperature=1.0, seed=11, min_p=0.2)),
    Case("top_k-seeded", CHAT, chat(temperature=1.0, seed=12, top_k=5)),
    Case("top_p-seeded", COMPLETIONS, completion(temperature=0.8, seed=13, top_p=0.9)),
    Case("seed", CHAT, chat(temperature=1.2, seed=42, max_tokens=12)),
    Case("repetition_penalty", CHAT, chat(max_tokens=16, repetition_penalty=1.5)),
    Case(
        "presence-frequency-penalty",
        COMPLETIONS,
        completion(max_tokens=16, presence_penalty=1.0, frequency_penalty=1.0),
    ),
    Case("stop_token_ids", CHAT, chat(stop_token_ids=[RED])),
    Case(
        "stop-include_stop_str_in_output",
        CHAT,
        chat(stop=[" Blue"], include_stop_str_in_output=True),
    ),
    Case("stop-completion", COMPLETIONS, completion(max_tokens=16, stop=["\n", "."])),
    Case(
        "skip_special_tokens-false",
        CHAT,
        chat(max_tokens=3, logit_bias=TO_EOS, ignore_eos=True, skip_special_tokens=False),
    ),
    Case(
        "spaces_between_special_tokens-false",
        COMPLETIONS,
        completion(
            max_tokens=3,
            logit_bias=TO_EOS,
            ignore_eos=True,
            skip_special_tokens=False,
            spaces_between_special_tokens=False,
        ),
    ),
    Case("chat_template_kwargs", CHAT, chat(chat_template_kwargs={"enable_thinking": False})),
    Case(
        "continuous_usage_stats",
        CHAT,
        chat(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}),
    ),
    Case("logit_bias", CHAT, chat(logit_bias={str(BLUE): 100})),
    Case("allowed_token_ids", CHAT, chat(allowed_token_ids=[RED, BLUE, GREEN, NEWLINE, EOS])),
    Case("bad_words", CHAT, chat(bad_words=["Red", "Blue"])),
    Case("prompt_logprobs", CHAT, chat(max_tokens=2, prompt_logprobs=2)),
    Case("prompt_logprobs-completion", COMPLETIONS, completion(max_tokens=2, prompt_logprobs=1)),
    Case(
        "truncate_prompt_tokens",
        COMPLETIONS,
        completion(prompt=LONG_PROMPT, truncate_prompt_tokens=10),
    ),
    Case(
        "echo-chat",
        CHAT,
        chat(
            echo=True,
            messages=[*COLORS, {"role": "assistant", "content": "1."}],
            add_generation_prompt=False,
            continue_final_message=True,
        ),
    ),
    Case("echo-completion", COMPLETIONS, completion(echo=True, logprobs=1, max_tokens=3)),
    Case("add_generation_prompt-false", CHAT, chat(add_generation_prompt=False)),
    Case(
        "continue_final_message",
        CHAT,
        chat(
            [*COLORS, {"role": "assistant", "content": "The three colors are"}],
            add_generation_prompt=False,
            continue_final_message=True,
        ),
    ),
    Case("priority", CHAT, chat(priority=5)),  # the default (fcfs) scheduler accepts it
    Case("return_token_ids", COMPLETIONS, completion(return_token_ids=True)),
    Case("return_tokens_as_token_ids", CHAT, chat(logprobs=True, return_tokens_as_token_ids=True)),
    Case(
        "use_beam_search",
        COMPLETIONS,
        completion(use_beam_search=True, n=2, max_tokens=4),
        differs=Differs(
            "beam search is refused: it runs one engine request per beam per step, which the "
            "engine's counts bill far above its usage block",
            400,
            "unsupported_field",
            200,
            "use_beam_search",
        ),
    ),
    Case("logprob_token_ids", CHAT, chat(logprobs=True, logprob_token_ids=[RED, BLUE])),
    Case(
        "truncation_side-left",
        COMPLETIONS,
        completion(prompt=LONG_PROMPT, truncate_prompt_tokens=10, truncation_side="left"),
    ),
    Case(
        "repetition_detection",
        COMPLETIONS,
        completion(
            prompt="ha ha ha ha ha ha",
            max_tokens=24,
            repetition_detection={"max_pattern_size": 2, "min_count": 3},
        ),
    ),
    Case("stream_interval", CHAT, chat(stream_interval=3, **STREAM_USAGE)),
    Case("request_id-cache_salt", CHAT, chat(request_id="client-7", cache_salt="salt-7")),
    Case("vllm_xargs", CHAT, chat(vllm_xargs={"note": "x"})),
    Case(
        "max_completion_tokens-user",
        CHAT,
        chat(max_tokens=None, max_completion_tokens=5, user="u7"),
    ),
    # best_of: the SIE contract's (docs/api.md); vLLM 0.32 has none and ignores it
    Case(
        "best_of",
        COMPLETIONS,
        completion(best_of=3, temperature=0.9, seed=3),
        differs=Differs(
            BEST_OF + "; the content is the best of 3 candidates, vLLM's a single sample",
            200,
            None,
            200,
        ),
    ),
    Case(
        "best_of-stream",
        COMPLETIONS,
        completion(best_of=2, temperature=0.9, stream=True),
        differs=Differs(BEST_OF + "; buffered only: a stream is 400", 400, "invalid_request", 200),
    ),
    Case(
        "best_of-greedy",
        COMPLETIONS,
        completion(best_of=2),
        differs=Differs(
            BEST_OF + "; ranking candidates needs sampling: greedy (temperature 0) is refused",
            400,
            "invalid_request",
            200,
        ),
    ),
    Case("suffix", COMPLETIONS, completion(suffix=" and that is all.")),
    Case("response_format-text", CHAT, chat(response_format={"type": "text"})),
    Case("stream-no-usage", CHAT, chat(stream=True, stream_options={"include_usage": False})),
    Case("echo-completion-stream", COMPLETIONS, completion(echo=True, stream=True)),
    Case("return_prompt_text", CHAT, chat(return_prompt_text=True)),
    Case("thinking_token_budget", CHAT, chat(thinking_token_budget=4)),
    Case("documents", CHAT, chat(documents=[{"title": "t", "text": "Colors are nice."}])),
    # --- n > 1 (buffered and streamed: per-choice index)
    Case("n2-chat", CHAT, chat(n=2, temperature=0.9, seed=5)),
    Case("n2-chat-stream", CHAT, chat(n=2, temperature=0.9, seed=6, **STREAM_USAGE)),
    Case(
        "n2-completion-stream", COMPLETIONS, completion(n=2, temperature=0.9, seed=7, stream=True)
    ),
    # --- logprobs
    Case("logprobs-chat", CHAT, chat(logprobs=True, top_logprobs=3)),
    Case("logprobs-chat-stream", CHAT, chat(logprobs=True, top_logprobs=2, stream=True)),
    Case("logprobs-completion", COMPLETIONS, completion(logprobs=3)),
    Case("logprobs-completion-stream", COMPLETIONS, completion(logprobs=2, stream=True)),
    # --- tools through the configured parser (hermes)
    Case(
        "tools-auto",
        CHAT,
        chat(
            [{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER],
            tool_choice="auto",
            max_tokens=24,
        ),
    ),
    Case(
        "tools-required",
        CHAT,
        chat(
            [{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER],
            tool_choice="required",
            max_tokens=40,
        ),
    ),
    Case(
        "tools-named",
        CHAT,
        chat(
            [{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=40,
        ),
    ),
    Case(
        "tools-named-stream",
        CHAT,
        chat(
            [{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=40,
            stream=True,
        ),
    ),
    Case("tools-none", CHAT, chat(tools=[WEATHER], tool_choice="none")),
    Case(
        "tools-auto-stream-no-parallel",
        CHAT,
        chat(
            [{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER],
            parallel_tool_calls=False,
            max_tokens=24,
            stream=True,
        ),
    ),
    # --- structured outputs
    Case(
        "response_format-json_schema",
        CHAT,
        chat(
            max_tokens=40,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": PERSON, "strict": True},
            },
        ),
    ),
    Case(
        "response_format-json_object",
        CHAT,
        chat(max_tokens=16, response_format={"type": "json_object"}),
    ),
    Case(
        "structured_outputs-choice",
        CHAT,
        chat(structured_outputs={"choice": ["red", "green", "blue"]}),
    ),
    Case(
        "structured_outputs-regex",
        COMPLETIONS,
        completion(structured_outputs={"regex": "[A-Z][a-z]{2,6}"}),
    ),
    Case(
        "structured_outputs-json",
        COMPLETIONS,
        completion(max_tokens=40, structured_outputs={"json": PERSON}),
    ),
    Case(
        "structured_outputs-grammar",
        CHAT,
        chat(structured_outputs={"grammar": 'root ::= "yes" | "no"'}),
    ),
    Case(
        "guided_json-removed",
        CHAT,
        chat(guided_json=PERSON),
        differs=Differs(
            "vLLM 0.32 dropped guided_json (now structured_outputs.json) and ignores it as an "
            "unknown field; " + UNKNOWN_FIELD,
            400,
            "unsupported_field",
            200,
            "guided_json",
        ),
    ),
    # --- /tokenize and /detokenize
    Case(
        "tokenize-prompt",
        "/tokenize",
        {"model": MODEL, "prompt": "Hello world", "return_token_strs": True},
    ),
    Case(
        "tokenize-messages",
        "/tokenize",
        {"model": MODEL, "messages": COLORS, "add_generation_prompt": True},
    ),
    Case("tokenize-no-model", "/tokenize", {"prompt": "Hello world"}),
    Case(
        "tokenize-messages-tools",
        "/tokenize",
        {"model": MODEL, "messages": COLORS, "tools": [WEATHER], "return_token_strs": True},
    ),
    Case(
        "tokenize-continue_final_message",
        "/tokenize",
        {
            "model": MODEL,
            "messages": [*COLORS, {"role": "assistant", "content": "Red,"}],
            "add_generation_prompt": False,
            "continue_final_message": True,
            "add_special_tokens": True,
        },
    ),
    Case("detokenize", "/detokenize", {"model": MODEL, "tokens": [19556, 905, RED, BLUE]}),
    # --- /v1/responses
    Case("responses", RESPONSES, responses()),
    Case("responses-instructions", RESPONSES, responses(instructions="Answer in French.")),
    Case("responses-stream", RESPONSES, responses(stream=True)),
    Case(
        "responses-json_schema",
        RESPONSES,
        responses(
            max_output_tokens=40,
            text={"format": {"type": "json_schema", "name": "person", "schema": PERSON}},
        ),
    ),
    Case("responses-prompt_cache_key", RESPONSES, responses(prompt_cache_key="conversation-1")),
    # --- LoRA: vLLM names an adapter (`--lora-modules demo=...`) in `model`; so do we
    Case("lora-model", CHAT, chat(model="demo")),
    Case(
        "lora_adapter-field",
        CHAT,
        chat(lora_adapter="demo"),
        vllm_body=chat(model="demo"),  # the SIE contract's spelling of the same request
    ),
    # --- SIE fields: accepted (vLLM ignores them as unknown fields)
    Case(
        "sie-fields",
        CHAT,
        chat(routing_key="user-7", prompt_cache_key="conversation-1", safety_identifier="u7"),
    ),
    # --- bad inputs
    Case("bad-temperature-type", CHAT, chat(temperature="hot")),
    Case("bad-messages-type", CHAT, {**chat(), "messages": "hello"}),
    Case("bad-missing-messages", CHAT, {"model": MODEL, "max_tokens": 4}),
    Case("bad-missing-role", CHAT, chat([{"content": "hi"}])),
    Case("bad-n3-greedy-stream", CHAT, chat(n=3, stream=True)),  # vLLM: n must be 1 if greedy
    Case("bad-untrusted-chat_template", CHAT, chat(chat_template="{{ messages[0].content }}")),
    Case("bad-responses-type", RESPONSES, responses(max_output_tokens="many")),
    Case("bad-detokenize-out-of-vocab", "/detokenize", {"model": MODEL, "tokens": [10**9]}),
    Case("bad-empty-messages", CHAT, chat([])),
    Case("bad-negative-temperature", CHAT, chat(temperature=-1)),
    Case("bad-top_p", CHAT, chat(top_p=2)),
    Case("bad-max_tokens-negative", COMPLETIONS, completion(max_tokens=-1)),
    Case("bad-n-zero", CHAT, chat(n=0)),
    Case("bad-top_logprobs", CHAT, chat(logprobs=True, top_logprobs=50)),
    Case("bad-min_tokens-over-max", CHAT, chat(min_tokens=10, max_tokens=4)),
    Case(
        "bad-structured-two-kinds", CHAT, chat(structured_outputs={"regex": "a+", "choice": ["a"]})
    ),
    Case("bad-tool_choice-required-no-tools", CHAT, chat(tool_choice="required")),
    Case("bad-stream-with-bad-type", CHAT, chat(stream=True, top_k="many")),
    Case("bad-detokenize-type", "/detokenize", {"model": MODEL, "tokens": "abc"}),
    Case(
        "bad-max_tokens-over-context",
        CHAT,
        chat(max_tokens=5000),
        differs=Differs(
            "prompt + max_tokens over the context: our code is INPUT_TOO_LONG (the SIE "
            "contract's), same status as vLLM",
            400,
            "INPUT_TOO_LONG",
            400,
        ),
    ),
    Case(
        "bad-prompt-too-long",
        COMPLETIONS,
        completion(prompt="hello " * 3000),
        differs=Differs(
            "a prompt over the context: our code is INPUT_TOO_LONG, same status as vLLM",
            400,
            "INPUT_TOO_LONG",
            400,
        ),
    ),
    Case(
        "bad-prompt-too-long-chat",
        CHAT,
        chat([{"role": "user", "content": "hello " * 3000}]),
        differs=Differs(
            "a prompt over the context: our code is INPUT_TOO_LONG, same status as vLLM",
            400,
            "INPUT_TOO_LONG",
            400,
        ),
    ),
    # max_tokens within max_model_len but prompt + max_tokens beyond it: vLLM clamps it to the
    # rest of the context (eos made certain, so that the answer is short)
    Case("max_tokens-clamped", CHAT, chat(max_tokens=2040, logit_bias=TO_EOS)),
    Case("bad-unknown-model", CHAT, chat(model="no/such-model")),
    Case("bad-unknown-model-completion", COMPLETIONS, completion(model="no/such-model")),
    Case(
        "bad-unknown-field",
        CHAT,
        chat(temperture=0.5),
        differs=Differs(
            UNKNOWN_FIELD + " (a typo of temperature)", 400, "unsupported_field", 200, "temperture"
        ),
    ),
    Case(
        "bad-unknown-nested-field",
        CHAT,
        chat(stream=True, stream_options={"include_usage": True, "include_usgae": True}),
        differs=Differs(
            UNKNOWN_FIELD + ", nested ones too",
            400,
            "unsupported_field",
            200,
            "stream_options.include_usgae",
        ),
    ),
    Case(
        "bad-unknown-field-completion",
        COMPLETIONS,
        completion(max_new_tokens=4),
        differs=Differs(UNKNOWN_FIELD, 400, "unsupported_field", 200, "max_new_tokens"),
    ),
]


# --- talking to the two servers


@dataclass
class Reply:
    status: int
    headers: httpx.Headers
    body: Any = None  # the JSON body (not a stream)
    events: list[Any] = field(default_factory=list)  # SSE data payloads, [DONE] excluded
    done: bool = False  # the stream ended with [DONE]
    stream: bool = False
    text: str = ""


def send(client: httpx.Client, case: Case, body: dict[str, Any] | None = None) -> Reply:
    response = client.post(case.path, json=case.body if body is None else body)
    reply = Reply(response.status_code, response.headers, text=response.text)
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        reply.stream = True
        reply.events, reply.done = payloads(parse(response.text))
    else:
        reply.body = response.json()
    return reply


# --- comparing replies


def shape(value: Any, path: str = "") -> set[str]:
    """The recursive key set: one `a.b[].c` path per key (list items merged)."""
    paths: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{key}"
            paths.add(here)
            paths |= shape(item, here)
    elif isinstance(value, list):
        for item in value:
            paths |= shape(item, f"{path}[]")
    return paths


def normalized(value: Any) -> Any:
    """The value without what differs between any two servers (VOLATILE, CACHE_DEPENDENT)."""
    if isinstance(value, dict):
        return {
            key: "<ignored>" if key in VOLATILE | CACHE_DEPENDENT else normalized(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [normalized(item) for item in value]
    return value


def differences(ours: Any, theirs: Any, path: str = "$") -> list[str]:
    """Where two JSON values differ; floats (logprobs) within 1e-3."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        found = (
            [f"{path}: keys {sorted(set(ours) ^ set(theirs))}"] if set(ours) != set(theirs) else []
        )
        for key in sorted(set(ours) & set(theirs)):
            found += differences(ours[key], theirs[key], f"{path}.{key}")
        return found
    if isinstance(ours, list) and isinstance(theirs, list):
        if len(ours) != len(theirs):
            return [f"{path}: {len(ours)} vs {len(theirs)} items: {ours!r:.300} vs {theirs!r:.300}"]
        return [
            d
            for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
            for d in differences(a, b, f"{path}[{i}]")
        ]
    numbers = (int, float)
    if (
        isinstance(ours, numbers)
        and isinstance(theirs, numbers)
        and not isinstance(ours, bool)
        and (isinstance(ours, float) or isinstance(theirs, float))
    ):
        return (
            []
            if math.isclose(ours, theirs, rel_tol=1e-3, abs_tol=1e-3)
            else [f"{path}: {ours} vs {theirs}"]
        )
    return [] if ours == theirs else [f"{path}: {ours!r:.300} vs {theirs!r:.300}"]


def transcript(events: list[Any]) -> dict[str, Any]:
    """What a stream says, independent of how the deltas were cut into events: per choice
    index the joined text (content, reasoning, tool-call names and arguments), the logprob
    entries and token ids, the finish and stop reasons; the last usage; a Responses stream's
    final response object."""
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    final = None
    for event in events:
        if event.get("usage") is not None:
            usage = event["usage"]
        if event.get("type") in ("response.completed", "response.incomplete", "response.failed"):
            final = event.get("response")
        for choice in event.get("choices") or ():
            acc = choices.setdefault(
                choice["index"],
                {"text": "", "reasoning": "", "tools": {}, "logprobs": [], "token_ids": []},
            )
            delta = choice.get("delta") or {}
            acc["text"] += choice.get("text") or delta.get("content") or ""
            acc["reasoning"] += delta.get("reasoning") or ""
            for call in delta.get("tool_calls") or ():
                tool = acc["tools"].setdefault(call["index"], {"name": "", "arguments": ""})
                function = call.get("function") or {}
                tool["name"] += function.get("name") or ""
                tool["arguments"] += function.get("arguments") or ""
            logprobs = choice.get("logprobs") or {}
            acc["logprobs"] += logprobs.get("content") or []  # chat
            for key in ("tokens", "token_logprobs", "top_logprobs"):  # completions
                acc.setdefault(key, []).extend(logprobs.get(key) or [])
            acc["token_ids"] += choice.get("token_ids") or []
            if choice.get("finish_reason") is not None:
                acc["finish_reason"] = choice["finish_reason"]
                acc["stop_reason"] = choice.get("stop_reason")
    return {"choices": choices, "usage": usage, "final": final}


def check_error(reply: Reply, ours: bool, code: str | None) -> None:
    assert not reply.stream, f"an error before the stream must be a JSON reply: {reply.text:.300}"
    error = reply.body.get("error") if isinstance(reply.body, dict) else None
    assert isinstance(error, dict), reply.text
    assert {"message", "type", "param", "code"} <= set(error), error
    if ours:
        assert error["code"] == code, error
        assert reply.headers.get("x-sie-error-code") == code, dict(reply.headers)
    else:
        assert error["code"] == reply.status, error


def compare(case: Case, ours: Reply, theirs: Reply) -> None:
    context = (
        f"{case.id}\n  ours  {ours.status}: {ours.text:.600}"
        f"\n  vLLM  {theirs.status}: {theirs.text:.600}"
    )
    assert "x-sie-request-id" in ours.headers, context  # (c): our headers
    differs = case.differs
    if differs is not None:
        assert (ours.status, theirs.status) == (differs.status, differs.vllm_status), context
        if ours.status >= 400:
            check_error(ours, True, differs.code)
            if differs.param is not None:
                assert ours.body["error"]["param"] == differs.param, context
        elif theirs.status < 400:  # both answer: the same shape, other content
            assert shape(ours.body) == shape(theirs.body), context
        return
    assert ours.status == theirs.status, context
    if ours.status >= 400:
        check_error(ours, True, OUR_CODES.get(ours.status))
        check_error(theirs, False, None)
        return
    assert ours.stream == theirs.stream, context
    if not ours.stream:
        assert shape(ours.body) == shape(theirs.body), (
            f"{context}\n  keys only ours: {sorted(shape(ours.body) - shape(theirs.body))}"
            f"\n  keys only vLLM: {sorted(shape(theirs.body) - shape(ours.body))}"
        )
        found = differences(normalized(ours.body), normalized(theirs.body))
        assert not found, f"{context}\n  " + "\n  ".join(found[:10])
        return
    assert ours.done == theirs.done, context
    assert ours.events and theirs.events, context
    our_shapes = {frozenset(shape(event)) for event in ours.events}
    their_shapes = {frozenset(shape(event)) for event in theirs.events}
    assert our_shapes == their_shapes, (
        f"{context}\n  event shapes only ours: {[sorted(s) for s in our_shapes - their_shapes]}"
        f"\n  event shapes only vLLM: {[sorted(s) for s in their_shapes - our_shapes]}"
    )
    assert shape(ours.events[0]) == shape(theirs.events[0]), context
    assert shape(ours.events[-1]) == shape(theirs.events[-1]), context
    our_story, their_story = transcript(ours.events), transcript(theirs.events)
    assert set(our_story["choices"]) == set(their_story["choices"]), context  # per-choice index
    if [e.get("type") for e in theirs.events if "type" in e]:  # Responses: the event types
        assert {e.get("type") for e in ours.events} == {e.get("type") for e in theirs.events}
    found = differences(normalized(our_story), normalized(their_story))
    assert not found, f"{context}\n  " + "\n  ".join(found[:10])


# --- bare vLLM


@pytest.fixture(scope="module")
def replies(vllm_url: str, stack: Stack) -> dict[str, tuple[Reply | Exception, Reply | Exception]]:
    """Every case's (our reply, vLLM's reply). One server answers all the cases, then the other:
    after each request a vLLM CPU engine busy-polls its queue for about a second
    (shm_broadcast's SpinCondition), which on 2 cores stalls the other server's engine (ours
    runs niced, in a Ray worker) by as much; in turn, each server only waits on itself."""
    answers: dict[str, list[Reply | Exception]] = {case.id: [] for case in CASES}
    for url, vllm in ((vllm_url, True), (stack.base_url, False)):
        if not vllm:
            wait_serving(url)  # bare vLLM's load and busy-polling starved it
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as client:
            for case in CASES:
                try:
                    answer: Reply | Exception = send(client, case, case.vllm_body if vllm else None)
                except Exception as error:  # reported by the case's own test
                    answer = error
                answers[case.id].append(answer)
    return {name: (both[1], both[0]) for name, both in answers.items()}


def params() -> list[Any]:
    return [
        pytest.param(
            case,
            id=case.id,
            marks=[pytest.mark.xfail(strict=True, reason=case.bug)] if case.bug else [],
        )
        for case in CASES
    ]


def test_at_least_forty_cases() -> None:
    assert len(CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", params())
def test_parity(
    case: Case, replies: dict[str, tuple[Reply | Exception, Reply | Exception]]
) -> None:
    ours, theirs = replies[case.id]
    if isinstance(theirs, Exception):
        raise AssertionError(f"bare vLLM did not answer {case.id}") from theirs
    if isinstance(ours, Exception):
        raise AssertionError(f"our stack did not answer {case.id}") from ours
    compare(case, ours, theirs)


def test_compare_catches_differences() -> None:
    """The comparison is not vacuous: another text, a missing key, another status, another
    choice index each fail it."""
    case = Case("self-check", CHAT, chat())
    headers = httpx.Headers({"x-sie-request-id": "r"})

    def reply(body: Any, status: int = 200) -> Reply:
        return Reply(status, headers, body=body, text=json.dumps(body))

    def event_reply(*events: Any) -> Reply:
        return Reply(200, headers, events=list(events), done=True, stream=True)

    base = {"id": "a", "created": 1, "choices": [{"index": 0, "text": "Red", "logprob": -1.0}]}
    compare(case, reply(base), reply({**base, "id": "b", "created": 2}))
    for other in (
        {**base, "choices": [{"index": 0, "text": "Blue", "logprob": -1.0}]},
        {**base, "choices": [{"index": 0, "text": "Red", "logprob": -1.5}]},
        {**base, "choices": [{"index": 0, "text": "Red"}]},
    ):
        with pytest.raises(AssertionError):
            compare(case, reply(base), reply(other))
    with pytest.raises(AssertionError):
        compare(case, reply(base), reply({"error": {"code": 400}}, 400))
    first = {"choices": [{"index": 0, "delta": {"content": "Re"}}]}
    second = {"choices": [{"index": 0, "delta": {"content": "d"}}]}
    merged = {"choices": [{"index": 0, "delta": {"content": "Red"}}]}
    compare(case, event_reply(first, second), event_reply(merged))
    with pytest.raises(AssertionError):
        compare(case, event_reply(first), event_reply(merged))
    with pytest.raises(AssertionError):
        compare(
            case,
            event_reply(merged),
            event_reply({"choices": [{**merged["choices"][0], "index": 1}]}),
        )
