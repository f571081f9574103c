"""Every Prometheus metric of poolserve, declared once, the few functions that move them, and how
the ingress replicas' counts add up to the whole service's.

Request metrics come from the ingress (`app.api.observe.RequestMetrics`, a pure ASGI middleware)
and from the chunk stream (`StreamWatch`, hooked into `app.api.streaming.ChunkStream`). Each
ingress replica records them in process: a dict update per counter and histogram on the request
path, nothing crosses a process boundary. What it counted is a `Shard` (cumulative counters and
histogram buckets, current levels, the dashboard's recent steps); once a second a replica that
shares its metrics (`SHARING.connect`: the Ray glue is `app.deployments.metrics_sink`) publishes
its shard if it changed (at least every `HEARTBEAT_S`), and a read of `/metrics` or of the
dashboard feed exchanges it for the merge of every other replica's (`SHARING.exchange`). So any
replica answers whole-service counts, at most `PUBLISH_EVERY_S` plus one call behind for the
other replicas; counts of replicas that stopped stay counted. Levels (streams in flight) add up
over the replicas that published within `LEVEL_FRESH_S`. Autoscaler decisions are the largest
count any replica saw (each replica sees the same decisions).

Worker, KV, pool and autoscaler gauges are set from the same snapshot `/health` renders, each time
`/metrics` or the dashboard feed is read (whole-service already, from the registry); usage comes
from the TenantLedger. Labels are bounded: route templates (never raw paths), status and error
codes, pools and models (the configured models; a pool the request did not prove to exist counts
as `unknown`), profiles, worker (replica) ids. Times are in seconds. What the dashboard shows
beyond these (recent percentiles, recent errors) is kept in `app.history`.

Serving-layer times are measured at the ingress (request arrival -> chunk arrival); engine times
are what the engine reports on the terminal chunk (`ttft_ms`, `tpot_ms`). Their difference before
the first token is `poolserve_queue_time_seconds`: ingress, routing, Ray transport and the
replica's queue, i.e. our framework's share.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import os
import time
import uuid
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from app.errors import (
    ConcurrencyLimited,
    InternalError,
    PoolNotFound,
    RateLimited,
    ServiceError,
    TokenRateLimited,
)
from app.history import RECENT, Sample, Steps, merge_steps
from app.pools.model import DEFAULT_POOL
from app.protocol.generation import GenerationChunk, GenerationRequest, WireReply
from app.protocol.workers import WorkerStatus
from app.tenancy.requests import tenant_pool

logger = logging.getLogger(__name__)
REGISTRY = CollectorRegistry(auto_describe=True)
PREFIX = "poolserve"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
NO_CODE = "none"
UNMATCHED_ROUTE = "unmatched"
UNKNOWN_POOL = "unknown"
POOL_UNCHECKED_CODES = frozenset(
    {PoolNotFound.code, RateLimited.code, TokenRateLimited.code, ConcurrencyLimited.code}
)
"""Errors a request can get before its pool is looked up (its pool label is then `unknown`
unless the pool is known to exist)."""

SHARD_FORMAT = 1
"""Bump when Shard, history.Step or history.Tally change: a sink running older code then saves
what it holds and ends (app.deployments.metrics_sink), and one of the newer code starts."""
PUBLISH_EVERY_S = 1.0
HEARTBEAT_S = 5.0
LEVEL_FRESH_S = 3 * HEARTBEAT_S
CALL_TIMEOUT_S = 2.0

Key = tuple[str, ...]
Series = dict[Key, Any]  # label values -> a count (counters, levels) or histogram cells


# --- in-process families ----------------------------------------------------------------------


class Family:
    """A metric family recorded in process: label values -> value. No lock: the request path runs
    on the replica's event loop; a copy for a shard is one `dict(...)` (atomic under the GIL)."""

    kind: ClassVar[str]
    __slots__ = ("doc", "labels", "name", "values")

    def __init__(self, name: str, doc: str, labels: Sequence[str] = ()) -> None:
        self.name = f"{PREFIX}_{name}"
        self.doc = doc
        self.labels = tuple(labels)
        self.values: Series = {}
        FAMILIES[self.name] = self

    def copy(self) -> Series:
        return dict(self.values)

    def exposition(self, series: Mapping[Key, Any]) -> Metric:
        raise NotImplementedError


