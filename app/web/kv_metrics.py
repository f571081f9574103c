"""The KV-event figures of `/metrics`, from the registry's snapshot (whole-service, like the
other worker gauges): blocks each engine's prefix cache holds, the routed prompts' blocks found
cached on arrival, and the engine's own prefix-cache hit rate."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import Gauge

from app.metrics import PREFIX, REGISTRY
from app.protocol.workers import WorkerStatus

KV_CACHED_BLOCKS = Gauge(
    f"{PREFIX}_kv_cached_blocks",
    "KV blocks a worker's engines hold in their prefix cache, from their KV-cache events "
    "(routing.kv_events).",
    ["worker", "profile"],
    registry=REGISTRY,
)
ROUTED_PREFIX_BLOCKS = Gauge(
    f"{PREFIX}_routed_prefix_blocks",
    "Full KV blocks of the prompts routed to a worker since it started (kind: prompt), and of "
    "those the leading ones its cache held when each arrived (kind: matched).",
    ["worker", "profile", "kind"],
    registry=REGISTRY,
)
ENGINE_PREFIX_CACHE_TOKENS = Gauge(
    f"{PREFIX}_engine_prefix_cache_tokens",
    "Prompt tokens of a worker's finished requests (kind: queries) and those its engine served "
    "from the prefix cache (kind: hits, vLLM's num_cached_tokens), since it started.",
    ["worker", "profile", "kind"],
    registry=REGISTRY,
)
PREFIX_HIT_RATIO = Gauge(
    f"{PREFIX}_prefix_hit_ratio",
    "Whole service, since the workers started: routed (matched / prompt blocks of the routed "
    "requests, KV events on) and engine (the engines' prefix-cache hits / queries, tokens).",
    ["source"],
    registry=REGISTRY,
)


def update_kv_events(workers: Sequence[WorkerStatus]) -> None:
    for gauge in (KV_CACHED_BLOCKS, ROUTED_PREFIX_BLOCKS, ENGINE_PREFIX_CACHE_TOKENS):
        gauge.clear()
    totals = {"prompt": 0, "matched": 0, "queries": 0, "hits": 0}
    for worker in workers:
        stats = [s.stats for s in worker.models if s.stats is not None]
        labels = (worker.worker_id, worker.profile)
        cached = [s.kv_cached_blocks for s in stats if s.kv_cached_blocks is not None]
        if cached:
            KV_CACHED_BLOCKS.labels(*labels).set(sum(cached))
        figures = {
            "prompt": sum(s.routed_prompt_blocks for s in stats),
            "matched": sum(s.routed_matched_blocks for s in stats),
            "queries": sum(s.cache_query_tokens for s in stats),
            "hits": sum(s.cache_hit_tokens for s in stats),
        }
        for kind, value in figures.items():
            totals[kind] += value
        if cached:
            for kind in ("prompt", "matched"):
                ROUTED_PREFIX_BLOCKS.labels(*labels, kind).set(figures[kind])
        for kind in ("queries", "hits"):
            ENGINE_PREFIX_CACHE_TOKENS.labels(*labels, kind).set(figures[kind])
    if totals["prompt"]:
        PREFIX_HIT_RATIO.labels("routed").set(totals["matched"] / totals["prompt"])
    if totals["queries"]:
        PREFIX_HIT_RATIO.labels("engine").set(totals["hits"] / totals["queries"])
