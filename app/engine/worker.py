"""A worker: the engines of one Generator replica, their load states, and the coalesced chunk
stream it serves. No Ray here; `app/deployments/generator.py` wraps it."""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace

from app.config import AppConfig, ModelConfig
from app.engine.base import GenerationAdapter, generation_budget
from app.engine.coalesce import coalesce
from app.errors import (
    InputTooLong,
    ModelLoadFailed,
    ModelLoading,
    ModelNotFound,
    WorkerUnavailable,
)
from app.kv.admission import KVAdmission
from app.kv.ledger import KVLedger
from app.protocol.generation import EngineCounts, GenerationChunk, GenerationRequest, WireReply
from app.protocol.workers import EngineStats, ModelStatus, WorkerStatus
from app.tenancy.fairshare import FairShare, Flow
from app.tenancy.requests import tenant_pool

logger = logging.getLogger(__name__)

AdapterFactory = Callable[[ModelConfig], GenerationAdapter]


def joined(batch: list[WireReply]) -> WireReply:
    """One reply for a coalesced batch: its bytes in order, the last one's end and stats."""
    if len(batch) == 1:
        return batch[0]
    last = batch[-1]
    return WireReply(b"".join(r.data for r in batch), last.stream, last.done, last.stats)


def load_adapter_factory(import_path: str) -> AdapterFactory:
    """'package.module:Class' -> the class (a GenerationAdapter taking a ModelConfig)."""
    module_name, _, attribute = import_path.partition(":")
    factory: AdapterFactory = getattr(importlib.import_module(module_name), attribute)
    return factory


def flow_of(request: GenerationRequest) -> Flow:
    """The request's fair-share flow at KV admission: its pool, priority and share weight."""
    return Flow(
        tenant_pool(request),
        request.priority or 0,
        request.share_weight,
        request.share_member,
    )