class Numbers(Family):
    """A number per label values (added to, never set: every replica's can be added up)."""

    exported_as: ClassVar[type[CounterMetricFamily] | type[GaugeMetricFamily]]
    __slots__ = ()

    def add(self, key: Key, amount: float = 1.0) -> None:
        values = self.values
        values[key] = values.get(key, 0.0) + amount

    def exposition(self, series: Mapping[Key, Any]) -> Metric:
        family = self.exported_as(self.name, self.doc, labels=self.labels)
        for key, value in sorted(series.items()):
            family.add_metric(key, value)
        return family


class Counts(Numbers):
    """A counter; replicas' counts add up."""

    kind = "counter"
    exported_as = CounterMetricFamily
    __slots__ = ()
    inc = Numbers.add


class Peaks(Counts):
    """A counter every replica counts alike (the same events, polled): the whole service's is
    the largest replica's."""

    __slots__ = ()


class Level(Numbers):
    """A gauge of this replica's current state (streams in flight); replicas' levels add up."""

    kind = "gauge"
    exported_as = GaugeMetricFamily
    __slots__ = ()


class Timings(Family):
    """A histogram: per label values, a list of per-bucket counts (the last bucket +Inf), then
    the sum. Replicas' cells add up."""

    kind = "histogram"
    __slots__ = ("_les", "bounds")

    def __init__(self, name: str, doc: str, labels: Sequence[str], bounds: Sequence[float]) -> None:
        super().__init__(name, doc, labels)
        self.bounds = tuple(bounds)
        self._les = [repr(float(b)) for b in self.bounds] + ["+Inf"]  # as prometheus_client

    def observe(self, key: Key, value: float) -> None:
        cell = self.values.get(key)
        if cell is None:
            cell = self.values[key] = [0.0] * (len(self.bounds) + 2)
        cell[bisect_left(self.bounds, value)] += 1
        cell[-1] += value

    def copy(self) -> Series:
        return {key: list(cell) for key, cell in list(self.values.items())}

    def exposition(self, series: Mapping[Key, Any]) -> Metric:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for key, cell in sorted(series.items()):
            if len(cell) != len(self._les) + 1:
                continue  # another version's buckets (a replica of a rollout in progress)
            cumulative, buckets = 0.0, []
            for le, count in zip(self._les, cell, strict=False):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(key, buckets, cell[-1])
        return family


FAMILIES: dict[str, Family] = {}

