"""How the ingress replicas' metrics add up (issue 27): in-process families against
prometheus_client's own semantics, shards and their merge, the sharing protocol over a sink kept
in process (`app.deployments.metrics_sink.SinkBook`, no Ray), the sink's folding of stopped
replicas, the dashboard's mergeable history, and the bounded pool label."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Histogram

from app import history, metrics
from app.api.observe import instrument
from app.config import AppConfig
from app.deployments.metrics_sink import FOLD_AFTER_S, REVIVE_WITHIN_S, SinkBook
from app.history import Sample, Step, Tally
from app.metrics import Shard
from app.server import create_app
from tests.fakes.local_backend import LocalBackend
from tests.unit.test_metrics import value as sample_sum

MODEL = "org/fake-model"
CHAT = "/v1/chat/completions"
NOW = 1_000_000.0


def shard(source: str, at: float = NOW, requests: float = 0.0, **extra: Any) -> Shard:
    key = (CHAT, "POST", "200", "none", "default", MODEL)
    return Shard(source, at, sums={metrics.REQUESTS.name: {key: requests}}, **extra)


def requests_in(view: Shard) -> float:
    return metrics.total(metrics.REQUESTS, view)


class BookShare:
    """metrics.Share over a SinkBook, in process (what MetricsSink does over Ray)."""

    def __init__(self) -> None:
        self.saved: list[str] = []
        self.book = SinkBook(None, self.saved.append)
        self.calls = 0

    async def publish(self, shard: Shard) -> None:
        self.calls += 1
        self.book.take(shard, shard.at)

    async def exchange(self, shard: Shard) -> Shard:
        self.calls += 1
        self.book.take(shard, shard.at)
        return self.book.others(shard.source, shard.at)


@pytest.fixture
def share() -> Iterator[BookShare]:
    share = BookShare()
    metrics.SHARING.connect(share, "this-replica")
    try:
        yield share
    finally:
        metrics.SHARING.connect(None)


def test_timings_export_what_prometheus_client_exports() -> None:
    registry = CollectorRegistry()
    reference = Histogram("ref", "", buckets=metrics.LATENCY_BUCKETS, registry=registry)
    ours = metrics.Timings("test_timings", "", ("route",), metrics.LATENCY_BUCKETS)
    del metrics.FAMILIES[ours.name]  # not one of the service's metrics
    values = [0.0, 0.005, 0.0051, 0.1, 1.0, 59.9, 60.0, 61.0, 1e-9, 3.3]
    for value in values:
        reference.observe(value)
        ours.observe(("r",), value)
    expected = {
        s.labels["le"]: s.value
        for s in next(iter(registry.collect())).samples
        if s.name == "ref_bucket"
    }
    exported = ours.exposition(ours.copy())
    got = {s.labels["le"]: s.value for s in exported.samples if s.name.endswith("_bucket")}
    assert got == expected
    (total,) = [s.value for s in exported.samples if s.name.endswith("_sum")]
    assert total == pytest.approx(sum(values))


def test_merge_adds_counts_takes_the_largest_peak_and_only_fresh_levels() -> None:
    level = {metrics.STREAMS_IN_FLIGHT.name: {(CHAT,): 2.0}}
    peak = metrics.AUTOSCALER_DECISIONS.name
    a = shard("a", requests=3, levels=level, peaks={peak: {("scale_up",): 4.0}})
    b = shard("b", requests=5, levels=level, peaks={peak: {("scale_up",): 6.0}})
    stale = shard("c", at=NOW - metrics.LEVEL_FRESH_S - 1, requests=7, levels=level)
    cell = [1.0] * (len(metrics.LATENCY_BUCKETS) + 2)
    ttft = metrics.TIME_TO_FIRST_TOKEN.name
    a.sums[ttft] = {(CHAT, "default", MODEL): list(cell)}
    b.sums[ttft] = {(CHAT, "default", MODEL): list(cell), (CHAT, "bench", MODEL): [9.0, 9.0]}
    merged = metrics.merge_shards([a, b, stale], NOW)
    assert requests_in(merged) == 15
    assert merged.peaks[peak] == {("scale_up",): 6.0}
    assert metrics.total(metrics.STREAMS_IN_FLIGHT, merged) == 4  # the stale shard's left out
    assert merged.sources == {"live": 2, "stale": 1}
    assert merged.sums[ttft][(CHAT, "default", MODEL)] == [2.0] * len(cell)
    assert merged.sums[ttft][(CHAT, "bench", MODEL)] == [9.0, 9.0]
    assert a.sums[ttft][(CHAT, "default", MODEL)] == cell  # inputs unchanged
    assert requests_in(a) == 3


def test_shards_survive_json_without_levels_and_steps() -> None:
    original = metrics.retire(
        shard(
            "a",
            requests=3,
            peaks={metrics.AUTOSCALER_DECISIONS.name: {("scale_up",): 2.0}},
            levels={metrics.STREAMS_IN_FLIGHT.name: {(CHAT,): 1.0}},
        )
    )
    copy = metrics.shard_from_json(json.loads(json.dumps(metrics.shard_to_json(original))))
    assert (copy.source, copy.at, copy.sums, copy.peaks) == (
        original.source,
        original.at,
        original.sums,
        original.peaks,
    )
    assert copy.levels == {} and copy.sources == {"retired": 1}


def test_the_sink_folds_a_silent_replica_and_takes_it_back_without_double_counting() -> None:
    saved: list[str] = []
    book = SinkBook(None, saved.append)
    book.take(shard("a", requests=10), NOW)
    book.take(shard("b", requests=1), NOW)
    later = NOW + FOLD_AFTER_S + 1
    book.take(shard("b", requests=2), later)  # a has been silent: folded, still counted
    assert set(book.folded) == {"a"} and saved
    assert requests_in(book.others("b", later)) == 10
    assert book.others("b", later).sources == {"retired": 1}
    book.take(shard("a", requests=11), later + 1)  # it was alive after all: taken back
    assert not book.folded
    assert requests_in(book.others("b", later + 1)) == 11
    # a replica folded for REVIVE_WITHIN_S is retired for good, and a restarted sink has it
    end = later + REVIVE_WITHIN_S + FOLD_AFTER_S + 10
    book.take(shard("c", requests=100), end - REVIVE_WITHIN_S - 1)
    book.take(shard("d", requests=1), end)
    assert book.retired is not None and requests_in(book.retired) == 113
    restarted = SinkBook(saved[-1], saved.append)
    restarted.take(shard("d", requests=1), end)
    assert requests_in(restarted.others("d", end)) == 113
    # a sink that ends saves the live replicas too; they are taken back when they publish
    ended = SinkBook(book.dump(with_live=True), saved.append)
    assert requests_in(ended.others("nobody", end)) == 114
    ended.take(shard("d", requests=5), end + 1)
    assert requests_in(ended.others("nobody", end + 1)) == 118


def test_sharing_exchanges_publishes_on_change_and_exports_the_whole_service(
    share: BookShare,
) -> None:
    now = time.time()
    share.book.take(shard("other-replica", at=now, requests=40), now)

    async def run() -> tuple[bool, bool, bool]:
        await metrics.SHARING.exchange()
        share.book.take(shard("other-replica", requests=41), now)  # the other one goes on
        unchanged = await metrics.SHARING.publish()
        metrics.record_request(CHAT, "POST", 200, None)
        changed = await metrics.SHARING.publish()
        forced = await metrics.SHARING.publish(force=True)
        return unchanged, changed, forced

    own = metrics.total(metrics.REQUESTS)
    unchanged, changed, forced = asyncio.run(run())
    assert (unchanged, changed, forced) == (False, True, True)
    # the view: this replica's counts now + the others' as of the last exchange
    assert metrics.total(metrics.REQUESTS) == own + 1 + 40
    text = metrics.render().decode()
    assert 'poolserve_metrics_sources{state="live"} 2.0' in text
    assert (
        f'poolserve_requests_total{{code="none",method="POST",model="{MODEL}",pool="default",'
        f'route="{CHAT}",status="200"}} 40.0'
    ) in text


class FailingShare:
    async def publish(self, shard: Shard) -> None:
        raise ConnectionError("sink down")

    async def exchange(self, shard: Shard) -> Shard:
        raise ConnectionError("sink down")


def test_a_failing_sink_keeps_the_last_merge(share: BookShare) -> None:
    share.book.take(shard("other-replica", requests=7), NOW)
    asyncio.run(metrics.SHARING.exchange())
    before = metrics.total(metrics.REQUESTS)
    metrics.SHARING.share = FailingShare()
    assert asyncio.run(metrics.SHARING.publish(force=True)) is False
    asyncio.run(metrics.SHARING.exchange())
    assert metrics.total(metrics.REQUESTS) == before  # not a drop to this replica's own counts


def test_the_app_publishes_while_it_runs_and_once_more_as_it_stops(share: BookShare) -> None:
    config = AppConfig.model_validate(
        {"engine_adapter": "tests.fakes.fake_engine:FakeAdapter", "models": [{"id": MODEL}]}
    )
    backend = LocalBackend(config)
    with TestClient(instrument(create_app(config, backend))) as client:
        client.portal.call(backend.start)  # type: ignore[union-attr]
        response = client.post(
            "/v1/generate/org__fake-model", json={"prompt": "a b", "max_new_tokens": 3}
        )
        assert response.status_code == 200
        client.get("/metrics")  # an exchange
    assert "this-replica" in share.book.live
    final = share.book.live["this-replica"]
    key = ("/v1/generate/{model:path}", "POST", "200", "none", "default", MODEL)
    assert final.sums[metrics.REQUESTS.name][key] == metrics.REQUESTS.values[key]


def test_an_unknown_pool_is_one_label() -> None:
    observation = metrics.RequestObservation({})
    observation.model, observation.pool = MODEL, "no-such-pool-7f3a"
    assert observation.pool_label(metrics.PoolNotFound.code) == metrics.UNKNOWN_POOL
    assert observation.pool_label(metrics.RateLimited.code) == metrics.UNKNOWN_POOL
    assert observation.pool_label("PROVISIONING") == "no-such-pool-7f3a"  # found, then refused
    metrics.note_pools(["no-such-pool-7f3a"])
    assert observation.pool_label(metrics.RateLimited.code) == "no-such-pool-7f3a"
    metrics.KNOWN_POOLS.discard("no-such-pool-7f3a")
    observation.served = True
    assert observation.pool_label(metrics.RateLimited.code) == "no-such-pool-7f3a"


def test_sketch_percentiles_are_within_two_percent() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(3, 1.2) for _ in range(5000)]
    sketch: history.Sketch = {}
    for value in values:
        history.sketch_add(sketch, value)
    for q in (50, 90, 99):
        exact = history.percentile(values, q)
        assert exact is not None
        assert history.sketch_quantile(sketch, q) == pytest.approx(exact, rel=0.02)
    assert history.sketch_quantile({}, 50) is None


def test_recent_history_adds_up_across_replicas() -> None:
    now = 1_000_000.0 - 1_000_000.0 % history.STEP_S + 5  # 5 s into a step
    replicas = [history.RecentWindow(), history.RecentWindow()]
    for index, window in enumerate(replicas):
        for n in range(10):
            ttft = 0.1 * (index + 1)
            window.samples.append(Sample(now - n, ttft, 0.01, ttft / 2, 0.01, 20, "default", MODEL))
        window.samples.append(Sample(now - 100, 0.5, None, None, None, 1, "bench", MODEL))
        window.errors.append((now - 1, "QUEUE_FULL", "bench", MODEL))
        window.errors.append((now - 400, "QUEUE_FULL", "bench", MODEL))  # beyond the span
    merged = history.merge_steps([w.steps(now) for w in replicas], now)
    summary = history.summary(merged, now)
    assert summary["requests"] == 22 and summary["tokens"] == 402
    assert summary["ttft_p50_ms"] == pytest.approx(200, rel=0.02)  # rank 11 of 22
    assert summary["ttft_p99_ms"] == pytest.approx(500, rel=0.02)
    points = history.series(merged, now)["points"]
    assert len(points) == history.SPAN_S // history.STEP_S
    assert points[-1]["requests"] == 12  # the current step: the 5 s since it began
    assert points[-1]["tokens_per_s"] == pytest.approx(12 * 20 / 5)
    assert history.recent_errors(merged, now) == {"QUEUE_FULL": 2}
    rows = {(r["pool"], r["model"]): r for r in history.by_target(merged, now)}
    assert rows[("default", MODEL)]["requests"] == 20
    assert (rows[("bench", MODEL)]["requests"], rows[("bench", MODEL)]["errors"]) == (2, 2)


def test_steps_merge_into_new_objects() -> None:
    step = Step(total=Tally(requests=1, ttft={3: 1}))
    index = int(NOW // history.STEP_S)
    merged = history.merge_steps([{index: step}, {index: step}], NOW)
    assert merged[index].total.requests == 2 and merged[index].total.ttft == {3: 2}
    assert step.total.requests == 1 and step.total.ttft == {3: 1}


def test_generations_are_labelled_by_pool_and_model_over_http() -> None:
    config = AppConfig.model_validate(
        {
            "engine_adapter": "tests.fakes.fake_engine:FakeAdapter",
            "models": [{"id": MODEL}],
            "profiles": [{"name": "cpu"}],
        }
    )
    backend = LocalBackend(config)
    route = "/v1/generate/{model:path}"
    generate = "/v1/generate/org__fake-model"
    body = {"prompt": "one two", "max_new_tokens": 3}
    ttft = "poolserve_time_to_first_token_seconds_count"

    bench = {"route": route, "pool": "labels-bench", "model": MODEL}
    missing = {"route": route, "pool": metrics.UNKNOWN_POOL, "model": MODEL}
    before = (
        sample_sum(ttft, **bench),
        sample_sum("poolserve_requests_total", code="POOL_NOT_FOUND", **missing),
    )
    with TestClient(instrument(create_app(config, backend))) as client:
        client.portal.call(backend.start)  # type: ignore[union-attr]
        created = client.post("/v1/pools", json={"name": "labels-bench", "gpus": {"cpu": 1}})
        assert created.status_code == 200
        for _ in range(2):
            response = client.post(generate, json=body, headers={"X-SIE-Pool": "labels-bench"})
            assert response.status_code == 200
        refused = client.post(generate, json=body, headers={"X-SIE-Pool": "no-such-pool-91c2"})
        assert refused.status_code == 404
    after = (
        sample_sum(ttft, **bench),
        sample_sum("poolserve_requests_total", code="POOL_NOT_FOUND", **missing),
    )
    assert (after[0] - before[0], after[1] - before[1]) == (2, 1)
    assert sample_sum("poolserve_requests_total", pool="no-such-pool-91c2") == 0