class Worker:
    def __init__(
        self, config: AppConfig, profile: str, factory: AdapterFactory | None = None
    ) -> None:
        self.config = config
        self.profile = profile
        factory = factory or load_adapter_factory(config.engine_adapter)
        self._models = {m.id: m for m in config.models_for_profile(profile)}
        self._adapters = {model_id: factory(m) for model_id, m in self._models.items()}
        self._states: dict[str, ModelStatus] = {
            model_id: ModelStatus(model_id, "loading") for model_id in self._adapters
        }
        self.active_requests = 0
        self._admission: dict[str, KVAdmission] = {}
        # sees each engine request's prompt tokens (and namespace) before its admission
        self.on_prompt: Callable[[GenerationRequest, Sequence[int], str], None] | None = None

    async def load_all(self) -> None:
        await asyncio.gather(*(self._load(model_id) for model_id in self._adapters))

    async def _load(self, model_id: str) -> None:
        started = time.perf_counter()
        try:
            await self._adapters[model_id].start()
        except Exception as error:
            logger.exception("loading %s failed", model_id)
            self._states[model_id] = ModelStatus(
                model_id, "failed", error=f"{type(error).__name__}: {error}"
            )
            return
        adapter = self._adapters[model_id]
        stats = adapter.stats()
        seats = self._models[model_id].engine.max_num_seqs
        self._admission[model_id] = KVAdmission(
            KVLedger(
                stats.kv_blocks_total,
                stats.kv_block_size_tokens,
                share_prefixes=self._models[model_id].engine.enable_prefix_caching,
                chunk_tokens=stats.prefill_chunk_tokens or None,
            ),
            max_waiting=self.config.kv.max_waiting_requests,
            max_wait_s=self.config.kv.max_wait_seconds,
            max_running=seats,
            kv_dtype=adapter.kv_dtype,
            fair=FairShare(
                headroom_requests=self.config.kv.fair_share_headroom_requests,
                active_s=self.config.kv.fair_share_active_seconds,
                batch_requests=min(self.config.kv.fair_share_batch_requests or seats, seats),
            ),
        )
        self._states[model_id] = ModelStatus(model_id, "loaded")
        logger.info("loaded %s in %.1f s", model_id, time.perf_counter() - started)

    def adapters(self) -> dict[str, GenerationAdapter]:
        return dict(self._adapters)

    def adapter(self, model_id: str) -> GenerationAdapter:
        adapter = self._adapters.get(model_id)
        if adapter is None:
            raise ModelNotFound(model_id)
        status = self._states[model_id]
        if adapter.dead:
            raise WorkerUnavailable(f"the engine of model '{model_id}' on this worker failed")
        if status.state == "loading":
            raise ModelLoading(f"model '{model_id}' is loading")
        if status.state == "failed":
            raise ModelLoadFailed(
                f"model '{model_id}' failed to load; the worker log has the cause",
                error_class="ENGINE",
            )
        return adapter

    def stream(
        self, request: GenerationRequest, counts: EngineCounts
    ) -> AsyncIterator[list[GenerationChunk]] | AsyncIterator[list[WireReply]]:
        """The request's coalesced batches: chunks (SIE generation), or the bytes of vLLM's
        OpenAI layer for an OpenAI-route request. What the engine did for it goes in `counts`
        as it happens (what it is billed, however it ends)."""
        if request.openai is None:
            return self._generate(request, counts)
        return self._openai(request, counts)

    async def _openai(
        self, request: GenerationRequest, counts: EngineCounts
    ) -> AsyncIterator[list[WireReply]]:
        """An OpenAI-route request through vLLM's OpenAI layer: every engine request it makes
        holds a KV handle; the SSE events come coalesced like chunks (a JSON reply is one)."""
        assert request.openai is not None
        adapter = self.adapter(request.model)
        admission = self._admission[request.model]
        streaming = self.config.streaming
        self.active_requests += 1
        try:
            replies = adapter.serve_openai(
                request.openai,
                request.request_id,
                admission.for_flow(flow_of(request), self._observer(request)),
                counts,
            )
            batches = coalesce(
                replies,
                window_s=streaming.coalesce_window_ms / 1000,
                max_items=streaming.coalesce_max_chunks,
            )
            try:
                async for batch in batches:
                    yield [joined(batch)]
            finally:
                await batches.aclose()
        finally:
            self.active_requests -= 1

    async def _generate(
        self, request: GenerationRequest, counts: EngineCounts
    ) -> AsyncIterator[list[GenerationChunk]]:
        """Admit against the KV ledger (holding a handle for the whole stream), then coalesced
        batches: the first at once, then one per window."""
        adapter = self.adapter(request.model)
        bound = adapter.stats().max_prompt_chars
        if bound is not None and len(request.prompt or "") > bound:  # the ingress checks first
            raise InputTooLong(
                f"the prompt has {len(request.prompt or '')} characters, more than the {bound} "
                f"that {adapter.context_length} tokens can hold",
                param="prompt",
            )
        admission = self._admission[request.model]
        flow = flow_of(request)
        refusal = admission.refusal_for(flow)  # a full queue: before the prompt is tokenized
        if refusal is not None:
            raise refusal
        prompt_ids = await adapter.prompt_token_ids(request)
        budget = generation_budget(
            len(prompt_ids), request.sampling.max_new_tokens, adapter.context_length, "prompt"
        )
        candidates = max(request.sampling.n, request.sampling.best_of or 0)
        streaming = self.config.streaming
        self.active_requests += 1
        try:
            namespace = f"{request.lora_adapter or ''}\x1f"
            if self.on_prompt is not None:
                self.on_prompt(request, prompt_ids, namespace)
            async with admission.reserve(
                request.request_id, prompt_ids, budget, candidates, namespace, flow=flow
            ):
                batches = coalesce(
                    adapter.generate(request, prompt_ids, counts),
                    window_s=streaming.coalesce_window_ms / 1000,
                    max_items=streaming.coalesce_max_chunks,
                )
                try:
                    async for batch in batches:
                        admission.prefilled(request.request_id)  # the first time only counts
                        yield batch
                finally:
                    await batches.aclose()
        finally:
            self.active_requests -= 1

    def _observer(self, request: GenerationRequest) -> Callable[[Sequence[int], str], None] | None:
        on_prompt = self.on_prompt
        if on_prompt is None:
            return None
        return lambda token_ids, namespace: on_prompt(request, token_ids, namespace)

    def status(self, worker_id: str, node_id: str, pool: str = "default") -> WorkerStatus:
        models = tuple(
            ModelStatus(
                model_id,
                status.state,
                status.error,
                self._engine_stats(model_id) if status.state == "loaded" else None,
            )
            for model_id, status in self._states.items()
        )
        return WorkerStatus(
            worker_id=worker_id,
            deployment=f"Generator-{self.profile}",
            profile=self.profile,
            node_id=node_id,
            pool=pool,
            models=models,
            active_requests=self.active_requests,
        )

    def _engine_stats(self, model_id: str) -> EngineStats:
        stats = self._adapters[model_id].stats()
        admission = self._admission.get(model_id)
        if admission is None:
            return stats
        return replace(
            stats,
            kv_blocks_used=admission.ledger.used_blocks,
            kv_handles_open=admission.ledger.open_handles,
            kv_waiting=admission.waiting,
        )

    def dead_engines(self) -> list[str]:
        """Models whose loaded engine failed for good."""
        return [model_id for model_id, adapter in self._adapters.items() if adapter.dead]

    async def shutdown(self) -> None:
        for adapter in self._adapters.values():
            await adapter.shutdown()


def omp_threads_bind(cores_per_worker: int, local_rank: int, cores: list[int]) -> str:
    """vLLM's VLLM_CPU_OMP_THREADS_BIND for the worker of `local_rank` on its node: the
    `local_rank`-th group of `cores_per_worker` of `cores` (the cores this process may use),
    wrapping around when the node runs more workers than it has groups."""
    cores = sorted(cores)
    per = min(cores_per_worker, len(cores))
    groups = max(1, len(cores) // per)
    start = (local_rank % groups) * per
    return ",".join(str(core) for core in cores[start : start + per])
