"""Internal generation types that cross the ingress -> worker boundary through Ray.

Plain frozen dataclasses (cheap to pickle, one Ray object carries a batch of chunks). The
chunk contract follows the SIE generation adapter: zero or more deltas, then exactly one
terminal chunk (`done=True`) carrying the finish reason, usage and timings."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

FinishReason = Literal["stop", "length", "cancelled", "error"]
StructuredKind = Literal["json_schema", "json_object", "regex", "ebnf"]


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """Constrained decoding through the engine's structured-output backend."""

    kind: StructuredKind
    spec: str | None = None  # schema JSON text, regex or EBNF grammar; None for json_object


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
    n: int = 1
    best_of: int | None = None  # OpenAI calls' SIE best_of: candidates in routing's KV estimate
    logprobs: bool = False
    top_logprobs: int = 0
    structured: StructuredOutput | None = None


OpenAIRoute = Literal[
    "chat", "completion", "responses", "tokenize", "detokenize", "messages", "count_tokens"
]
"""vLLM's serving routes the worker answers (`messages`, `count_tokens`: its Anthropic layer)."""


@dataclass(frozen=True, slots=True)
class OpenAICall:
    """An OpenAI-route request that vLLM's own OpenAI layer serves on the worker: the client's
    JSON body untouched and the few headers vLLM reads (X-Request-Id is ours)."""

    route: OpenAIRoute
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()
    size_bytes: int = 0  # of the body as received (big ones travel by reference)


@dataclass(frozen=True, slots=True)
class WireReply:
    """Bytes for the client, made on the worker by vLLM's OpenAI layer and relayed as they are:
    a JSON body (`stream` False, always `done`) or a run of SSE events. The last one (`done`)
    carries `stats`, a terminal chunk with usage and timings for the ingress's metrics."""

    data: bytes
    stream: bool
    done: bool = False
    stats: GenerationChunk | None = None


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation of a `prompt` (SIE generate, handles), or the routing envelope of an
    OpenAI-route call (`openai`), whose `prompt` is then only the text routing hashes."""

    request_id: str
    model: str
    sampling: SamplingOptions
    prompt: str | None = None
    pool: str | None = None
    machine_profile: str | None = None
    routing_key: str | None = None
    prompt_cache_key: str | None = None
    lora_adapter: str | None = None
    openai: OpenAICall | None = None
    """Set on the OpenAI routes: the worker answers with vLLM's OpenAI layer (`WireReply`s);
    the fields above then only route the request (pool, profile, affinity, KV estimate)."""
    prompt_chars: int = 0
    """OpenAI routes: characters of the longest prompt text the call renders (0: not known, or
    the call asks vLLM to truncate). Others: `len(prompt)` is used."""
    key_id: str | None = None
    """The API key's id (never the key): usage and limits are counted per key id."""
    priority: int | None = None
    """vLLM's semantics: lower is served earlier (KV admission, and vLLM's scheduler); None:
    the pool's default."""
    share_weight: float = 1.0
    """The pool's fair-share weight at KV admission (its `gpus`)."""
    share_member: str = ""
    """Who shares the pool's part of an engine's batch equally with the pool's other active
    members: the key id in a pool that shares by key; "": the pool as one."""


@dataclass(slots=True)
class EngineCounts:
    """What the engine did for one request so far, as vLLM's own counters count it: a prompt
    once its engine request produced its first output (prefilled), the cached part of it,
    every token generated. A request can make several engine requests (a completion list,
    `best_of`); they add up. What a request is billed (`app.tenancy.requests.engine_usage`)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    engine_requests: int = 0
    """Engine requests that produced output."""
    open_requests: int = 0
    """Engine requests started and not ended yet: until none is, the counts may still grow
    (a cancelled one is counted as its abort ends, possibly in a task of its own)."""

    def output(self, prompt_tokens: int, cached_tokens: int, produced: int, first: bool) -> None:
        """One engine output of `produced` new tokens (`first`: its engine request's first
        tokens, with which vLLM counts its prompt)."""
        if first:
            self.engine_requests += 1
            self.prompt_tokens += prompt_tokens
            self.cached_tokens += cached_tokens
        self.completion_tokens += produced


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
    choice_index: int = 0
    logprobs: tuple[dict[str, Any], ...] | None = None  # OpenAI token logprobs for text_delta


@dataclass(slots=True)
class ChoiceResult:
    """One candidate of a buffered generation."""

    index: int
    text: str = ""
    finish_reason: FinishReason | None = None
    logprobs: list[dict[str, Any]] | None = None

    def add(self, chunk: GenerationChunk) -> None:
        self.text += chunk.text_delta
        if chunk.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(chunk.logprobs)
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason


@dataclass(slots=True)
class GenerationResult:
    """A whole generation gathered from its chunks (buffered responses)."""

    choices: dict[int, ChoiceResult] = field(default_factory=dict)
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

    def choice(self, index: int) -> ChoiceResult:
        if index not in self.choices:
            self.choices[index] = ChoiceResult(index)
        return self.choices[index]

    @property
    def text(self) -> str:
        return self.choice(0).text

    def add(self, chunk: GenerationChunk) -> None:
        """Fold one chunk in; chunks after the terminal one are ignored."""
        if self.terminated:
            return
        choice = self.choice(chunk.choice_index)
        self.token_ids.extend(chunk.token_ids)
        if not chunk.done:
            choice.add(chunk)
            return
        choice.add(replace(chunk, finish_reason=None))
        self.terminated = True
        self.finish_reason = chunk.finish_reason or "stop"
        for each in self.choices.values():
            if each.finish_reason is None:
                each.finish_reason = self.finish_reason
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


StreamBatch = list[GenerationChunk] | list[WireReply]
"""One coalesced batch of one request's stream: chunks (SIE generation, handles) or the bytes
of vLLM's OpenAI layer (the OpenAI routes)."""
