"""The control plane's costs, in process and without Ray (issue 27): each decision timed on the
pure code at scale, and the control actors' methods called directly with fake stores, compared
with the targets in the same invocation. Prints a table (and `--markdown FILE` writes it) with
the machine's load average, which every figure needs beside it.

    .venv/bin/python benchmarks/bench_scale.py [--only routing,pools,limits,ledger,registry]
        [--quick] [--markdown FILE]
    .venv/bin/python benchmarks/bench_scale.py --only ledger-ray

- routing: `app.routing.affinity.rank` + `app.routing.targets.choose_target` at 1,000 workers;
- pools: one `app.pools.decide.decide` round at 10,000 pools x 1,000 workers;
- limits: `app.tenancy.quota.LocalLimits.admit` + `finish` with 100,000 API keys known, and
  the ledger's `QuotaBook.sync` per subject reported;
- ledger: the TenantLedger's `record_usage` in groups as the ingress sends them (its group
  commit to a fake GCS KV store whose writes take `--kv-put-ms` each, in a thread as in the
  actor): requests accounted per second and CPU per request;
- registry: the PoolAutoscaler's `routing_snapshot` (pickled, as Ray sends it) per pull vs
  workers, versioned pulls while nothing changes, and a `heartbeat` per worker;
- ledger-ray (only when named: heavy, it starts its own local Ray instance): the ledger's
  `record_usage` through a DeploymentHandle and Serve, with the real GCS KV store.

Figures here are one process on this machine; what a multi-node cluster adds (Ray's per-call
cost between nodes) is `make bench-scale`'s cluster part.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import inspect
import os
import pickle
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import AppConfig, Limits
from app.tenancy.limits import Ticket

Row = tuple[str, str, str, str, str]  # what, scale, measured, target, verdict


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def per_call(fn: Callable[[], object], min_seconds: float = 0.5, repeats: int = 5) -> float:
    """Median over `repeats` of the mean seconds per call over >= `min_seconds`."""
    gc.collect()
    runs = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds / repeats:
                break
        runs.append(elapsed / calls)
    return statistics.median(runs)


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f} us"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.2f} ms"


def verdict(value: float, target: float, lower_is_better: bool = True) -> str:
    ok = value <= target if lower_is_better else value >= target
    return "meets" if ok else "MISSES"


# --- routing -------------------------------------------------------------------------------------


def worker_statuses(count: int, pools: int = 1, now: float | None = None) -> list[Any]:
    from app.protocol.workers import EngineStats, ModelStatus, WorkerStatus

    now = time.time() if now is None else now
    stats = EngineStats("m", 4096, 16, 0.3, 3, 4096, kv_blocks_used=1200, max_chars_per_token=16)
    return [
        WorkerStatus(
            worker_id=f"worker-{n:05d}",
            deployment="Generator-gpu",
            profile="gpu",
            node_id=f"node-{n // 8:04d}",
            pool="default" if pools == 1 else f"pool-{n % pools:05d}",
            models=(ModelStatus("m", "loaded", stats=stats),),
            active_requests=n % 7,
            reported_at=now,
        )
        for n in range(count)
    ]


def routing_config() -> AppConfig:
    return AppConfig.model_validate(
        {
            "models": [{"id": "m", "source": "null", "profiles": ["gpu"]}],
            "profiles": [{"name": "gpu"}],
        }
    )


def routing_stats_of(statuses: list[Any]) -> dict[str, dict[str, object]]:
    return {
        s.worker_id: {
            "active": s.active_requests,
            "kv": {"m": {"free_blocks": 2000, "block_size": 16, "waiting": 0}},
        }
        for s in statuses
    }


def routing_requests(count: int) -> list[Any]:
    """Chat-like: 20 shared system prompts, each request its own tail."""
    from app.protocol.generation import GenerationRequest, SamplingOptions

    systems = [f"system prompt {n} " * 40 for n in range(20)]
    return [
        GenerationRequest(
            f"r{n}",
            "m",
            SamplingOptions(max_new_tokens=64),
            prompt=systems[n % 20] + f"question {n} " * 30,
        )
        for n in range(count)
    ]


def time_rank_path(count: int) -> float:
    """What the ingress does per request today: choose_target over the snapshot, a load per
    ready worker, the prefix match of each, rank over all."""
    from app.routing.affinity import PrefixIndex, affinity_keys, estimated_blocks, rank, worker_load
    from app.routing.targets import choose_target

    config, statuses = routing_config(), worker_statuses(count)
    stats, requests, index = routing_stats_of(statuses), routing_requests(1000), PrefixIndex()
    now, serial = time.time(), iter(range(10**12))

    def decide() -> None:
        request = requests[next(serial) % len(requests)]
        target = choose_target(config, statuses, request, now)
        loads = [worker_load(w, 0, stats[w], "m") for w in target.ready_workers]
        keys = affinity_keys(request)
        decision = rank(
            loads,
            keys,
            {w.worker_id: index.match(w.worker_id, keys) for w in loads},
            {w.worker_id: estimated_blocks(request, 16) for w in loads},
            4,
        )
        index.record(decision.chosen, keys)

    return per_call(decide, min_seconds=1.0, repeats=3)


def time_board_path(count: int) -> float:
    """The same decisions with app.routing.board: TargetIndex per snapshot, RoutingBoard per
    replica, with the load updates a request causes (its start at the chosen worker, another
    request's end, a worker's new stats)."""
    from app.routing.board import RoutingBoard, TargetIndex

    config, statuses = routing_config(), worker_statuses(count)
    stats, requests = routing_stats_of(statuses), routing_requests(1000)
    now, serial = time.time(), iter(range(10**12))
    targets, board = TargetIndex(config, statuses), RoutingBoard(4)
    ids = [s.worker_id for s in statuses]
    ongoing = dict.fromkeys(ids, 0)

    def decide() -> None:
        n = next(serial)
        request = requests[n % len(requests)]
        target = targets.choose(request, now)
        chosen = board.choose(target.ready_workers, request).chosen
        ongoing[chosen] += 1
        board.update(chosen, ongoing[chosen], stats[chosen])
        other = ids[(n * 7919) % count]  # a request ends elsewhere; a worker sends stats
        ongoing[other] = max(0, ongoing[other] - 1)
        board.update(other, ongoing[other], stats[other])

    return per_call(decide, min_seconds=1.0, repeats=3)


def bench_routing(quick: bool) -> list[Row]:
    rows: list[Row] = []
    for count in (1000,) if quick else (100, 1000):
        target = count == 1000
        for label, timer in (
            (
                "choose_target + rank over every worker (the ingress before the board)",
                time_rank_path,
            ),
            ("TargetIndex + RoutingBoard, with 2 load updates", time_board_path),
        ):
            try:
                seconds = timer(count)
            except ImportError:  # a tree from before app.routing.board
                continue
            rows.append(
                (
                    f"routing decision: {label}",
                    f"{count:,} workers",
                    us(seconds),
                    "<= 50 us" if target else "",
                    verdict(seconds, 50e-6) if target else "",
                )
            )
    return rows


# --- pool decisions ------------------------------------------------------------------------------


def pool_round(pools: int, workers: int, assigned: bool) -> tuple[float, float]:
    """One decide() round: half the workers' worth of pools ask for a GPU each, the rest are
    leased with no requirement. `assigned`: the previous round's assignments hold (a steady
    round); else every requirement is new (a cold round: every worker is placed)."""
    from app.pools.book import PoolBook
    from app.pools.decide import Snapshot, WorkerView, decide
    from app.pools.model import PoolRecord, PoolSpec

    config = AppConfig.model_validate(
        {
            "models": [{"id": "m", "source": "null", "profiles": ["gpu"]}],
            "profiles": [{"name": "gpu", "num_replicas": 10, "max_replicas": 2000}],
        }
    )
    now = time.time()
    records = {
        f"pool-{n:05d}": PoolRecord(
            spec=PoolSpec(name=f"pool-{n:05d}", gpus={"gpu": 1} if n < workers // 2 else {}),
            created_at=now - 1000 + n * 0.01,
            last_renewed=now,
            lease_seconds=3600,
            state="active",
        )
        for n in range(pools)
    }
    views = [
        WorkerView(f"worker-{n:05d}", "gpu", frozenset({"m"}), active_requests=n % 5)
        for n in range(workers)
    ]
    assignments = (
        {f"worker-{n:05d}": f"pool-{n:05d}" for n in range(workers // 2)} if assigned else {}
    )
    snapshot = Snapshot(
        pools=records, workers=views, assignments=assignments, replicas={"gpu": workers}
    )
    decide_s = per_call(lambda: decide(snapshot, config, now), min_seconds=2.0, repeats=3)
    decision = decide(snapshot, config, now)
    book = PoolBook(pools=records, assignments=assignments, replicas={"gpu": workers})

    def apply_and_save() -> None:
        book.apply(decision)  # compares the book's JSON before and after
        book.model_dump_json()  # what GcsStore.save writes when it changed

    return decide_s, per_call(apply_and_save, min_seconds=1.0, repeats=3)


def bench_pools(quick: bool) -> list[Row]:
    rows: list[Row] = []
    sizes = ((10_000, 1000),) if quick else ((1000, 1000), (10_000, 1000))
    for pools, workers in sizes:
        for assigned in (True, False):
            seconds, apply_s = pool_round(pools, workers, assigned)
            big = pools == 10_000
            kind = "steady" if assigned else "cold: 500 pools placed"
            rows.append(
                (
                    f"pool decision round (decide), {kind}",
                    f"{pools:,} pools x {workers:,} workers",
                    ms(seconds),
                    "<= 100 ms" if big else "",
                    verdict(seconds, 0.1) if big else "",
                )
            )
            if assigned:
                rows.append(
                    (
                        "  then PoolBook.apply + the book's JSON (saved when changed)",
                        f"{pools:,} pools x {workers:,} workers",
                        ms(apply_s),
                        "",
                        "every control round (1 s)",
                    )
                )
    return rows


# --- limits --------------------------------------------------------------------------------------


def limit_ticket(n: int, keys: int) -> Ticket:
    key = n % keys
    return Ticket(
        f"req-{n}",
        (
            (("pool", "p"), Limits(requests_per_minute=10**9, concurrent_streams=100_000)),
            (("key", f"key-{key:012d}"), KEY_LIMITS[key % len(KEY_LIMITS)]),
        ),
        300,
    )


KEY_LIMITS = [Limits(requests_per_minute=600, tokens_per_minute=200_000) for _ in range(10)]


async def client_latency(ledger: Any, keys: int) -> tuple[float, float, int]:
    """Requests one after another through a QuotaClient whose syncs reach `ledger` directly
    (no Ray): the time each spends in limits, its syncs running beside them."""
    from app.tenancy.quota import QuotaClient, SyncReport

    async def send(report: SyncReport) -> Any:
        await asyncio.sleep(0.001)  # a round trip
        return ledger.sync("client", report, time.monotonic())

    client = QuotaClient(send)
    times: list[float] = []
    serial = iter(range(10**12))
    stop_at = time.perf_counter() + 2.0
    while time.perf_counter() < stop_at:
        ticket = limit_ticket(next(serial), keys)
        start = time.perf_counter()
        await client.admit(ticket)
        client.finish(ticket.request_id, 200)
        times.append(time.perf_counter() - start)
        if len(times) % 64 == 0:
            await asyncio.sleep(0)  # other requests' turn (and the sync loop's)
    await client.stop()
    times.sort()
    return times[len(times) // 2], times[len(times) * 99 // 100], client.limits.syncs


def bench_limits(quick: bool) -> list[Row]:
    """4 ingress replicas and one QuotaBook; 100,000 API keys, every one used once per round
    (a key's requests land on one replica a round), a sync per replica per round."""
    try:
        from app.tenancy.quota import LocalLimits, QuotaBook
    except ImportError:  # a tree from before leased quota
        return []

    keys, replicas = 100_000, 4
    ledger, locals_ = QuotaBook(), [LocalLimits() for _ in range(replicas)]
    now = 1000.0
    for n, local in enumerate(locals_):
        local.apply_grant(ledger.sync(f"r{n}", local.sync_request(now), now), now)
    serial = iter(range(10**12))
    sync_s, entries = 0.0, 0
    for round_ in range(3):
        now += 0.5
        for local in locals_:
            for _ in range(keys // replicas):
                ticket = limit_ticket(next(serial), keys)
                if local.admit(ticket, now) is None:
                    local.finish(ticket.request_id, 200, now)
        reports = [local.sync_request(now) for local in locals_]
        start = time.perf_counter()
        grants = [ledger.sync(f"r{n}", report, now) for n, report in enumerate(reports)]
        if round_ == 2:  # subjects known: the steady cost
            sync_s = time.perf_counter() - start
            entries = sum(len(report.entries) for report in reports)
            size = sum(len(pickle.dumps(report)) for report in reports)
            grant_size = sum(len(pickle.dumps(grant)) for grant in grants)
        for local, grant in zip(locals_, grants, strict=True):
            local.apply_grant(grant, now)
    local = locals_[0]
    tickets = [limit_ticket(next(serial), keys) for _ in range(200_000)]

    def admit_and_finish() -> None:
        ticket = tickets[next(serial) % len(tickets)]
        if local.admit(ticket, now) is None:
            local.finish(ticket.request_id, 200, now)

    seconds = per_call(admit_and_finish, min_seconds=1.0)
    waits = sum(each.grant_waits for each in locals_)
    client_p50, client_p99, client_syncs = asyncio.run(client_latency(ledger, keys))
    return [
        (
            "limit admission + finish (LocalLimits), pool + key limits",
            f"{keys:,} keys known",
            us(seconds),
            "<= 20 us",
            verdict(seconds, 20e-6) + f" ({local.local_admissions:,} admitted, {waits} waits)",
        ),
        (
            "limits added to a request: await QuotaClient.admit + finish, sync in background",
            f"{keys:,} keys, 1 replica, 2 s",
            f"p50 {us(client_p50)}, p99 {us(client_p99)}",
            "p50 <= 0.2 ms",
            verdict(client_p50, 200e-6) + f" ({client_syncs} syncs)",
        ),
        (
            "ledger: QuotaBook.sync, per subject reported (steady)",
            f"{entries:,} subject reports from {replicas} replicas",
            us(sync_s / max(1, entries)),
            "",
            f"report {size / max(1, entries):.0f} B + grant {grant_size / max(1, entries):.0f} B "
            "per subject (pickled)",
        ),
    ]


# --- the ledger's ceiling ------------------------------------------------------------------------


class FakeKv:
    """Ray's GCS KV store as the ledger calls it, each write taking `put_s` (a GCS round
    trip), off the event loop as in the actor."""

    def __init__(self, put_s: float) -> None:
        self.data: dict[str, bytes] = {}
        self.put_s = put_s
        self.puts = 0
        self.bytes = 0

    def get(self, key: str | bytes, namespace: str) -> bytes | None:
        return self.data.get(key.decode() if isinstance(key, bytes) else key)

    def put(self, key: str, value: str | bytes, namespace: str) -> None:
        if self.put_s:
            time.sleep(self.put_s)
        raw = value.encode() if isinstance(value, str) else value
        self.data[key] = raw
        self.puts += 1
        self.bytes += len(raw)

    def delete(self, key: str | bytes, namespace: str) -> None:
        self.data.pop(key.decode() if isinstance(key, bytes) else key, None)

    def keys(self, prefix: str, namespace: str) -> list[bytes]:
        return [k.encode() for k in self.data if k.startswith(prefix)]


def ledger_module() -> Any:
    """`app.deployments.tenant_ledger` (`app.deployments.tenancy` in a `--tree` from before it
    was renamed)."""
    try:
        return importlib.import_module("app.deployments.tenant_ledger")
    except ImportError:
        return importlib.import_module("app.deployments.tenancy")


def record_usage(ledger: Any) -> Any:
    """The ledger's usage write (`report_usage` in a `--tree` from before it was renamed)."""
    return getattr(ledger, "record_usage", None) or ledger.report_usage


@contextlib.contextmanager
def fake_ray_for_ledger(kv: FakeKv) -> Iterator[None]:
    tenancy = ledger_module()

    with contextlib.ExitStack() as stack:
        for name, fn in (
            ("kv_get", kv.get),
            ("kv_put", kv.put),
            ("kv_delete", kv.delete),
            ("kv_keys", kv.keys),
        ):
            stack.enter_context(mock.patch.object(tenancy, name, fn))
        stack.enter_context(
            mock.patch.object(
                tenancy.serve, "get_replica_context", lambda: SimpleNamespace(app_name="bench")
            )
        )
        yield


def make_ledger(kv: FakeKv) -> Any:
    async def snapshot() -> tuple[list[Any], dict[str, Any]]:
        return [], {}

    autoscaler = SimpleNamespace(routing_snapshot=SimpleNamespace(remote=snapshot))
    # the AppConfig itself: a tree whose deployments validated a dict takes it as well
    return ledger_module().TenantLedger(AppConfig(), autoscaler)


def usage_records(
    prefix: str, serial: Iterator[int], count: int, keys: int
) -> list[tuple[str, Any]]:
    """`count` usage records as a worker sends them, spread over `keys` API keys."""
    from app.tenancy.usage import UsageRecord

    records = []
    for _ in range(count):
        i = next(serial)
        rid = f"{prefix}-{i}"
        records.append((rid, UsageRecord(rid, "default", "m", f"key-{i % keys:012d}", 120, 40, 64)))
    return records


async def ledger_ceiling(
    seconds: float, group: int, ingresses: int, keys: int, put_s: float
) -> dict[str, float]:
    """`ingresses` callers, each sending its next group as soon as the last was acknowledged
    (the GroupCall pattern at saturation): reports acknowledged per second, CPU per report."""
    tenancy = ledger_module()

    kv = FakeKv(put_s)
    compact_s = seconds / 4  # several compactions in the run (30 s in production)
    compacting = (
        mock.patch.object(tenancy, "COMPACT_SECONDS", compact_s)
        if hasattr(tenancy, "COMPACT_SECONDS")  # (a tree before the log wrote no compaction)
        else contextlib.nullcontext()
    )
    with fake_ray_for_ledger(kv), compacting:
        ledger = make_ledger(kv)
        counted = 0
        stop_at = time.perf_counter() + seconds
        serial = iter(range(10**12))

        async def ingress(n: int) -> None:
            nonlocal counted
            while time.perf_counter() < stop_at:
                records = usage_records(f"req-{n}", serial, group, keys)
                await record_usage(ledger)(records)
                counted += len(records)

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(ingress(n) for n in range(ingresses)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        for task in ledger._tasks:
            task.cancel()
        await asyncio.gather(*ledger._tasks, return_exceptions=True)
    return {
        "per_second": counted / wall,
        "cpu_per_request": cpu / max(1, counted),
        "puts_per_second": kv.puts / wall,
        "bytes_per_request": kv.bytes / max(1, counted),
    }


def compaction_pause(keys: int) -> tuple[float, int]:
    """The event loop's pause for a compaction's JSON (the book's totals and the current
    minute, `keys` usage keys each), and the bytes it writes."""
    from app.tenancy.usage import UsageRecord

    UsageStore = ledger_module().UsageStore

    kv = FakeKv(0.0)
    with fake_ray_for_ledger(kv):
        store = UsageStore("bench")
        book = store.load(7 * 24 * 60)
        now = 1_800_000_000.0
        for n in range(keys):
            record = UsageRecord(f"req-{n}", "default", "m", f"key-{n:012d}", 120, 40, 64)
            if book.record(record, now):
                store.counted(record, now)
        start = time.perf_counter()
        writes, _ = store.changes(book, compact=True)
        return time.perf_counter() - start, sum(len(value) for value in writes.values())


def bench_ledger(quick: bool, put_ms: float) -> list[Row]:
    UsageStore = ledger_module().UsageStore

    seconds = 5.0 if quick else 20.0
    rows: list[Row] = []
    for group in (16, 64):
        result = asyncio.run(ledger_ceiling(seconds, group, 4, 100_000, put_ms / 1000))
        rows.append(
            (
                f"ledger record_usage, groups of {group} from 4 callers ({seconds:g} s, "
                f"KV put {put_ms:g} ms, compaction every {seconds / 4:g} s)",
                "100,000 keys",
                f"{result['per_second']:,.0f} requests/s; {us(result['cpu_per_request'])} CPU each",
                ">= 20,000 requests/s",
                verdict(result["per_second"], 20_000, lower_is_better=False)
                + f" ({result['puts_per_second']:,.0f} KV writes/s, "
                f"{result['bytes_per_request']:,.0f} B written per request)",
            )
        )
    if not hasattr(UsageStore, "counted"):
        return rows
    pause, written = compaction_pause(100_000)
    rows.append(
        (
            "ledger: a compaction's pause of the event loop (every 30 s)",
            "100,000 keys used in the minute",
            ms(pause),
            "",
            f"{written / 1e6:,.1f} MB written",
        )
    )
    return rows


# --- the ledger through Ray ------------------------------------------------------------------------


async def _call(method: Any) -> Any:
    return await method.remote()


def bench_ledger_ray(quick: bool, profile: Path | None = None) -> list[Row]:
    """A new local Ray instance (not the one `make serve` may run), Serve without HTTP, the
    TenantLedger alone (a stand-in PoolAutoscaler) with the real GCS KV store; this process calls
    it through a DeploymentHandle as a worker does: `callers` concurrent record_usage calls of
    `group` reports each, then sync calls of 200 subjects. Heavy: run only when the machine is
    free (see the README's benchmark rules)."""
    import ray
    from ray import serve

    TenantLedger = ledger_module().TenantLedger

    from app.builder import LEDGER_MAX_ONGOING_REQUESTS
    from app.serve_env import SERVE_ENV

    seconds = 10.0 if quick else 30.0
    os.environ.update({k: os.environ.get(k, v) for k, v in SERVE_ENV.items()})  # as the app runs
    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False)
    rows: list[Row] = []
    try:
        serve.start(http_options={"location": "NoServer"})

        @serve.deployment(name="PoolAutoscaler", ray_actor_options={"num_cpus": 0})
        class Autoscaler:
            async def routing_snapshot(self) -> tuple[list[Any], dict[str, Any]]:
                return [], {}

        @serve.deployment(  # the builder's options (app/builder.py's _ledger)
            name="TenantLedger",
            ray_actor_options={"num_cpus": 0},
            max_ongoing_requests=LEDGER_MAX_ONGOING_REQUESTS,
            logging_config={"enable_access_log": False},
        )
        class Ledger(TenantLedger):
            async def cpu(self) -> float:
                return time.process_time()

            async def pid(self) -> int:  # async, as the ledger's methods (no thread per call)
                return os.getpid()

        def deploy(shards: int) -> list[Any]:
            """The ledger with `shards` usage shards (tenancy.usage_shards), each its own app's
            keys; handles on Serve's gRPC data plane, as the app's (SERVE_ENV)."""
            config = AppConfig.model_validate(
                {"tenancy": {"usage_shards": shards}} if shards > 1 else {}
            )
            autoscaler = Autoscaler.bind()
            others = [
                Ledger.options(name=f"TenantLedger-{i}").bind(config, autoscaler, i, [])
                for i in range(1, shards)
            ]
            serve.run(  # one shard: bound as before the shards (a --tree of then runs too)
                Ledger.bind(config, autoscaler, *([0, others] if others else [])),
                name=f"bench-ledger-{shards}",
                route_prefix=None,
            )
            return [
                serve.get_deployment_handle(name, f"bench-ledger-{shards}").options(
                    _by_reference=False
                )
                for name in ["TenantLedger", *(f"TenantLedger-{i}" for i in range(1, shards))]
            ]

        async def run(
            handles: list[Any], group: int, callers: int
        ) -> tuple[float, list[float], float, list[float]]:
            """requests/s, ledger CPU per request of each shard, this process's CPU per request
            (the callers'), call latencies; caller n bills to shard n % shards, as a worker to
            its shard."""
            serial = iter(range(10**12))
            done = [0] * len(handles)
            latencies: list[float] = []
            stop_at = time.perf_counter() + seconds

            async def caller(n: int) -> None:
                shard = n % len(handles)
                while time.perf_counter() < stop_at:
                    records = usage_records(f"ray-{n}", serial, group, 100_000)
                    start = time.perf_counter()
                    await record_usage(handles[shard]).remote(records)
                    latencies.append(time.perf_counter() - start)
                    done[shard] += group

            cpu0 = [await handle.cpu.remote() for handle in handles]
            driver0, wall = time.process_time(), time.perf_counter()
            await asyncio.gather(*(caller(n) for n in range(callers)))
            wall, driver = time.perf_counter() - wall, time.process_time() - driver0
            cpu = [await h.cpu.remote() - c for h, c in zip(handles, cpu0, strict=True)]
            each = [c / max(1, d) for c, d in zip(cpu, done, strict=True)]
            return sum(done) / wall, each, driver / max(1, sum(done)), sorted(latencies)

        handles = deploy(1)
        handle = handles[0]
        # one call in flight per caller (a worker): with few callers the round trip (the group
        # commit's GCS write) bounds the rate; with many, one write acknowledges many calls
        for group, callers in ((16, 4), (16, 16), (16, 64), (64, 4)):
            spy = None
            if profile is not None:
                pid = asyncio.run(_call(handle.pid))
                profile.mkdir(parents=True, exist_ok=True)
                spy = subprocess.Popen(
                    [
                        str(Path(sys.executable).parent / "py-spy"),
                        "record",
                        "--pid",
                        str(pid),
                        "--duration",
                        str(int(seconds)),
                        "--rate",
                        "50",
                        "--format",
                        "raw",
                        "--output",
                        str(profile / f"ledger-groups-{group}-callers-{callers}.txt"),
                        "--nonblocking",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            per_second, (cpu,), driver, latencies = asyncio.run(run(handles, group, callers))
            if spy is not None:
                spy.wait(timeout=60)
            rows.append(
                (
                    f"ledger through Ray: record_usage, groups of {group} from {callers} "
                    f"callers ({seconds:g} s, real GCS KV)",
                    "100,000 keys",
                    f"{per_second:,.0f} requests/s; {us(cpu)} ledger CPU each",
                    ">= 20,000 requests/s",
                    verdict(per_second, 20_000, lower_is_better=False)
                    + f" (call p50 {ms(latencies[len(latencies) // 2])}; "
                    f"callers' CPU {us(driver)} each)",
                )
            )

        async def empty_calls(callers: int, count: int, by_reference: bool) -> tuple[float, float]:
            empty = handle.options(_by_reference=by_reference).pid
            cpu0 = await handle.cpu.remote()
            wall = time.perf_counter()

            async def caller() -> None:
                for _ in range(count // callers):
                    await empty.remote()

            await asyncio.gather(*(caller() for _ in range(callers)))
            wall = time.perf_counter() - wall
            return (await handle.cpu.remote() - cpu0) / count, count / wall

        for by_reference, transport in ((False, "gRPC"), (True, "Ray actor call")):
            cpu_per_call, calls_per_s = asyncio.run(empty_calls(4, 2000, by_reference))
            rows.append(
                (
                    f"ledger through Ray: a call that does nothing, {transport} "
                    "(Serve's own cost per call)",
                    "4 callers",
                    f"{us(cpu_per_call)} ledger CPU each",
                    "",
                    f"{calls_per_s:,.0f} calls/s",
                )
            )
        if "shard" not in inspect.signature(TenantLedger.__init__).parameters:
            return rows  # a --tree from before the shards
        sharded = deploy(2)
        per_second, each, driver, latencies = asyncio.run(run(sharded, 16, 64))
        rows.append(
            (
                f"ledger through Ray, 2 usage shards: record_usage, groups of 16 from 64 "
                f"callers (32 per shard; {seconds:g} s, real GCS KV)",
                "100,000 keys",
                f"{per_second:,.0f} requests/s; "
                + " / ".join(us(cpu) for cpu in each)
                + " ledger CPU each (shard 0 / 1)",
                ">= 20,000 requests/s",
                verdict(per_second, 20_000, lower_is_better=False)
                + f" (call p50 {ms(latencies[len(latencies) // 2])}; "
                f"callers' CPU {us(driver)} each)",
            )
        )
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
    return rows


# --- the registry --------------------------------------------------------------------------------


@contextlib.contextmanager
def fake_ray_for_autoscaler() -> Iterator[None]:
    from app.deployments import autoscaler, pool_store

    kv = FakeKv(0.0)
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            mock.patch.object(
                autoscaler.serve, "get_replica_context", lambda: SimpleNamespace(app_name="bench")
            )
        )
        stack.enter_context(mock.patch.object(pool_store, "kv_get", kv.get))
        stack.enter_context(mock.patch.object(pool_store, "kv_put", kv.put))
        yield


def registry_costs(count: int, pools: int = 50) -> dict[str, float]:
    """The PoolAutoscaler's registry with `count` workers and `pools` pools, called directly:
    a pull as Ray carries it (built, pickled, unpickled), a heartbeat (with a scale event
    waiting to be reached, as after every scale-up), and a versioned pull while nothing
    changed."""
    from app.deployments.autoscaler import ScaleEvent
    from app.pools.model import PoolRecord, PoolSpec

    with fake_ray_for_autoscaler():
        scaler = asyncio.run(_make_autoscaler())
        scaler._loop.cancel()
        now = time.time()
        statuses = worker_statuses(count, now=now)
        heartbeat = getattr(scaler, "heartbeat", None) or scaler.report  # (`report` before)
        for status in statuses:
            heartbeat(status)
        for n in range(pools):
            spec = PoolSpec(name=f"pool-{n:05d}", gpus={"gpu": 1})
            scaler._book.pools[spec.name] = PoolRecord(
                spec=spec, created_at=now, last_renewed=now, lease_seconds=3600
            )
        scaler._registry._full_at = 0.0
        scaler._events.append(ScaleEvent("gpu", count, count + 1, now, applied_at=now))
        loop = asyncio.new_event_loop()

        def pull() -> object:
            return pickle.loads(pickle.dumps(loop.run_until_complete(scaler.routing_snapshot())))

        payload = pickle.dumps(loop.run_until_complete(scaler.routing_snapshot()))
        costs = {"pull_s": per_call(pull, min_seconds=1.0, repeats=3), "bytes": len(payload)}
        beat = iter(range(10**12))
        costs["heartbeat_s"] = per_call(
            lambda: heartbeat(statuses[next(beat) % count]), min_seconds=0.5
        )
        if hasattr(scaler, "routing_snapshot_since"):
            version = loop.run_until_complete(scaler.routing_snapshot_since(None))[0]

            def unchanged() -> object:
                reply = loop.run_until_complete(scaler.routing_snapshot_since(version))
                return pickle.loads(pickle.dumps(reply))

            costs["unchanged_s"] = per_call(unchanged, min_seconds=0.5)
            reply = loop.run_until_complete(scaler.routing_snapshot_since(version))
            costs["unchanged_bytes"] = len(pickle.dumps(reply))
        loop.close()
    return costs


def bench_registry(quick: bool) -> list[Row]:
    rows: list[Row] = []
    for count in (100, 1000) if quick else (100, 1000, 4000):
        costs = registry_costs(count)
        rows.append(
            (
                "registry: routing_snapshot pull (built + pickled + unpickled)",
                f"{count:,} workers",
                f"{ms(costs['pull_s'])}; {costs['bytes'] / 1024:,.0f} KiB",
                "",
                f"each ingress (2 pulls/s): {2 * costs['pull_s'] * 1000:.1f} ms CPU/s",
            )
        )
        rows.append(
            (
                "registry: a heartbeat handled, a scale event pending",
                f"{count:,} workers",
                us(costs["heartbeat_s"]),
                "",
                f"all workers (1 / 2 s each): {count / 2 * costs['heartbeat_s'] * 1e3:.1f} ms CPU/s",
            )
        )
        if "unchanged_s" in costs:
            rows.append(
                (
                    "registry: versioned pull, nothing changed (routing_snapshot_since)",
                    f"{count:,} workers",
                    f"{us(costs['unchanged_s'])}; {costs['unchanged_bytes']:.0f} B",
                    "flat in workers",
                    "",
                )
            )
    return rows


async def _make_autoscaler() -> Any:
    from app.deployments.autoscaler import PoolAutoscaler

    return PoolAutoscaler(routing_config())


# --- main ----------------------------------------------------------------------------------------


SECTIONS = ("routing", "pools", "limits", "ledger", "registry")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"sections, of {', '.join((*SECTIONS, 'ledger-ray'))} (ledger-ray: a local Ray)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer sizes, shorter runs")
    parser.add_argument("--kv-put-ms", type=float, default=1.0, help="a GCS KV write's time")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument(
        "--profile-ledger",
        type=Path,
        help="ledger-ray: py-spy the ledger replica into this folder (collapsed stacks)",
    )
    parser.add_argument(
        "--tree", type=Path, help="measure the app package of this tree (e.g. `git archive`d)"
    )
    args = parser.parse_args()
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    started = load()
    rows: list[Row] = []
    if args.tree:  # the same figures for another checkout (e.g. before a change)
        sys.path.insert(0, str(args.tree.resolve()))
        for name in [m for m in sys.modules if m == "app" or m.startswith("app.")]:
            del sys.modules[name]
        global AppConfig, Limits, Ticket
        from app.config import AppConfig, Limits
        from app.tenancy.limits import Ticket
    for section in wanted:
        if section == "routing":
            rows += bench_routing(args.quick)
        elif section == "pools":
            rows += bench_pools(args.quick)
        elif section == "limits":
            rows += bench_limits(args.quick)
        elif section == "ledger":
            rows += bench_ledger(args.quick, args.kv_put_ms)
        elif section == "registry":
            rows += bench_registry(args.quick)
        elif section == "ledger-ray":
            rows += bench_ledger_ray(args.quick, args.profile_ledger)
        else:
            parser.error(f"unknown section {section!r}")
    header = ("what", "scale", "measured", "target", "")
    lines = [
        f"bench_scale ({' '.join(sys.argv[1:]) or 'all'}), {time.strftime('%Y-%m-%d %H:%M')}, "
        f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load (1/5/15 min) "
        f"{started} at start, {load()} at end",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
