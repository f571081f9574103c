"""Tool calls in generated text: the Hermes `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
format (used by the default model's ChatML family and many others), streamed as OpenAI-shaped
deltas: per call an announcement (id + name) and then its arguments, finish reason
`tool_calls`. Also the forced modes (`tool_choice` required or named), where the engine is
constrained to a JSON document that is turned into calls at the end."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from app.protocol.generation import GenerationChunk, ToolCallDelta, ToolSpec

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
MAX_BUFFER_CHARS = 256 * 1024
MAX_ARGUMENTS_CHARS = 64 * 1024
PARSE_ERROR = "MODEL_OUTPUT_PARSE_ERROR"
PARALLEL_VIOLATION = "parallel_tool_calls_violated"


class ToolCallError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class ParsedCall:
    name: str
    arguments: str
    index: int = 0


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_call_body(body: str) -> ParsedCall:
    """`{"name": ..., "arguments": {...}}` -> compact JSON arguments."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError as error:
        raise ToolCallError(PARSE_ERROR, f"tool call is not valid JSON: {error}") from error
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        raise ToolCallError(PARSE_ERROR, "tool call has no 'name'")
    arguments = value.get("arguments", value.get("parameters"))
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            raise ToolCallError(PARSE_ERROR, "tool call arguments are not JSON") from error
    text = json.dumps(arguments, separators=(",", ":"), ensure_ascii=False)
    if len(text) > MAX_ARGUMENTS_CHARS:
        raise ToolCallError(PARSE_ERROR, "tool call arguments are larger than 64 KiB")
    return ParsedCall(value["name"], text)


class HermesParser:
    """Incremental parser for one choice: text outside blocks passes through (a tail that might
    begin an open tag is held back), each closed block becomes a call."""

    def __init__(self, parallel: bool) -> None:
        self._parallel = parallel
        self._buffer = ""
        self._in_call = False
        self.calls = 0

    def feed(self, text: str) -> list[str | ParsedCall]:
        self._buffer += text
        events: list[str | ParsedCall] = []
        while True:
            if self._in_call:
                end = self._buffer.find(CLOSE_TAG)
                if end < 0:
                    if len(self._buffer) > MAX_BUFFER_CHARS:
                        raise ToolCallError(PARSE_ERROR, "unterminated tool call over 256 Ki chars")
                    return events
                body, self._buffer = self._buffer[:end], self._buffer[end + len(CLOSE_TAG) :]
                self._in_call = False
                if self.calls and not self._parallel:
                    raise ToolCallError(
                        PARALLEL_VIOLATION, "a second tool call with parallel_tool_calls=false"
                    )
                events.append(replace(parse_call_body(body.strip()), index=self.calls))
                self.calls += 1
                continue
            start = self._buffer.find(OPEN_TAG)
            if start >= 0:
                if start:
                    events.append(self._buffer[:start])
                self._buffer = self._buffer[start + len(OPEN_TAG) :]
                self._in_call = True
                continue
            keep = _partial_tag_length(self._buffer)
            if len(self._buffer) > keep:
                events.append(self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep :]
            return events

    def finish(self) -> list[str | ParsedCall]:
        if self._in_call:
            raise ToolCallError(PARSE_ERROR, "the output ended inside a tool call")
        rest, self._buffer = self._buffer, ""
        return [rest] if rest else []


