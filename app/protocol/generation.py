"""Internal generation types that cross the ingress -> worker boundary through Ray.

Plain frozen dataclasses (cheap to pickle, one Ray object carries a batch of chunks). The
chunk contract follows the SIE generation adapter: zero or more deltas, then exactly one
terminal chunk (`done=True`) carrying the finish reason, usage and timings."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled", "error", "tool_calls"]


@dataclass(frozen=True, slots=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    max_new_tokens: int | None = None  # None: until the end of the model's context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation: either a raw `prompt` or chat `messages` the worker renders with the
    model's chat template."""

    request_id: str
    model: str
    sampling: SamplingOptions
    prompt: str | None = None
    messages: tuple[ChatTurn, ...] | None = None
    pool: str | None = None
    machine_profile: str | None = None
    routing_key: str | None = None
    prompt_cache_key: str | None = None


@dataclass(frozen=True, slots=True)
class GenerationChunk:
    text_delta: str
    done: bool = False
    is_first: bool = False
    finish_reason: FinishReason | None = None
    token_ids: tuple[int, ...] = ()
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None


@dataclass(slots=True)
class GenerationResult:
    """A whole generation gathered from its chunks (buffered responses)."""

    text: str = ""
    finish_reason: FinishReason = "stop"
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    terminated: bool = False

    def add(self, chunk: GenerationChunk) -> None:
        """Fold one chunk in; chunks after the terminal one are ignored."""
        if self.terminated:
            return
        self.text += chunk.text_delta
        self.token_ids.extend(chunk.token_ids)
        if not chunk.done:
            return
        self.terminated = True
        self.finish_reason = chunk.finish_reason or "stop"
        self.prompt_tokens = chunk.prompt_tokens or 0
        self.completion_tokens = chunk.completion_tokens or 0
        self.cached_tokens = chunk.cached_tokens
        self.error_code = chunk.error_code
        self.error_message = chunk.error_message
        self.ttft_ms = chunk.ttft_ms
        self.tpot_ms = chunk.tpot_ms

    @classmethod
    def collect(cls, chunks: Iterable[GenerationChunk]) -> GenerationResult:
        result = cls()
        for chunk in chunks:
            result.add(chunk)
        return result

    @property
    def failed(self) -> bool:
        return self.finish_reason == "error" or self.error_code is not None
