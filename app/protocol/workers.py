"""What a worker reports about itself (heartbeats to the registry, `/health`, the dashboard)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

ModelState = Literal["loading", "loaded", "failed"]


@dataclass(frozen=True, slots=True)
class EngineStats:
    """One loaded engine's capacity and load."""

    model: str
    kv_blocks_total: int
    kv_block_size_tokens: int
    kv_usage_fraction: float
    running_requests: int
    max_model_len: int
    kv_blocks_used: int = 0
    """Blocks the worker's KV ledger has handed out (whole budgets of live requests)."""
    kv_handles_open: int = 0
    kv_waiting: int = 0
    """Requests queued for KV space on this engine."""
    preemptions: int = 0
    """Requests the engine preempted since it started (0 while admission never overcommits)."""
    prompt_tokens_total: int = 0
    """vLLM's own count of prompt tokens since the engine started (`vllm:prompt_tokens`)."""
    generation_tokens_total: int = 0
    """vLLM's own count of generated tokens (`vllm:generation_tokens`): what billing, counted
    per request on the worker, reconciles with."""
    prefill_chunk_tokens: int = 0
    """Prompt tokens the engine computes in one step when it chunks prefills (0: whole)."""
    max_chars_per_token: int = 0
    """The longest vocabulary entry in characters (vLLM's `max_chars_per_token`): a prompt of
    more than `max_model_len` x this many characters cannot fit, without tokenizing it. 0:
    unknown."""
    kv_cached_blocks: int | None = None
    """Blocks the engine's prefix cache holds, from its KV events (None: events off)."""
    routed_prompt_blocks: int = 0
    """Full KV blocks of the prompts routed here (KV events on), and of those, the leading
    ones already cached when each arrived: the routing's prefix-hit ratio."""
    routed_matched_blocks: int = 0
    cache_query_tokens: int = 0
    """Prompt tokens of finished requests, and of those the engine served from its prefix
    cache (vLLM's `num_cached_tokens`): the engine's own prefix-cache hit rate."""
    cache_hit_tokens: int = 0

    @property
    def max_prompt_chars(self) -> int | None:
        """The most characters a prompt that fits can have; None when unknown."""
        if self.max_chars_per_token <= 0 or self.max_model_len <= 0:
            return None
        return self.max_model_len * self.max_chars_per_token


@dataclass(frozen=True, slots=True)
class ModelStatus:
    model: str
    state: ModelState
    error: str | None = None
    stats: EngineStats | None = None


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    worker_id: str
    deployment: str
    profile: str
    node_id: str
    pool: str
    models: tuple[ModelStatus, ...]
    active_requests: int
    reported_at: float = field(default_factory=time.time)
    memory_used_bytes: int = 0
    """Resident memory of the worker's process (engine subprocesses not included)."""

    @property
    def loaded_models(self) -> list[str]:
        return [status.model for status in self.models if status.state == "loaded"]

    def model_state(self, model: str) -> ModelStatus | None:
        for status in self.models:
            if status.model == model:
                return status
        return None
