"""The native route's `grammar` -> the engine's constrained decoding, within the limits the
contract puts on schemas and grammars (the OpenAI routes' response_format and tools are vLLM's)."""

from __future__ import annotations

import json
from typing import Any

from app.errors import InvalidRequest, PayloadTooLarge, UnsupportedField
from app.protocol.generation import StructuredOutput
from app.protocol.sie import Grammar

MAX_GRAMMAR_BYTES = 64 * 1024
MAX_REGEX_BYTES = 4 * 1024
MAX_EBNF_BYTES = 8 * 1024
MAX_SCHEMA_DEPTH = 16
MAX_SCHEMA_NODES = 16384
UNSUPPORTED_KEYWORDS = frozenset(
    {"$dynamicRef", "if", "then", "else", "unevaluatedProperties", "dependentSchemas"}
)


def check_schema(schema: Any, param: str) -> str:
    """Validate a JSON Schema against the service's limits; returns it as compact JSON."""
    if not isinstance(schema, dict):
        raise InvalidRequest("a JSON schema must be an object", param=param)
    nodes = 0
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if depth > MAX_SCHEMA_DEPTH:
            raise InvalidRequest(f"schema nesting deeper than {MAX_SCHEMA_DEPTH}", param=param)
        if nodes > MAX_SCHEMA_NODES:
            raise InvalidRequest(f"schema has more than {MAX_SCHEMA_NODES} nodes", param=param)
        if isinstance(value, dict):
            for key, child in value.items():
                if key in UNSUPPORTED_KEYWORDS:
                    raise UnsupportedField(param, f"schema keyword '{key}' is not supported")
                if key == "$ref" and (not isinstance(child, str) or not child.startswith("#")):
                    raise UnsupportedField(param, "only internal '#/...' $ref is supported")
                stack.append((child, depth + 1))
        elif isinstance(value, list):
            stack.extend((child, depth + 1) for child in value)
    text = json.dumps(schema, separators=(",", ":"))
    if len(text.encode()) > MAX_GRAMMAR_BYTES:
        raise PayloadTooLarge("schema is larger than 64 KiB", param=param)
    return text


def grammar_output(grammar: Grammar) -> StructuredOutput:
    """SIE `grammar`: exactly one of json_schema / regex / ebnf."""
    given = [
        name for name in ("json_schema", "regex", "ebnf") if getattr(grammar, name) is not None
    ]
    if len(given) != 1:
        raise InvalidRequest(
            "grammar takes exactly one of json_schema, regex, ebnf", param="grammar"
        )
    if grammar.ebnf is not None:
        if grammar.strict:
            raise UnsupportedField("grammar", "strict is not supported with ebnf")
        if len(grammar.ebnf.encode()) > MAX_EBNF_BYTES:
            raise PayloadTooLarge("ebnf grammar is larger than 8 KiB", param="grammar")
        return StructuredOutput("ebnf", grammar.ebnf)
    if grammar.regex is not None:
        if len(grammar.regex.encode()) > MAX_REGEX_BYTES:
            raise PayloadTooLarge("regex is larger than 4 KiB", param="grammar")
        return StructuredOutput("regex", grammar.regex)
    return StructuredOutput("json_schema", check_schema(grammar.json_schema, "grammar"))
