"""SIE generate requests -> internal `GenerationRequest`s, and the routing headers and model
names every generation route shares. (The OpenAI routes' bodies go to vLLM's own layer on the
worker untouched: app/api/openai_routes.py.)

Fields the contract accepts but this service does not implement yet are refused with
400 `unsupported_field` naming the field, never silently ignored."""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

from app.api.structured import grammar_output
from app.config import AppConfig
from app.errors import (
    InvalidRequest,
    ModelNotFound,
    ModelPathInvalid,
    PayloadTooLarge,
    UnknownLora,
    UnsupportedField,
)
from app.protocol.generation import GenerationRequest, SamplingOptions
from app.protocol.sie import MAX_PROMPT_BYTES, GenerateRequest

POOL_HEADER = "x-sie-pool"
PRIORITY_HEADER = "x-vllm-priority"  # vLLM's own (it wins over the body's `priority` there too)
PRIORITY_RANGE = (-(2**31), 2**31 - 1)
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


def request_priority(headers: Mapping[str, str], body_value: Any = None) -> int | None:
    """vLLM's request priority (lower is served earlier): its header, else the body's
    `priority`; None: the pool's default applies."""
    raw = headers.get(PRIORITY_HEADER)
    param = "X-Vllm-Priority"
    value: Any = body_value
    if raw is not None:
        try:
            value = int(raw.strip())
        except ValueError:
            raise InvalidRequest(f"{param} must be an integer", param=param) from None
    elif body_value is not None:
        param = "priority"
        if isinstance(body_value, bool) or not isinstance(body_value, int):
            raise InvalidRequest("priority must be an integer", param=param)
    if value is None:
        return None
    low, high = PRIORITY_RANGE
    if not low <= value <= high:
        raise InvalidRequest(f"{param} must be within [{low}, {high}]", param=param)
    return int(value)


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
    """The sampling fields of the SIE generate body."""

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
        priority=request_priority(headers),
    )
