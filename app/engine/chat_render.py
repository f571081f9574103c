"""Chat turns -> the message list a model's chat template renders. Templates without tool
support get the Hermes function-calling system prompt, assistant tool calls as
`<tool_call>` blocks and tool results as `<tool_response>` blocks."""

from __future__ import annotations

import json
from typing import Any

from app.protocol.generation import GenerationRequest, ToolSpec

HERMES_SYSTEM_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within "
    "<tools></tools> XML tags. You may call one or more functions to assist with the user query. "
    "Don't make assumptions about what values to plug into functions. Here are the available "
    "tools: <tools>{tools}</tools>\n"
    "For each function call return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags as follows:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-dict>}}\n</tool_call>'
)


def tool_schema(tool: ToolSpec) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": json.loads(tool.parameters),
        },
    }


def chat_messages(
    request: GenerationRequest, *, template_supports_tools: bool
) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for turn in request.messages or ():
        content = turn.content
        if turn.tool_calls:
            blocks = "\n".join(
                "<tool_call>\n"
                + json.dumps({"name": call.name, "arguments": json.loads(call.arguments or "{}")})
                + "\n</tool_call>"
                for call in turn.tool_calls
            )
            content = f"{content}\n{blocks}" if content else blocks
        if turn.role == "tool" and not template_supports_tools:
            content = f"<tool_response>\n{content}\n</tool_response>"
        messages.append({"role": turn.role, "content": content})
    offer_tools = bool(request.tools) and request.tool_choice != "none"
    if offer_tools and not template_supports_tools:
        tools = "\n".join(json.dumps(tool_schema(tool)) for tool in request.tools)
        prompt = HERMES_SYSTEM_PROMPT.format(tools=tools)
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + prompt}
        else:
            messages.insert(0, {"role": "system", "content": prompt})
    return messages
