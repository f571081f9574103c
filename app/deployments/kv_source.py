"""This worker's KV cache as the routers see it (`routing.kv_events`): each model's engine
events (`app.engine.kv_events`) kept in a `WorkerKeys` (`app.routing.kv_keys`), every prompt
it serves mapped to its vLLM blocks, the last changes on the acknowledgement of each call,
the whole set for an ingress replica that missed some, and the figures of /health and
/metrics (cached blocks, routed prompts' blocks found cached, the engine's own hit rate)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from app.config import AppConfig
from app.engine.kv_events import KVEventFeed
from app.engine.worker import Worker
from app.protocol.generation import EngineCounts, GenerationRequest
from app.protocol.kv_events import KVEvent
from app.protocol.workers import WorkerStatus
from app.routing.affinity import BLOCK_CHARS, affinity_keys, prompt_text
from app.routing.kv_hash import block_keys, engine_seed
from app.routing.kv_keys import Summary, WorkerKeys

logger = logging.getLogger("ray.serve")
HASHED_BLOCKS = 512  # a prompt's leading blocks hashed (the keys cover 64 x 256 characters)


class KVSource:
    def __init__(self, worker: Worker, config: AppConfig, epoch: str) -> None:
        self._worker = worker
        self._seed = engine_seed()
        self._keys: dict[str, WorkerKeys] = {}
        self._feeds: dict[str, KVEventFeed] = {}
        self._counts: dict[str, tuple[int, int]] = {}  # model -> (prompt, cached tokens)
        if not config.routing.kv_events:
            return
        models = {m.id: m for m in config.models}
        for model_id, adapter in worker.adapters().items():
            if not models[model_id].engine.enable_prefix_caching:
                continue
            keys = self._keys[model_id] = WorkerKeys(epoch, config.routing.prefix_index_capacity)
            adapter.kv_events = self._feeds[model_id] = KVEventFeed(_applier(keys))
        if self._keys:
            worker.on_prompt = self.prompt

    def prompt(self, request: GenerationRequest, token_ids: Sequence[int], namespace: str) -> None:
        """An engine request's prompt, before its admission: its affinity keys mapped to its
        blocks. Only prompts hashed without extra keys (no LoRA adapter, no cache salt).
        Never fails the request: routing hints are not worth a refusal."""
        keys = self._keys.get(request.model)
        if keys is None or namespace != "\x1f":
            return
        try:
            self._map(keys, request, token_ids)
        except Exception:
            logger.warning("mapping a prompt to its KV blocks failed", exc_info=True)

    def _map(self, keys: WorkerKeys, request: GenerationRequest, token_ids: Sequence[int]) -> None:
        block_size = self._worker.adapters()[request.model].stats().kv_block_size_tokens
        if block_size <= 0:
            return
        explicit = request.prompt_cache_key or request.routing_key
        text_chars = BLOCK_CHARS if explicit else len(prompt_text(request))
        chain = block_keys(token_ids[: HASHED_BLOCKS * block_size], block_size, self._seed)
        keys.prompt(affinity_keys(request), text_chars, chain, len(token_ids), block_size)

    def counted(self, model: str, counts: EngineCounts) -> None:
        """A request ended: its prompt tokens and the engine's cached ones."""
        prompt, cached = self._counts.get(model, (0, 0))
        self._counts[model] = (prompt + counts.prompt_tokens, cached + counts.cached_tokens)

    def annotate(self, stats: dict[str, Any]) -> dict[str, Any]:
        """The routing stats of an acknowledgement, with each model's last key changes."""
        by_model = stats.get("kv")
        if self._keys and isinstance(by_model, dict):
            for model, keys in self._keys.items():
                if isinstance(by_model.get(model), dict):
                    by_model[model]["keys"] = keys.summary()
        return stats

    def full(self, model: str) -> Summary | None:
        keys = self._keys.get(model)
        return None if keys is None else keys.full()

    def status(self, status: WorkerStatus) -> WorkerStatus:
        """The heartbeat's status with the KV-event figures of each model."""
        models = []
        for model in status.models:
            keys, counts = self._keys.get(model.model), self._counts.get(model.model)
            if model.stats is None or (keys is None and counts is None):
                models.append(model)
                continue
            stats = dataclasses.replace(
                model.stats,
                cache_query_tokens=counts[0] if counts else 0,
                cache_hit_tokens=counts[1] if counts else 0,
            )
            if keys is not None:
                stats = dataclasses.replace(
                    stats,
                    kv_cached_blocks=keys.cached_blocks,
                    routed_prompt_blocks=keys.prompt_blocks,
                    routed_matched_blocks=keys.matched_blocks,
                )
            models.append(dataclasses.replace(model, stats=stats))
        return dataclasses.replace(status, models=tuple(models))


def _applier(keys: WorkerKeys) -> Any:
    def apply(events: list[KVEvent]) -> None:
        for event in events:
            keys.apply(event)

    return apply
