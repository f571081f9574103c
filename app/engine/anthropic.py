"""What we add around vLLM's Anthropic layer (`vllm/entrypoints/anthropic/`, which serves
`/v1/messages` and `/v1/messages/count_tokens` on the worker over the same engine as the OpenAI
routes): the fields its request models would silently drop, and its in-band error events in
Anthropic's error types. No vLLM import: openai_frontend.py hands us its models' instances."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

ANTHROPIC_ROUTES = frozenset({"messages", "count_tokens"})
ERROR_EVENT = "event: error\n"
# Anthropic's prompt-caching hint on blocks and tools: vLLM's prefix caching is automatic, so
# it is accepted wherever it appears and needs nothing done
IGNORED_HINTS = frozenset({"cache_control"})


def ignored_fields(raw: Any, model: Any, path: str = "") -> Iterator[str]:
    """Fields of the raw body that vLLM's Anthropic request models do not know (they ignore
    extras instead of keeping them, so they are found by walking the raw body beside the
    validated model), as dotted paths: `temperture`, `messages[0].content[1].citation`."""
    if isinstance(model, BaseModel) and isinstance(raw, dict):
        fields = type(model).model_fields
        names = {field.alias or name: name for name, field in fields.items()} | {
            name: name for name in fields
        }
        for key in sorted(raw):
            if key in IGNORED_HINTS:
                continue
            name = names.get(key)
            if name is None:
                yield f"{path}{key}"
            else:
                yield from ignored_fields(raw[key], getattr(model, name, None), f"{path}{key}.")
    elif isinstance(model, list | tuple) and isinstance(raw, list) and len(raw) == len(model):
        for index, (raw_item, item) in enumerate(zip(raw, model, strict=True)):
            yield from ignored_fields(raw_item, item, f"{path.rstrip('.')}[{index}].")


def error_event_message(event: str) -> str | None:
    """The message of vLLM's in-band `event: error` (None: another event). vLLM's Anthropic
    layer makes one only of a server-side failure (its type `internal_error`)."""
    if not event.startswith(ERROR_EVENT):
        return None
    data = event[len(ERROR_EVENT) :].strip().removeprefix("data:").strip()
    try:
        return str(json.loads(data)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return data


def error_event(error_type: str, message: str) -> str:
    """An in-band error as Anthropic's streams send it."""
    payload = {"type": "error", "error": {"type": error_type, "message": message}}
    return f"{ERROR_EVENT}data: {json.dumps(payload)}\n\n"