TARGET = ("route", "pool", "model")
REQUESTS = Counts(
    "requests",
    "HTTP requests answered by the ingress, by route template, status, error code (in-band "
    "stream errors included; 'none' on success), pool and model (empty before they are known).",
    ("route", "method", "status", "code", "pool", "model"),
)
TIME_TO_FIRST_TOKEN = Timings(
    "time_to_first_token_seconds",
    "Serving-layer time to first token: request arrival at the ingress to the first text chunk "
    "arriving there.",
    TARGET,
    LATENCY_BUCKETS,
)
ENGINE_TIME_TO_FIRST_TOKEN = Timings(
    "engine_time_to_first_token_seconds",
    "Engine-reported time to first token (terminal chunk ttft_ms).",
    TARGET,
    LATENCY_BUCKETS,
)
QUEUE_TIME = Timings(
    "queue_time_seconds",
    "Framework time before the first token: serving-layer TTFT minus engine TTFT (ingress, "
    "routing, Ray transport, replica queue).",
    TARGET,
    LATENCY_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Timings(
    "time_per_output_token_seconds",
    "Serving-layer mean time between output tokens after the first, as chunks reach the ingress.",
    TARGET,
    TOKEN_BUCKETS,
)
ENGINE_TIME_PER_OUTPUT_TOKEN = Timings(
    "engine_time_per_output_token_seconds",
    "Engine-reported mean time per output token after the first (terminal chunk tpot_ms).",
    TARGET,
    TOKEN_BUCKETS,
)
PROMPT_TOKENS = Counts("prompt_tokens", "Prompt tokens of finished generations.", TARGET)
GENERATION_TOKENS = Counts("generation_tokens", "Output tokens of finished generations.", TARGET)
LIMIT_DECISIONS = Counts(
    "limit_decisions",
    "Requests with a limit: mode 'ledger' (asked the TenantLedger), 'leased' (decided by the "
    "ingress replica from quota leased from the ledger: tenancy.leased_limits), 'starting' "
    "(before its first grant) or 'fallback' (the ledger unavailable: admitted without limits, "
    "or with leased limits each limit divided among the replicas); outcome admitted/refused.",
    ("mode", "outcome"),
)
STREAMS_IN_FLIGHT = Level(
    "streams_in_flight",
    "Generations the ingress replicas are relaying right now.",
    ("route",),
)
CANCELLATIONS = Counts(
    "generation_cancellations",
    "Generations closed by the ingress before their terminal chunk (the engine request is "
    "aborted), or ended by the engine as cancelled.",
    ("route",),
)
CLIENT_DISCONNECTS = Counts(
    "client_disconnects",
    "Requests whose client went away before the response was complete.",
    ("route",),
)
ROUTING_DECISIONS = Counts(
    "routing_decisions",
    "Worker choices of the request router (app.routing.board), by reason: prefix, home, room, "
    "least_loaded, imbalance, headroom, no_headroom.",
    ("reason",),
)
ROUTING_PREFIX_BLOCKS = Counts(
    "routing_prefix_blocks_matched",
    "Leading prompt blocks (or explicit cache keys) the chosen worker was believed to hold.",
)
AUTOSCALER_DECISIONS = Peaks(
    "autoscaler_decisions",
    "Pool autoscaler decisions, by kind (app.pools.decide.DecisionKind), as the ingress replica "
    "that saw the most of them counted them from the autoscaler's reason history.",
    ("kind",),
)
SOURCES = f"{PREFIX}_metrics_sources"
SOURCES_DOC = (
    "Ingress replicas whose counts this answer adds up, by state: live (published within "
    f"{LEVEL_FRESH_S:.0f} s, this replica included), stale (not since), retired (stopped; their "
    "counts stay counted)."
)


# --- shards: what a replica counted, and how shards add up ------------------------------------


@dataclass(frozen=True, slots=True)
class Shard:
    """Cumulative counts of one ingress replica (`source`), or several added up, at `at` (unix
    seconds). `sums`: counters and histograms (added up); `peaks`: the same events counted by
    every replica (the largest wins); `levels`: current values (added up over fresh shards);
    `steps`: the dashboard's recent history; `sources`: replicas in it, by state."""

    source: str
    at: float
    sums: dict[str, Series] = field(default_factory=dict)
    peaks: dict[str, Series] = field(default_factory=dict)
    levels: dict[str, Series] = field(default_factory=dict)
    steps: Steps = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=lambda: {"live": 1})

    def counts(self) -> tuple[Any, ...]:
        """What changes when the replica counts something (not the time)."""
        return (self.sums, self.peaks, self.levels)


def local_shard(source: str, now: float) -> Shard:
    """This replica's counts (copies: the request path goes on changing the originals)."""
    sums: dict[str, Series] = {}
    peaks: dict[str, Series] = {}
    levels: dict[str, Series] = {}
    for family in FAMILIES.values():
        into = peaks if isinstance(family, Peaks) else levels if isinstance(family, Level) else sums
        into[family.name] = family.copy()
    return Shard(source, now, sums, peaks, levels, RECENT.steps(now))


def _add_into(into: dict[str, Series], other: Mapping[str, Series]) -> None:
    for name, series in other.items():
        target = into.setdefault(name, {})
        for key, value in series.items():
            have = target.get(key)
            if have is None:
                target[key] = list(value) if isinstance(value, list) else value
            elif isinstance(have, list):
                if isinstance(value, list) and len(value) == len(have):
                    for index, count in enumerate(value):
                        have[index] += count
            elif not isinstance(value, list):
                target[key] = have + value


def _max_into(into: dict[str, Series], other: Mapping[str, Series]) -> None:
    for name, series in other.items():
        target = into.setdefault(name, {})
        for key, value in series.items():
            target[key] = max(target.get(key, value), value)


