"""sageLLM Protocol v0.1 core types (frozen interfaces), field for field as
`isagellm_protocol` 0.5.4.16 defines them: Request, Response, Metrics, Timestamps,
StreamEvent (start/delta/end), Error/ErrorCode, KVAllocateParams, KVHandle."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PROTOCOL_VERSION = "0.1"


class ErrorCode(str, Enum):
    INVALID_ARGUMENT = "invalid_argument"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    NOT_IMPLEMENTED = "not_implemented"
    KV_TRANSFER_FAILED = "kv_transfer_failed"
    COMM_TIMEOUT = "comm_timeout"
    COMM_GROUP_INVALID = "comm_group_invalid"
    DISTRIBUTED_RUNTIME_ERROR = "distributed_runtime_error"
    OPERATOR_NOT_FOUND = "operator_not_found"
    INVALID_OPERATOR_MAPPING = "invalid_operator_mapping"
    OPERATOR_REGISTRATION_FAILED = "operator_registration_failed"
    COMM_BACKEND_NOT_SUPPORTED = "comm_backend_not_supported"
    COMM_RANK_MISMATCH = "comm_rank_mismatch"
    COMM_GROUP_NOT_FOUND = "comm_group_not_found"
    COMM_COLLECTIVE_FAILED = "comm_collective_failed"
    COMM_P2P_FAILED = "comm_p2p_failed"
    KV_PREFETCH_FAILED = "kv_prefetch_failed"
    KV_QOS_CONSTRAINT_VIOLATED = "kv_qos_constraint_violated"
    KV_PRIORITY_QUEUE_FULL = "kv_priority_queue_full"
    COMPRESSION_NOT_SUPPORTED = "compression_not_supported"
    QUANTIZATION_CALIBRATION_FAILED = "quantization_calibration_failed"
    SPECULATIVE_DECODING_FAILED = "speculative_decoding_failed"


class Error(BaseModel):
    model_config = ConfigDict(use_enum_values=False)

    code: ErrorCode
    message: str
    retryable: bool | None = None


class Timestamps(BaseModel):
    """Unix seconds."""

    queued_at: float
    scheduled_at: float
    executed_at: float
    completed_at: float


class Metrics(BaseModel):
    ttft_ms: float = Field(ge=0)
    tbt_ms: float = Field(default=0.0, ge=0)
    tpot_ms: float = Field(default=0.0, ge=0)
    throughput_tps: float = Field(ge=0)
    peak_mem_mb: int = Field(ge=0)
    error_rate: float = Field(ge=0, le=1)
    kv_used_tokens: int = Field(default=0, ge=0)
    kv_used_bytes: int = Field(default=0, ge=0)
    prefix_hit_rate: float = Field(default=0.0, ge=0, le=1)
    evict_count: int = Field(default=0, ge=0)
    evict_ms: float = Field(default=0.0, ge=0)
    spec_accept_rate: float = Field(default=0.0, ge=0, le=1)
    prefill_ms: float = Field(default=0.0, ge=0)
    decode_ms: float = Field(default=0.0, ge=0)
    kv_transfer_count: int = Field(default=0, ge=0)
    kv_transfer_bytes: int = Field(default=0, ge=0)
    kv_transfer_ms: float = Field(default=0.0, ge=0)
    comm_overhead_ms: float = Field(default=0.0, ge=0)
    allreduce_count: int = Field(default=0, ge=0)
    allgather_count: int = Field(default=0, ge=0)
    itl_list: list[float] = Field(default_factory=list)
    timestamps: Timestamps | None = None
    component_trace: list[str] | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "function", "tool"]
    content: str
    name: str | None = None


class Request(BaseModel):
    request_id: str
    trace_id: str
    model: str = ""
    prompt: str = ""
    messages: list[ChatMessage] | None = None
    max_tokens: int = Field(gt=0)
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    kv_budget_tokens: int | None = Field(default=None, gt=0)
    metadata: dict[str, Any] | None = None


class Response(BaseModel):
    request_id: str
    trace_id: str
    output_text: str
    output_tokens: list[int]
    prompt_tokens: int | None = None
    finish_reason: Literal["stop", "length", "error"]
    metrics: Metrics
    error: Error | None = None


class StreamEventStart(BaseModel):
    event: Literal["start"] = "start"
    request_id: str
    trace_id: str
    engine_id: str
    prompt_tokens: int | None = None


class StreamEventDelta(BaseModel):
    event: Literal["delta"] = "delta"
    request_id: str
    trace_id: str
    engine_id: str
    content: str
    content_tokens: list[int]


class StreamEventEnd(BaseModel):
    event: Literal["end"] = "end"
    request_id: str
    trace_id: str
    engine_id: str
    prompt_tokens: int | None = None
    content: str
    output_tokens: list[int]
    finish_reason: Literal["stop", "length", "error"]
    metrics: Metrics
    error: Error | None = None


StreamEvent = Annotated[
    StreamEventStart | StreamEventDelta | StreamEventEnd, Field(discriminator="event")
]


class KVDType(str, Enum):
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"
    INT8 = "int8"


class KVLayout(str, Enum):
    BSHD = "bshd"
    BHSD = "bhsd"


class KVAllocateParams(BaseModel):
    request_id: str
    num_tokens: int = Field(gt=0)
    kv_dtype: KVDType
    layout: KVLayout
    block_size: int = Field(gt=0)
    trace_id: str | None = None
    priority: int = 0
    qos_labels: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)


class KVHandle(BaseModel):
    handle_id: str
    request_id: str
    num_tokens: int
    device: str
