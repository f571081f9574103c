"""Every Prometheus metric of poolserve, declared once, and the few functions that move them.

Request metrics come from the ingress (`app.api.observe.RequestMetrics`, a pure ASGI middleware)
and from the chunk stream (`StreamWatch`, hooked into `app.api.streaming.ChunkStream`). Worker,
KV, pool and autoscaler gauges are set from the same snapshot `/health` renders, each time
`/metrics` or the dashboard feed is read. Labels are bounded: route templates (never raw paths),
status and error codes, profiles, pools, worker (replica) ids. Times are in seconds. What the
dashboard shows beyond these (recent percentiles, recent errors) is kept in `app.history`.

Serving-layer times are measured at the ingress (request arrival -> chunk arrival); engine times
are what the engine reports on the terminal chunk (`ttft_ms`, `tpot_ms`). Their difference before
the first token is `poolserve_queue_time_seconds`: ingress, routing, Ray transport and the
replica's queue, i.e. our framework's share.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric

from app.errors import InternalError, ServiceError
from app.history import RECENT, Sample
from app.protocol.generation import GenerationChunk, WireReply
from app.protocol.workers import WorkerStatus

REGISTRY = CollectorRegistry(auto_describe=True)
PREFIX = "poolserve"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
NO_CODE = "none"
UNMATCHED_ROUTE = "unmatched"

REQUESTS = Counter(
    f"{PREFIX}_requests",
    "HTTP requests answered by the ingress, by route template, status and error code "
    "(in-band stream errors included; code 'none' on success).",
    ["route", "method", "status", "code"],
    registry=REGISTRY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    f"{PREFIX}_time_to_first_token_seconds",
    "Serving-layer time to first token: request arrival at the ingress to the first text chunk "
    "arriving there.",
    ["route"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
ENGINE_TIME_TO_FIRST_TOKEN = Histogram(
    f"{PREFIX}_engine_time_to_first_token_seconds",
    "Engine-reported time to first token (terminal chunk ttft_ms).",
    ["route"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
QUEUE_TIME = Histogram(
    f"{PREFIX}_queue_time_seconds",
    "Framework time before the first token: serving-layer TTFT minus engine TTFT (ingress, "
    "routing, Ray transport, replica queue).",
    ["route"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    f"{PREFIX}_time_per_output_token_seconds",
    "Serving-layer mean time between output tokens after the first, as chunks reach the ingress.",
    ["route"],
    buckets=TOKEN_BUCKETS,
    registry=REGISTRY,
)
ENGINE_TIME_PER_OUTPUT_TOKEN = Histogram(
    f"{PREFIX}_engine_time_per_output_token_seconds",
    "Engine-reported mean time per output token after the first (terminal chunk tpot_ms).",
    ["route"],
    buckets=TOKEN_BUCKETS,
    registry=REGISTRY,
)
PROMPT_TOKENS = Counter(
    f"{PREFIX}_prompt_tokens",
    "Prompt tokens of finished generations.",
    ["route"],
    registry=REGISTRY,
)
GENERATION_TOKENS = Counter(
    f"{PREFIX}_generation_tokens",
    "Output tokens of finished generations.",
    ["route"],
    registry=REGISTRY,
)
STREAMS_IN_FLIGHT = Gauge(
    f"{PREFIX}_streams_in_flight",
    "Generations the ingress is relaying right now.",
    ["route"],
    registry=REGISTRY,
)
CANCELLATIONS = Counter(
    f"{PREFIX}_generation_cancellations",
    "Generations closed by the ingress before their terminal chunk (the engine request is "
    "aborted), or ended by the engine as cancelled.",
    ["route"],
    registry=REGISTRY,
)
CLIENT_DISCONNECTS = Counter(
    f"{PREFIX}_client_disconnects",
    "Requests whose client went away before the response was complete.",
    ["route"],
    registry=REGISTRY,
)
KV_BLOCKS = Gauge(
    f"{PREFIX}_kv_blocks",
    "KV cache blocks per worker (summed over its engines), by state.",
    ["worker", "profile", "state"],
    registry=REGISTRY,
)
KV_HANDLES_OPEN = Gauge(
    f"{PREFIX}_kv_handles_open",
    "Open KV handles per worker (one per live request).",
    ["worker", "profile"],
    registry=REGISTRY,
)
ENGINE_PREEMPTIONS = Gauge(
    f"{PREFIX}_engine_preemptions",
    "Requests a worker's engines preempted since they started (KV overcommit; admission keeps "
    "it at 0).",
    ["worker", "profile"],
    registry=REGISTRY,
)
WORKER_ACTIVE_REQUESTS = Gauge(
    f"{PREFIX}_worker_active_requests",
    "Requests a worker is serving (its queue depth as reported in its last heartbeat).",
    ["worker", "profile"],
    registry=REGISTRY,
)
POOL_WORKERS = Gauge(
    f"{PREFIX}_pool_workers",
    "Workers by pool, profile and state (ready, loading, failed, stale).",
    ["pool", "profile", "state"],
    registry=REGISTRY,
)
POOLS = Gauge(f"{PREFIX}_pools", "Pools by state.", ["state"], registry=REGISTRY)
ROUTING_DECISIONS = Counter(
    f"{PREFIX}_routing_decisions",
    "Worker choices of the request router (app.routing.affinity), by reason: prefix, home, "
    "least_loaded, imbalance, headroom, no_headroom.",
    ["reason"],
    registry=REGISTRY,
)
ROUTING_PREFIX_BLOCKS = Counter(
    f"{PREFIX}_routing_prefix_blocks_matched",
    "Leading prompt blocks (or explicit cache keys) the chosen worker was believed to hold.",
    registry=REGISTRY,
)
AUTOSCALER_DECISIONS = Counter(
    f"{PREFIX}_autoscaler_decisions",
    "Pool autoscaler decisions seen by this ingress, by kind (app.pools.decide.DecisionKind).",
    ["kind"],
    registry=REGISTRY,
)
AUTOSCALER_TARGET_REPLICAS = Gauge(
    f"{PREFIX}_autoscaler_target_replicas",
    "Replica target the pool autoscaler last applied, per profile.",
    ["profile"],
    registry=REGISTRY,
)


class UsageCollector:
    """`poolserve_usage_*`: the TenantLedger's totals per (pool, model, key_id), and
    worker-seconds per pool. Service-wide and exact (every ingress replica exports the same
    numbers, read from the ledger at each scrape); labels are bounded by the pools, the
    configured models and the configured API keys (by id)."""

    COUNTS = {
        "requests": "Requests that finished with a usage block.",
        "prompt_tokens": "Prompt tokens of finished requests (as their usage blocks said).",
        "cached_prompt_tokens": "Prompt tokens served from the prefix cache.",
        "completion_tokens": "Completion tokens of finished requests (every candidate).",
    }

    def __init__(self) -> None:
        self.report: Mapping[str, Any] | None = None

    def update(self, report: Mapping[str, Any]) -> None:
        self.report = report

    def collect(self) -> Iterable[Metric]:
        report = self.report or {}
        families = {
            name: CounterMetricFamily(
                f"{PREFIX}_usage_{name}", doc, labels=["pool", "model", "key_id"]
            )
            for name, doc in self.COUNTS.items()
        }
        for row in report.get("usage", ()):
            labels = [str(row["pool"]), str(row["model"]), str(row["key_id"])]
            for name, family in families.items():
                family.add_metric(labels, float(row[name]))
        held = CounterMetricFamily(
            f"{PREFIX}_usage_worker_seconds",
            "Worker-seconds each pool held (its assigned workers x time).",
            labels=["pool"],
        )
        for pool, each in sorted((report.get("pools") or {}).items()):
            held.add_metric([str(pool)], float(each.get("worker_seconds", 0.0)))
        yield from families.values()
        yield held


USAGE = UsageCollector()
REGISTRY.register(USAGE)


def render() -> bytes:
    """The Prometheus text exposition of every metric above."""
    return generate_latest(REGISTRY)


def metric_names() -> set[str]:
    """Every sample name the registry can export (with _total, _bucket, ... suffixes)."""
    names: set[str] = set()
    for collector in REGISTRY.collect():
        names.add(collector.name)
        if collector.type == "counter":
            names.update({f"{collector.name}_total", f"{collector.name}_created"})
        if collector.type == "histogram":
            names.update(f"{collector.name}_{s}" for s in ("bucket", "sum", "count", "created"))
    return names


# --- requests ---------------------------------------------------------------------------------


@dataclass
class RequestObservation:
    """One HTTP request as the middleware sees it; the stream hooks fill in what they see."""

    scope: MutableMapping[str, Any]
    started: float = field(default_factory=time.perf_counter)
    stream_error_code: str | None = None

    @property
    def route(self) -> str:
        route = self.scope.get("route")
        path = getattr(route, "path", None)
        return str(path) if path else UNMATCHED_ROUTE


CURRENT_REQUEST: contextvars.ContextVar[RequestObservation | None] = contextvars.ContextVar(
    "poolserve_request", default=None
)


def record_request(route: str, method: str, status: int, code: str | None) -> None:
    REQUESTS.labels(route, method, str(status), code or NO_CODE).inc()
    if code:
        RECENT.errors.append((time.time(), code))


def record_routing(reason: str, prefix_match: int) -> None:
    ROUTING_DECISIONS.labels(reason).inc()
    if prefix_match:
        ROUTING_PREFIX_BLOCKS.inc(prefix_match)


def record_disconnect(route: str) -> None:
    CLIENT_DISCONNECTS.labels(route).inc()


# --- streams ----------------------------------------------------------------------------------


class StreamWatch:
    """Observes one generation's chunk batches as the ingress relays them (buffered or SSE)."""

    def __init__(self) -> None:
        self._request = CURRENT_REQUEST.get()
        self.route = self._request.route if self._request else UNMATCHED_ROUTE
        self._created = time.perf_counter()  # the first batch has just arrived
        self._first_text_at: float | None = None
        self._last_text_at: float | None = None
        self._terminal: GenerationChunk | None = None
        self._counted = False
        self._closed = False

    def batch(self, batch: Iterable[GenerationChunk | WireReply]) -> None:
        now = time.perf_counter() if self._counted else self._created
        if not self._counted:
            self._counted = True
            STREAMS_IN_FLIGHT.labels(self.route).inc()
        for item in batch:
            if isinstance(item, WireReply):  # vLLM's bytes: text events, then the stats
                if item.stream and item.data:
                    self._first_text_at = self._first_text_at or now
                    self._last_text_at = now
                if item.done and item.stats is not None and self._terminal is None:
                    self._terminal = item.stats
                continue
            chunk = item
            if chunk.text_delta:
                self._first_text_at = self._first_text_at or now
                self._last_text_at = now
            if chunk.done and self._terminal is None:
                self._terminal = chunk
                if chunk.error_code and self._request is not None:
                    self._request.stream_error_code = chunk.error_code

    def error(self, error: BaseException) -> None:
        """The stream raised mid-way (the formatter reports it in-band)."""
        cause = getattr(error, "cause", None)
        if isinstance(error, ServiceError):
            code = error.code
        elif isinstance(cause, ServiceError):
            code = cause.code
        else:
            code = InternalError.code
        if self._request is not None and self._request.stream_error_code is None:
            self._request.stream_error_code = code

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._counted:
            STREAMS_IN_FLIGHT.labels(self.route).dec()
        terminal = self._terminal
        if terminal is None or terminal.finish_reason == "cancelled":
            CANCELLATIONS.labels(self.route).inc()
            return
        if terminal.error_code:
            return
        self._observe(terminal)

    def _observe(self, terminal: GenerationChunk) -> None:
        route = self.route
        tokens = terminal.completion_tokens or 0
        PROMPT_TOKENS.labels(route).inc(terminal.prompt_tokens or 0)
        GENERATION_TOKENS.labels(route).inc(tokens)
        ttft = tpot = None
        if self._request is not None and self._first_text_at is not None:
            ttft = self._first_text_at - self._request.started
            TIME_TO_FIRST_TOKEN.labels(route).observe(ttft)
        if self._first_text_at is not None and self._last_text_at is not None and tokens >= 2:
            tpot = (self._last_text_at - self._first_text_at) / (tokens - 1)
            TIME_PER_OUTPUT_TOKEN.labels(route).observe(tpot)
        engine_ttft = terminal.ttft_ms / 1000 if terminal.ttft_ms is not None else None
        engine_tpot = terminal.tpot_ms / 1000 if terminal.tpot_ms is not None else None
        if engine_ttft is not None:
            ENGINE_TIME_TO_FIRST_TOKEN.labels(route).observe(engine_ttft)
            if ttft is not None:
                QUEUE_TIME.labels(route).observe(max(0.0, ttft - engine_ttft))
        if engine_tpot is not None:
            ENGINE_TIME_PER_OUTPUT_TOKEN.labels(route).observe(engine_tpot)
        RECENT.samples.append(Sample(time.time(), ttft, tpot, engine_ttft, engine_tpot, tokens))