def merge_shards(shards: Iterable[Shard], now: float, source: str = "merged") -> Shard:
    """The shards added up (a new shard; the inputs are left alone). Levels only from shards
    published within LEVEL_FRESH_S; a shard older than that counts as a stale source."""
    merged = Shard(source, now, sources={})
    steps: list[Steps] = []
    for shard in shards:
        _add_into(merged.sums, shard.sums)
        _max_into(merged.peaks, shard.peaks)
        fresh = now - shard.at <= LEVEL_FRESH_S
        if fresh:
            _add_into(merged.levels, shard.levels)
        for state, count in shard.sources.items():
            state = "stale" if state == "live" and not fresh else state
            merged.sources[state] = merged.sources.get(state, 0) + count
        steps.append(shard.steps)
    merged.steps.update(merge_steps(steps, now))
    return merged


def retire(shard: Shard) -> Shard:
    """A stopped replica's shard as it stays counted: its counts, no levels, its sources
    retired."""
    count = sum(shard.sources.values())
    return Shard(
        shard.source, shard.at, shard.sums, shard.peaks, {}, shard.steps, {"retired": count}
    )


def shard_to_json(shard: Shard) -> dict[str, Any]:
    """Counts only (for storage: the recent steps and levels are not kept)."""

    def plain(families: Mapping[str, Series]) -> dict[str, Any]:
        return {
            name: [[list(k), v] for k, v in series.items()] for name, series in families.items()
        }

    return {
        "source": shard.source,
        "at": shard.at,
        "sums": plain(shard.sums),
        "peaks": plain(shard.peaks),
        "sources": shard.sources,
    }


def shard_from_json(data: Mapping[str, Any]) -> Shard:
    def families(raw: Mapping[str, Any]) -> dict[str, Series]:
        return {name: {tuple(k): v for k, v in rows} for name, rows in raw.items()}

    return Shard(
        str(data["source"]),
        float(data["at"]),
        families(data.get("sums", {})),
        families(data.get("peaks", {})),
        sources={str(k): int(v) for k, v in data.get("sources", {}).items()},
    )


# --- sharing: publishing this replica's shard, reading the others' ----------------------------


class Share(Protocol):
    """Where the replicas' shards meet (app.deployments.metrics_sink over Ray; a dict in tests)."""

    async def publish(self, shard: Shard) -> None:
        """Keep `shard` as its source's latest."""
        ...

    async def exchange(self, shard: Shard) -> Shard:
        """Keep `shard`, and answer the merge of every other source's latest (stopped ones'
        included)."""
        ...


