"""Wire requests (OpenAI chat, SIE generate) -> internal `GenerationRequest`s.

Fields the contract accepts but this service does not implement yet are refused with
400 `unsupported_field` naming the field, never silently ignored."""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

from app.api.structured import chat_output, grammar_output, tools_of
from app.config import AppConfig
from app.errors import (
    InvalidRequest,
    ModelNotFound,
    ModelPathInvalid,
    PayloadTooLarge,
    UnknownLora,
    UnsupportedField,
)
from app.protocol.generation import ChatTurn, GenerationRequest, SamplingOptions, ToolCall
from app.protocol.openai import (
    ChatCompletionRequest,
    ChatMessageIn,
    CompletionRequest,
    ResponsesRequest,
)
from app.protocol.sie import MAX_PROMPT_BYTES, GenerateRequest

POOL_HEADER = "x-sie-pool"
PROFILE_HEADER = "x-sie-machine-profile"
MAX_LOGIT_BIAS_KEYS = 1024


def new_request_id() -> str:
    return uuid.uuid4().hex


def resolve_model(config: AppConfig, model: str) -> str:
    if config.model(model) is None:
        raise ModelNotFound(model)
    return model


def model_from_path(segment: str) -> str:
    """SIE SDK path form: '/' travels as '__' (and '.' may travel as '_dot_')."""
    if "/" in segment:
        raise ModelPathInvalid(
            f"model path '{segment}' contains '/'; send it as '__'", param="model"
        )
    return segment.replace("__", "/").replace("_dot_", ".")


def routing_from_headers(
    config: AppConfig, headers: Mapping[str, str]
) -> tuple[str | None, str | None]:
    pool = (headers.get(POOL_HEADER) or "").strip().lower() or None
    profile = (headers.get(PROFILE_HEADER) or "").strip().lower() or None
    if profile is not None and config.profile(profile) is None:
        known = ", ".join(p.name for p in config.profiles)
        raise InvalidRequest(
            f"unknown machine profile '{profile}' (configured: {known})",
            param="X-SIE-MACHINE-PROFILE",
        )
    return pool, profile


def logit_bias(raw: Mapping[str, float] | None) -> tuple[tuple[int, float], ...]:
    if not raw:
        return ()
    if len(raw) > MAX_LOGIT_BIAS_KEYS:
        raise InvalidRequest(
            f"logit_bias has more than {MAX_LOGIT_BIAS_KEYS} entries", param="logit_bias"
        )
    result = []
    for key, value in raw.items():
        try:
            token_id = int(key)
        except ValueError as error:
            raise InvalidRequest(
                f"logit_bias key '{key}' is not a token id", param="logit_bias"
            ) from error
        if token_id < 0 or not math.isfinite(value) or not -100 <= value <= 100:
            raise InvalidRequest(
                "logit_bias values must be finite in [-100, 100]", param="logit_bias"
            )
        result.append((token_id, float(value)))
    return tuple(result)


class SamplingFields(Protocol):
    """The sampling fields chat, completions and native generate share on the wire."""

    temperature: float | None
    top_p: float | None
    top_k: int | None
    frequency_penalty: float | None
    presence_penalty: float | None
    repetition_penalty: float | None
    seed: int | None
    logit_bias: dict[str, float] | None


def shared_sampling(
    body: SamplingFields, max_new_tokens: int | None, stop: tuple[str, ...], **extra: Any
) -> SamplingOptions:
    """SamplingOptions from the shared wire fields, with the service's defaults."""
    return SamplingOptions(
        max_new_tokens=max_new_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k,
        stop=stop,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        seed=body.seed,
        logit_bias=logit_bias(body.logit_bias),
        **extra,
    )


def chat_turns(messages: list[ChatMessageIn]) -> tuple[ChatTurn, ...]:
    turns = []
    for index, message in enumerate(messages):
        if message.role == "tool" and not message.tool_call_id:
            raise InvalidRequest(
                "tool messages need tool_call_id", param=f"messages[{index}].tool_call_id"
            )
        if message.role != "tool" and message.tool_call_id is not None:
            raise InvalidRequest(
                "only tool messages take tool_call_id", param=f"messages[{index}].tool_call_id"
            )
        if message.tool_calls and message.role != "assistant":
            raise InvalidRequest(
                "only assistant messages take tool_calls", param=f"messages[{index}].tool_calls"
            )
        calls = tuple(
            ToolCall(call.id, call.function.name, call.function.arguments)
            for call in message.tool_calls or ()
        )
        role = "system" if message.role == "developer" else message.role
        turns.append(
            ChatTurn(
                role=role,
                content=_text_content(message, index),
                tool_calls=calls,
                tool_call_id=message.tool_call_id,
                name=message.name,
            )
        )
    return tuple(turns)