# --- snapshot gauges --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KVView:
    """A worker's KV numbers, summed over its engines; None where the worker does not report
    them (the KV ledger's fields are read defensively)."""

    blocks_total: int
    blocks_used: int | None
    handles_open: int | None
    engine_usage: float


def kv_view(worker: WorkerStatus) -> KVView:
    stats = [status.stats for status in worker.models if status.stats is not None]
    total = sum(int(getattr(s, "kv_blocks_total", 0) or 0) for s in stats)
    usage = max((float(getattr(s, "kv_usage_fraction", 0.0) or 0.0) for s in stats), default=0.0)

    def summed(name: str) -> int | None:
        values = [getattr(s, name) for s in stats if getattr(s, name, None) is not None]
        if not values:
            worker_value = getattr(worker, name, None)
            return int(worker_value) if worker_value is not None else None
        return sum(int(v) for v in values)

    return KVView(total, summed("kv_blocks_used"), summed("kv_handles_open"), usage)


def worker_state(worker: WorkerStatus, now: float, stale_s: float) -> str:
    if now - worker.reported_at > stale_s:
        return "stale"
    if any(status.state == "failed" for status in worker.models):
        return "failed"
    if any(status.state == "loading" for status in worker.models):
        return "loading"
    return "ready"


def update_snapshot(
    workers: Sequence[WorkerStatus],
    pool_states: Mapping[str, str] | None,
    now: float,
    stale_s: float,
) -> None:
    """Set the worker, KV and pool gauges from one snapshot (dropping workers that left)."""
    for gauge in (
        KV_BLOCKS,
        KV_HANDLES_OPEN,
        ENGINE_PREEMPTIONS,
        WORKER_ACTIVE_REQUESTS,
        POOL_WORKERS,
    ):
        gauge.clear()
    counts: dict[tuple[str, str, str], int] = {}
    for worker in workers:
        key = (worker.pool, worker.profile, worker_state(worker, now, stale_s))
        counts[key] = counts.get(key, 0) + 1
        WORKER_ACTIVE_REQUESTS.labels(worker.worker_id, worker.profile).set(worker.active_requests)
        kv = kv_view(worker)
        used = kv.blocks_used
        if used is None:
            used = round(kv.blocks_total * kv.engine_usage)
        KV_BLOCKS.labels(worker.worker_id, worker.profile, "used").set(used)
        KV_BLOCKS.labels(worker.worker_id, worker.profile, "free").set(
            max(0, kv.blocks_total - used)
        )
        if kv.handles_open is not None:
            KV_HANDLES_OPEN.labels(worker.worker_id, worker.profile).set(kv.handles_open)
        ENGINE_PREEMPTIONS.labels(worker.worker_id, worker.profile).set(
            sum(s.stats.preemptions for s in worker.models if s.stats is not None)
        )
    for (pool, profile, state), count in counts.items():
        POOL_WORKERS.labels(pool, profile, state).set(count)
    if pool_states is not None:
        POOLS.clear()
        for state in ("pending", "active", "expired"):
            POOLS.labels(state).set(sum(1 for s in pool_states.values() if s == state))


class DecisionTally:
    """Counts autoscaler decisions by the `kind` of each entry of its reason history (polled;
    each step's reasons share one timestamp, so a watermark on it counts every reason once)."""

    def __init__(self) -> None:
        self.seen_until = float("-inf")

    def update(self, status: dict[str, Any]) -> None:
        newest = self.seen_until
        for entry in status.get("reasons", []):
            at = float(entry.get("at", 0.0))
            if at > self.seen_until:
                AUTOSCALER_DECISIONS.labels(str(entry.get("kind", "other"))).inc()
                newest = max(newest, at)
        self.seen_until = newest
        for profile, target in (status.get("replicas") or {}).items():
            AUTOSCALER_TARGET_REPLICAS.labels(str(profile)).set(int(target))


TALLY = DecisionTally()
