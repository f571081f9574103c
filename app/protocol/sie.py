"""SIE gateway wire types: native `/v1/generate/{model}` requests and `/health` replies."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]

SIE_API_VERSION = "0.10.1"
"""The SIE contract version this server speaks (`X-SIE-Server-Version`, the OpenAPI version)."""


class WireModel(BaseModel):
    """Strict, closed request model: no coercion from strings or bools, no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True)


MAX_PROMPT_BYTES = 4 * 1024 * 1024


class Grammar(WireModel):
    json_schema: dict[str, Any] | None = None
    regex: str | None = None
    ebnf: str | None = None
    label: str | None = None
    strict: bool | None = None


class GenerateRequest(WireModel):
    prompt: str
    max_new_tokens: Annotated[int, Field(ge=1, le=2**32 - 1)]
    stream: bool = False
    images: list[dict[str, Any]] | None = None
    stop: list[Annotated[str, Field(min_length=1)]] | None = None
    temperature: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0)] | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    options: dict[str, Any] | None = None
    grammar: Grammar | None = None
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    routing_key: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    lora_adapter: str | None = None


class GenerateUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    model: str
    text: str
    finish_reason: str
    usage: GenerateUsage
    ttft_ms: float | None = None
    tpot_ms: float | None = None


class HealthWorker(BaseModel):
    name: str
    url: str
    gpu: str
    gpu_count: int
    ready_gpu_slots: int
    healthy: bool
    queue_depth: int = 0
    loaded_models: list[str] = Field(default_factory=list)
    bundle: str = ""
    pool: str = "default"
    node_id: str = ""
    state: str = "ready"
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    """Blocks held by live requests' KV handles (the ledger's books)."""
    kv_handles_open: int = 0
    kv_waiting: int = 0
    kv_engine_usage: float = 0.0
    """The engine's own KV usage fraction (vLLM scheduler stats)."""
    engine_preemptions: int = 0
    """Requests the engine preempted since it started (vLLM iteration stats)."""
    engine_prompt_tokens: int = 0
    engine_generation_tokens: int = 0
    """vLLM's own token counters since its engines started (`vllm:prompt_tokens`,
    `vllm:generation_tokens`): what billed usage reconciles with."""
    kv_cached_blocks: int | None = None
    """Blocks the engines' prefix caches hold, from their KV-cache events (null: events off,
    `routing.kv_events`)."""


class HealthCluster(BaseModel):
    worker_count: int
    gpu_count: int
    models_loaded: int
    total_qps: float = 0.0


class HealthModel(BaseModel):
    name: str
    state: str
    worker_count: int
    gpu_types: list[str]
    total_queue_depth: int = 0


class HealthResponse(BaseModel):
    type: str = "gateway"
    status: str
    cluster: HealthCluster
    configured_gpu_types: list[str]
    live_gpu_types: list[str]
    workers: list[HealthWorker]
    models: list[HealthModel]