def _partial_tag_length(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of the open tag."""
    for length in range(min(len(OPEN_TAG) - 1, len(text)), 0, -1):
        if OPEN_TAG.startswith(text[-length:]):
            return length
    return 0


def call_chunks(call: ParsedCall, choice_index: int = 0) -> list[GenerationChunk]:
    """The two deltas of one call: announcement (id + name), then the arguments."""
    announcement = ToolCallDelta(call.index, new_call_id(), call.name, "")
    body = ToolCallDelta(call.index, arguments_delta=call.arguments)
    return [
        GenerationChunk("", choice_index=choice_index, tool_call=announcement),
        GenerationChunk("", choice_index=choice_index, tool_call=body),
    ]


def _error_terminal(
    terminal: GenerationChunk | None, error: ToolCallError, choice: int
) -> GenerationChunk:
    base = terminal or GenerationChunk("", done=True)
    return replace(
        base,
        text_delta="",
        done=True,
        finish_reason="error",
        error_code=error.code,
        error_message=error.message,
        choice_index=choice,
        logprobs=None,
    )


async def parse_tool_calls(
    chunks: AsyncIterator[GenerationChunk], *, parallel: bool
) -> AsyncIterator[GenerationChunk]:
    """Wrap an engine stream: Hermes blocks become tool-call deltas, per choice."""
    parsers: dict[int, HermesParser] = {}
    try:
        async for chunk in chunks:
            choice = chunk.choice_index
            parser = parsers.setdefault(choice, HermesParser(parallel))
            try:
                events = parser.feed(chunk.text_delta)
                if chunk.finish_reason is not None or chunk.done:
                    events += parser.finish()
            except ToolCallError as error:
                yield _error_terminal(chunk if chunk.done else None, error, choice)
                return
            for event in events:
                if isinstance(event, str):
                    yield GenerationChunk(event, choice_index=choice)
                else:
                    for call_chunk in call_chunks(event, choice):
                        yield call_chunk
            if chunk.finish_reason is not None or chunk.done:
                finish = chunk.finish_reason
                if parser.calls and finish in ("stop", None):
                    finish = "tool_calls"
                yield replace(chunk, text_delta="", logprobs=None, finish_reason=finish)
                if chunk.done:
                    return
    finally:
        await _close(chunks)


def forced_call_schema(tools: tuple[ToolSpec, ...], *, parallel: bool) -> str:
    """JSON Schema for `tool_choice` required/named: an array of {name, arguments} calls, each
    naming one of `tools` with arguments valid against that tool's parameters."""
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": json.loads(tool.parameters)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    schema: dict[str, object] = {"type": "array", "items": {"anyOf": variants}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return json.dumps(schema, separators=(",", ":"))


def parse_forced_calls(text: str) -> list[ParsedCall]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ToolCallError(
            PARSE_ERROR, f"constrained tool-call output is not JSON: {error}"
        ) from error
    if not isinstance(value, list) or not value:
        raise ToolCallError(PARSE_ERROR, "constrained tool-call output is not a non-empty array")
    return [
        replace(parse_call_body(json.dumps(item)), index=index) for index, item in enumerate(value)
    ]


async def forced_tool_calls(
    chunks: AsyncIterator[GenerationChunk],
) -> AsyncIterator[GenerationChunk]:
    """Wrap an engine stream constrained by `forced_call_schema`: hold the JSON text back and
    emit it as tool calls when each choice finishes (finish reason `tool_calls`)."""
    texts: dict[int, str] = {}
    try:
        async for chunk in chunks:
            choice = chunk.choice_index
            texts[choice] = texts.get(choice, "") + chunk.text_delta
            if chunk.finish_reason is None and not chunk.done:
                continue
            if chunk.finish_reason == "length":
                yield replace(chunk, text_delta="", logprobs=None)
                if chunk.done:
                    return
                continue
            try:
                calls = parse_forced_calls(texts.pop(choice, ""))
            except ToolCallError as error:
                yield _error_terminal(chunk if chunk.done else None, error, choice)
                return
            for call in calls:
                for call_chunk in call_chunks(call, choice):
                    yield call_chunk
            finish = "tool_calls" if chunk.finish_reason in ("stop", None) else chunk.finish_reason
            yield replace(chunk, text_delta="", logprobs=None, finish_reason=finish)
            if chunk.done:
                return
    finally:
        await _close(chunks)


async def _close(chunks: AsyncIterator[GenerationChunk]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()