def _text_content(message: ChatMessageIn, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for part_index, part in enumerate(message.content):
        if part.type not in ("text", "input_text"):
            raise UnsupportedField(
                f"messages[{index}].content[{part_index}].type",
                f"content part type '{part.type}' is not supported (no vision model is configured)",
            )
        if part.text is None:
            raise InvalidRequest(
                "text part without 'text'", param=f"messages[{index}].content[{part_index}].text"
            )
        parts.append(part.text)
    return "".join(parts)


def _stop(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    values = [stop] if isinstance(stop, str) else stop
    if len(values) > 16 or any(not value for value in values):
        raise InvalidRequest("stop takes up to 16 non-empty strings", param="stop")
    return tuple(values)


def chat_request(
    config: AppConfig, body: ChatCompletionRequest, headers: Mapping[str, str]
) -> GenerationRequest:
    _check_chat_combinations(body)
    max_tokens, _ = body.effective_max_tokens
    pool, profile = routing_from_headers(config, headers)
    tools, tool_choice = tools_of(body)
    return GenerationRequest(
        request_id=new_request_id(),
        model=resolve_model(config, body.model),
        messages=chat_turns(body.messages),
        sampling=shared_sampling(
            body,
            max_tokens,
            _stop(body.stop),
            n=body.n or 1,
            best_of=body.best_of,
            logprobs=bool(body.logprobs),
            top_logprobs=body.top_logprobs or 0,
            structured=chat_output(body, tools, tool_choice),
        ),
        pool=pool,
        machine_profile=profile,
        routing_key=body.routing_key,
        prompt_cache_key=body.prompt_cache_key,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        lora_adapter=check_lora(config, body.model, body.lora_adapter),
    )


def _check_chat_combinations(body: ChatCompletionRequest) -> None:
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs: true", param="top_logprobs")
    if (body.n or 1) > 1 and body.stream:
        raise InvalidRequest("n > 1 cannot be streamed", param="n")
    if body.best_of is not None and body.best_of < (body.n or 1):
        raise InvalidRequest("best_of must be >= n", param="best_of")
    if body.best_of is not None and body.stream:
        raise InvalidRequest("best_of cannot be streamed", param="best_of")
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest("stream_options requires stream: true", param="stream_options")


def check_lora(config: AppConfig, model: str, adapter: str | None) -> str | None:
    if adapter is None:
        return None
    if not adapter:
        raise InvalidRequest("lora_adapter must be a non-empty string", param="lora_adapter")
    served = config.model(model)
    if served is None:
        raise ModelNotFound(model)
    if adapter not in served.lora_adapters:
        raise UnknownLora(adapter, model)
    return adapter


def generate_request(
    config: AppConfig, model: str, body: GenerateRequest, headers: Mapping[str, str]
) -> GenerationRequest:
    if len(body.prompt.encode("utf-8")) > MAX_PROMPT_BYTES:
        raise PayloadTooLarge("prompt is larger than 4 MiB", param="prompt")
    if (body.logprobs or body.top_logprobs is not None) and not body.stream:
        raise UnsupportedField("logprobs", "logprobs are only available on streams")
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs: true", param="top_logprobs")
    if body.images:
        raise UnsupportedField("images", "no vision model is configured")
    pool, profile = routing_from_headers(config, headers)
    return GenerationRequest(
        request_id=new_request_id(),
        model=resolve_model(config, model),
        prompt=body.prompt,
        sampling=shared_sampling(
            body,
            body.max_new_tokens,
            tuple(body.stop or ()),
            logprobs=bool(body.logprobs),
            top_logprobs=body.top_logprobs or 0,
            structured=grammar_output(body.grammar) if body.grammar is not None else None,
        ),
        pool=pool,
        machine_profile=profile,
        routing_key=body.routing_key,
        prompt_cache_key=body.prompt_cache_key,
        lora_adapter=check_lora(config, model, body.lora_adapter),
    )


def completion_request(
    config: AppConfig, body: CompletionRequest, headers: Mapping[str, str]
) -> GenerationRequest:
    if isinstance(body.prompt, list) and len(body.prompt) != 1:
        raise UnsupportedField("prompt", "one prompt per request (send a string)")
    if body.echo:
        raise UnsupportedField("echo")
    if body.suffix is not None:
        raise UnsupportedField("suffix")
    if (body.n or 1) > 1 and body.stream:
        raise InvalidRequest("n > 1 cannot be streamed", param="n")
    if body.best_of is not None and (body.best_of < (body.n or 1) or body.stream):
        raise InvalidRequest("best_of must be >= n and is not streamed", param="best_of")
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest("stream_options requires stream: true", param="stream_options")
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    pool, profile = routing_from_headers(config, headers)
    return GenerationRequest(
        request_id=new_request_id(),
        model=resolve_model(config, body.model),
        prompt=prompt,
        sampling=shared_sampling(
            body,
            body.max_tokens,
            _stop(body.stop),
            n=body.n or 1,
            best_of=body.best_of,
            logprobs=body.logprobs is not None,
            top_logprobs=body.logprobs or 0,
        ),
        pool=pool,
        machine_profile=profile,
        routing_key=body.routing_key,
        prompt_cache_key=body.prompt_cache_key,
        lora_adapter=check_lora(config, body.model, body.lora_adapter),
    )


def responses_request(
    config: AppConfig, body: ResponsesRequest, headers: Mapping[str, str]
) -> GenerationRequest:
    if body.stream:
        raise UnsupportedField("stream", "/v1/responses is buffered only")
    if body.store:
        raise UnsupportedField("store", "responses are not stored")
    turns: list[ChatTurn] = []
    if body.instructions:
        turns.append(ChatTurn("system", body.instructions))
    if isinstance(body.input, str):
        turns.append(ChatTurn("user", body.input))
    else:
        for message in body.input:
            content = message.content
            text = content if isinstance(content, str) else "".join(part.text for part in content)
            turns.append(ChatTurn("system" if message.role == "developer" else message.role, text))
    if not turns:
        raise InvalidRequest("input is empty", param="input")
    pool, profile = routing_from_headers(config, headers)
    return GenerationRequest(
        request_id=new_request_id(),
        model=resolve_model(config, body.model),
        messages=tuple(turns),
        sampling=SamplingOptions(
            max_new_tokens=body.max_output_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
        ),
        pool=pool,
        machine_profile=profile,
    )
