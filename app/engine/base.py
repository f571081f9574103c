"""The engine contract: a GenerationAdapter turns a GenerationRequest into a stream of
GenerationChunks (zero or more deltas, then exactly one terminal chunk), and closing that
stream early aborts the engine request."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol

from app.errors import InputTooLong, ServiceError
from app.protocol.generation import (
    EngineCounts,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    OpenAICall,
    WireReply,
)
from app.protocol.workers import EngineStats

if TYPE_CHECKING:
    from app.engine.kv_events import KVEventFeed


class Admission(Protocol):
    """What an engine request must pass (`app.kv.admission.KVAdmission`)."""

    def reserve(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        max_new_tokens: int,
        candidates: int = 1,
        namespace: str = "",
    ) -> AbstractAsyncContextManager[Any]:
        """A KV handle for the engine request while the context is open (waits in the queue,
        or refuses). `namespace`: what keeps the engine's prefix cache apart (LoRA, salt)."""

    def prefilled(self, request_id: str) -> None:
        """The engine request's prompt is computed (its first token came)."""

    def refusal_now(self) -> ServiceError | None:
        """The refusal a request arriving now gets whatever its prompt (a full queue), before
        the prompt is rendered; None: it may be admitted."""


class GenerationAdapter(ABC):
    model_id: str
    kv_dtype: str = "float32"
    kv_events: KVEventFeed | None = None  # set before `start`: publish the engine's KV events

    @property
    def dead(self) -> bool:
        """The loaded engine failed for good (its process died): the worker must be replaced."""
        return False

    @abstractmethod
    async def start(self) -> None:
        """Load the model; may take tens of seconds."""

    @abstractmethod
    async def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        """The prompt as the engine will see it (chat template applied), tokenized off the
        event loop: the worker's other streams go on meanwhile."""

    @property
    @abstractmethod
    def context_length(self) -> int: ...

    @abstractmethod
    def generate(
        self, request: GenerationRequest, prompt_token_ids: list[int], counts: EngineCounts
    ) -> AsyncIterator[GenerationChunk]:
        """Stream the generation; raises ServiceError for refusals before the first chunk.
        Every engine output is added to `counts` as it arrives (what the request is billed,
        whether or not its chunks reach the client)."""

    @abstractmethod
    def serve_openai(
        self, call: OpenAICall, request_id: str, admission: Admission, counts: EngineCounts
    ) -> AsyncIterator[WireReply]:
        """An OpenAI-route request answered as vLLM's OpenAI server answers it: one JSON
        `WireReply`, or SSE events ending with a `done` one. Every engine request holds a KV
        handle from `admission` while it runs, and adds its outputs to `counts`; ServiceErrors
        before the first reply are refusals."""

    @abstractmethod
    def stats(self) -> EngineStats: ...

    @abstractmethod
    async def shutdown(self) -> None: ...


def generation_budget(
    prompt_tokens: int, max_new_tokens: int | None, context_length: int, param: str
) -> int:
    """Tokens the request may generate: its max (or the rest of the context); refusals name the
    input when the prompt alone or prompt + max exceeds the context."""
    room = context_length - prompt_tokens
    if room <= 0:
        raise InputTooLong(
            f"prompt has {prompt_tokens} tokens; the model's context is {context_length}",
            param=param,
        )
    budget = room if max_new_tokens is None else max_new_tokens
    if budget > room:
        raise InputTooLong(
            f"prompt ({prompt_tokens} tokens) + max tokens ({budget}) exceeds the "
            f"model's context of {context_length} tokens",
            param=param,
        )
    return budget


class StreamTimer:
    """TTFT (to the first non-empty text) and TPOT (mean gap between later tokens), in ms."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.started = self._clock()
        self.first_text_at: float | None = None
        self.last_token_at: float | None = None

    def saw_text(self) -> bool:
        """Record text arriving now; True if it is the first text of the stream."""
        now = self._clock()
        self.last_token_at = now
        if self.first_text_at is None:
            self.first_text_at = now
            return True
        return False

    def ttft_ms(self) -> float | None:
        return None if self.first_text_at is None else (self.first_text_at - self.started) * 1000

    def tpot_ms(self, completion_tokens: int) -> float | None:
        if self.first_text_at is None or self.last_token_at is None or completion_tokens < 2:
            return None
        return (self.last_token_at - self.first_text_at) * 1000 / (completion_tokens - 1)

    def terminal(
        self,
        finish_reason: FinishReason,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int | None = None,
        text_delta: str = "",
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> GenerationChunk:
        return GenerationChunk(
            text_delta=text_delta,
            done=True,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=cached_tokens,
            error_code=error_code,
            error_message=error_message,
            ttft_ms=self.ttft_ms(),
            tpot_ms=self.tpot_ms(completion_tokens),
        )