class Sharing:
    """This replica's side: publishes its shard every PUBLISH_EVERY_S when its counts changed
    (and every HEARTBEAT_S regardless), exchanges it when `/metrics` or the dashboard is read,
    publishes a last time when the replica stops. Without a share the view is this replica's
    own counts."""

    def __init__(self) -> None:
        self.share: Share | None = None
        self.source = f"process-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.others: Shard | None = None
        self._task: asyncio.Task[None] | None = None
        self._sent: tuple[Any, ...] | None = None
        self._sent_at = -math.inf
        self._failing = False

    def connect(self, share: Share | None, source: str | None = None) -> None:
        """Share this replica's metrics through `share` as `source` (publishing starts now if
        an event loop runs here, else when the app starts; None: stop sharing)."""
        self.share = share
        self.source = source or self.source
        self.others = None
        self._sent = None
        with contextlib.suppress(RuntimeError):  # no running event loop: the app starts it
            self.start()

    def view(self, now: float | None = None) -> Shard:
        """The whole service's counts as far as this replica knows: its own, now, plus the other
        replicas' as of the last exchange."""
        now = time.time() if now is None else now
        own = local_shard(self.source, now)
        if self.others is None:
            return own
        return merge_shards([own, self.others], now)

    async def exchange(self) -> None:
        """Refresh the other replicas' counts (keeping the last ones if the share fails)."""
        if self.share is None:
            return
        shard = local_shard(self.source, time.time())
        try:
            self.others = await asyncio.wait_for(self.share.exchange(shard), CALL_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - the last merge stands; logged once a streak
            self._failed("exchange", error)
            return
        self._sent, self._sent_at, self._failing = shard.counts(), time.monotonic(), False

    async def publish(self, force: bool = False) -> bool:
        """Publish this replica's shard if its counts changed since the last one sent (or the
        heartbeat is due, or `force`); True if it was sent."""
        if self.share is None:
            return False
        shard = local_shard(self.source, time.time())
        counts = shard.counts()
        due = time.monotonic() - self._sent_at >= HEARTBEAT_S
        if not (force or due or counts != self._sent):
            return False
        try:
            await asyncio.wait_for(self.share.publish(shard), CALL_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - the next tick retries (counts are cumulative)
            self._failed("publish", error)
            return False
        self._sent, self._sent_at, self._failing = counts, time.monotonic(), False
        return True

    def _failed(self, what: str, error: Exception) -> None:
        if not self._failing:
            logger.warning(
                "metrics %s failed (%s: %s); retrying", what, type(error).__name__, error
            )
        self._failing = True

    def start(self) -> None:
        """Start publishing (on the running event loop), if connected to a share."""
        if self.share is not None and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._publish_forever())

    async def stop(self) -> None:
        """Stop publishing, then publish the last counts (a replica that stops keeps them
        counted)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.publish(force=True)

    async def _publish_forever(self) -> None:
        while True:
            await asyncio.sleep(PUBLISH_EVERY_S)
            await self.publish()


SHARING = Sharing()


class SharedCollector:
    """Exports the request metrics as `SHARING.view()` has them (the whole service's when this
    replica shares its metrics)."""

    def describe(self) -> Iterator[Metric]:
        for family in FAMILIES.values():
            yield family.exposition({})
        yield GaugeMetricFamily(SOURCES, SOURCES_DOC, labels=["state"])

    def collect(self) -> Iterator[Metric]:
        view = SHARING.view()
        for family in FAMILIES.values():
            sections = view.peaks if isinstance(family, Peaks) else view.sums
            if isinstance(family, Level):
                sections = view.levels
            yield family.exposition(sections.get(family.name, {}))
        sources = GaugeMetricFamily(SOURCES, SOURCES_DOC, labels=["state"])
        for state in ("live", "stale", "retired"):
            sources.add_metric([state], view.sources.get(state, 0))
        yield sources


REGISTRY.register(SharedCollector())


# --- gauges from the worker snapshot (whole-service already) ----------------------------------

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
ENGINE_TOKENS = Gauge(
    f"{PREFIX}_engine_tokens",
    "vLLM's own token counters of a worker's engines since they started (kind: prompt, "
    "generation): what billed usage reconciles with.",
    ["worker", "profile", "kind"],
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


def total(family: Family, view: Shard | None = None, **labels: str) -> float:
    """A family's value summed over the series whose labels match `labels` (histograms: their
    count), in `view` (default: SHARING.view())."""
    view = SHARING.view() if view is None else view
    section = view.peaks if isinstance(family, Peaks) else view.sums
    if isinstance(family, Level):
        section = view.levels
    positions = [(family.labels.index(name), value) for name, value in labels.items()]
    result = 0.0
    for key, value in section.get(family.name, {}).items():
        if all(key[index] == wanted for index, wanted in positions):
            result += sum(value[:-1]) if isinstance(value, list) else value
    return result


# --- requests ---------------------------------------------------------------------------------

KNOWN_POOLS: set[str] = {DEFAULT_POOL}
"""Pools known to exist (or to have existed): from the pool list `/metrics` and the dashboard
read, and from requests that reached a worker."""


def note_pools(names: Iterable[str]) -> None:
    KNOWN_POOLS.update(names)


class RequestObservation:
    """One HTTP request as the middleware sees it; the stream hooks fill in what they see."""

    __slots__ = ("model", "pool", "scope", "served", "started", "stream_error_code")

    def __init__(self, scope: MutableMapping[str, Any]) -> None:
        self.scope = scope
        self.started = time.perf_counter()
        self.stream_error_code: str | None = None
        self.pool = ""  # set once the request is a generation (observe_generation)
        self.model = ""
        self.served = False  # a worker answered (so its pool exists)

    @property
    def route(self) -> str:
        route = self.scope.get("route")
        path = getattr(route, "path", None)
        return str(path) if path else UNMATCHED_ROUTE

    def pool_label(self, code: str | None) -> str:
        pool = self.pool
        if self.served or not pool or pool in KNOWN_POOLS or code not in POOL_UNCHECKED_CODES:
            return pool
        return UNKNOWN_POOL


CURRENT_REQUEST: contextvars.ContextVar[RequestObservation | None] = contextvars.ContextVar(
    "poolserve_request", default=None
)


def observe_generation(request: GenerationRequest) -> None:
    """The request being observed is this generation: its pool and model label its metrics."""
    observation = CURRENT_REQUEST.get()
    if observation is not None:
        observation.pool = tenant_pool(request)
        observation.model = request.model


def record_request(
    route: str,
    method: str,
    status: int,
    code: str | None,
    observation: RequestObservation | None = None,
) -> None:
    pool = model = ""
    if observation is not None and observation.model:
        pool, model = observation.pool_label(code), observation.model
    REQUESTS.inc((route, method, str(status), code or NO_CODE, pool, model))
    if code:
        RECENT.errors.append((time.time(), code, pool, model))


def record_routing(reason: str, prefix_match: int) -> None:
    ROUTING_DECISIONS.inc((reason,))
    if prefix_match:
        ROUTING_PREFIX_BLOCKS.inc((), prefix_match)


def record_disconnect(route: str) -> None:
    CLIENT_DISCONNECTS.inc((route,))


# --- streams ----------------------------------------------------------------------------------


class StreamWatch:
    """Observes one generation's chunk batches as the ingress relays them (buffered or SSE)."""

    __slots__ = (
        "_closed",
        "_counted",
        "_created",
        "_first_text_at",
        "_last_text_at",
        "_request",
        "_terminal",
        "route",
    )

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
            STREAMS_IN_FLIGHT.add((self.route,), 1)
            if self._request is not None:
                self._request.served = True
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
            STREAMS_IN_FLIGHT.add((self.route,), -1)
        terminal = self._terminal
        if terminal is None or terminal.finish_reason == "cancelled":
            CANCELLATIONS.inc((self.route,))
            return
        if terminal.error_code:
            return
        self._observe(terminal)

    def _observe(self, terminal: GenerationChunk) -> None:
        request = self._request
        pool = model = ""
        if request is not None and request.model:
            pool, model = request.pool, request.model
            KNOWN_POOLS.add(pool)
        key = (self.route, pool, model)
        tokens = terminal.completion_tokens or 0
        PROMPT_TOKENS.inc(key, terminal.prompt_tokens or 0)
        GENERATION_TOKENS.inc(key, tokens)
        ttft = tpot = None
        if request is not None and self._first_text_at is not None:
            ttft = self._first_text_at - request.started
            TIME_TO_FIRST_TOKEN.observe(key, ttft)
        if self._first_text_at is not None and self._last_text_at is not None and tokens >= 2:
            tpot = (self._last_text_at - self._first_text_at) / (tokens - 1)
            TIME_PER_OUTPUT_TOKEN.observe(key, tpot)
        engine_ttft = terminal.ttft_ms / 1000 if terminal.ttft_ms is not None else None
        engine_tpot = terminal.tpot_ms / 1000 if terminal.tpot_ms is not None else None
        if engine_ttft is not None:
            ENGINE_TIME_TO_FIRST_TOKEN.observe(key, engine_ttft)
            if ttft is not None:
                QUEUE_TIME.observe(key, max(0.0, ttft - engine_ttft))
        if engine_tpot is not None:
            ENGINE_TIME_PER_OUTPUT_TOKEN.observe(key, engine_tpot)
        RECENT.samples.append(
            Sample(time.time(), ttft, tpot, engine_ttft, engine_tpot, tokens, pool, model)
        )


# --- snapshot gauges: moved from a worker snapshot -------------------------------------------


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
        ENGINE_TOKENS,
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
        stats = [s.stats for s in worker.models if s.stats is not None]
        ENGINE_PREEMPTIONS.labels(worker.worker_id, worker.profile).set(
            sum(s.preemptions for s in stats)
        )
        for kind, tokens in (
            ("prompt", sum(s.prompt_tokens_total for s in stats)),
            ("generation", sum(s.generation_tokens_total for s in stats)),
        ):
            ENGINE_TOKENS.labels(worker.worker_id, worker.profile, kind).set(tokens)
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
                AUTOSCALER_DECISIONS.inc((str(entry.get("kind", "other")),))
                newest = max(newest, at)
        self.seen_until = newest
        for profile, target in (status.get("replicas") or {}).items():
            AUTOSCALER_TARGET_REPLICAS.labels(str(profile)).set(int(target))


TALLY = DecisionTally()
