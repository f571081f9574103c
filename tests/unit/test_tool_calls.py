"""Hermes tool-call parsing and forced tool calls, over chunk streams (pure)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from app.engine.tool_calls import (
    HermesParser,
    ParsedCall,
    ToolCallError,
    forced_call_schema,
    forced_tool_calls,
    parse_tool_calls,
)
from app.protocol.generation import GenerationChunk, GenerationResult, ToolSpec


async def stream(pieces: list[str], finish: str = "stop") -> AsyncIterator[GenerationChunk]:
    for piece in pieces:
        yield GenerationChunk(piece)
    yield GenerationChunk(
        "", done=True, finish_reason=finish, prompt_tokens=3, completion_tokens=len(pieces)
    )  # type: ignore[arg-type]


async def run(pieces: list[str], parallel: bool = True) -> list[GenerationChunk]:
    return [chunk async for chunk in parse_tool_calls(stream(pieces), parallel=parallel)]


def split(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
async def test_calls_split_anywhere_are_found(size: int) -> None:
    text = 'Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><tool_call>{"name": "t", "arguments": {}}</tool_call>'
    chunks = await run(split(text, size))
    result = GenerationResult.collect(chunks)
    assert result.text == "Sure. "
    assert [(c.name, json.loads(c.arguments)) for c in result.choice(0).tool_calls] == [
        ("get_weather", {"city": "Paris"}),
        ("t", {}),
    ]
    assert result.finish_reason == "tool_calls"
    announcements = [c.tool_call for c in chunks if c.tool_call and c.tool_call.id]
    assert [a.index for a in announcements] == [0, 1]  # type: ignore[union-attr]
    assert all(a.id.startswith("call_") and len(a.id) == 29 for a in announcements)  # type: ignore[union-attr]


async def test_text_without_calls_passes_through_including_a_lone_angle_bracket() -> None:
    result = GenerationResult.collect(await run(["a < b and <tool", " is not a tag"]))
    assert result.text == "a < b and <tool is not a tag"
    assert result.finish_reason == "stop" and not result.choice(0).tool_calls


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("<tool_call>{not json}</tool_call>", "MODEL_OUTPUT_PARSE_ERROR"),
        ('<tool_call>{"arguments": {}}</tool_call>', "MODEL_OUTPUT_PARSE_ERROR"),
        ('<tool_call>{"name": "f", "arguments": {}}', "MODEL_OUTPUT_PARSE_ERROR"),
    ],
)
async def test_malformed_calls_end_in_a_typed_error(text: str, code: str) -> None:
    chunks = await run([text])
    assert chunks[-1].done and chunks[-1].finish_reason == "error" and chunks[-1].error_code == code


async def test_second_call_without_parallel_is_refused() -> None:
    one = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    chunks = await run([one + one], parallel=False)
    assert chunks[-1].error_code == "parallel_tool_calls_violated"


def test_parser_holds_back_only_possible_tag_prefixes() -> None:
    parser = HermesParser(parallel=True)
    assert parser.feed("hello <tool_") == ["hello "]
    assert parser.feed('call>{"name": "x"}</tool_call> bye') == [ParsedCall("x", "{}", 0), " bye"]
    with pytest.raises(ToolCallError):
        HermesParser(True).feed("<tool_call>" + "x" * (256 * 1024 + 1))


async def test_forced_calls_become_tool_calls() -> None:
    text = json.dumps([{"name": "f", "arguments": {"x": 1}}])
    chunks = [c async for c in forced_tool_calls(stream(split(text, 4)))]
    result = GenerationResult.collect(chunks)
    assert result.text == ""
    assert [(c.name, c.arguments) for c in result.choice(0).tool_calls] == [("f", '{"x":1}')]
    assert result.finish_reason == "tool_calls"


def test_forced_schema_constrains_names_and_arguments() -> None:
    tools = (
        ToolSpec("f", "", '{"type":"object","properties":{"x":{"type":"integer"}}}'),
        ToolSpec("g"),
    )
    schema = json.loads(forced_call_schema(tools, parallel=False))
    assert schema["maxItems"] == 1 and schema["minItems"] == 1
    names = [variant["properties"]["name"]["const"] for variant in schema["items"]["anyOf"]]
    assert names == ["f", "g"]
