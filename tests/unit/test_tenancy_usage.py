"""Usage accounting (app/tenancy/usage.py): once per request id, per (pool, model, key id),
minute windows, worker-seconds, retention, and a round trip through its persisted form."""

from __future__ import annotations

import random
import uuid
from collections import Counter

from app.tenancy.keys import NO_KEY, key_id
from app.tenancy.reports import usage_shard
from app.tenancy.usage import MinuteBucket, UsageBook, UsageRecord, UsageTotals

T0 = 1_800_000_000.0  # a minute boundary


def record(
    rid: str, pool: str = "a", key: str = "key-1", prompt: int = 10, out: int = 5
) -> UsageRecord:
    return UsageRecord(rid, pool, "m", key, prompt, 2, out)


def test_a_request_counts_once_even_when_reported_again() -> None:
    book = UsageBook()
    assert book.record(record("r1"), T0)
    assert not book.record(record("r1"), T0 + 1)
    assert book.record(record("r2", out=7), T0 + 2)
    report = book.report()
    (row,) = report["usage"]
    assert row == {
        "pool": "a",
        "model": "m",
        "key_id": "key-1",
        "requests": 2,
        "prompt_tokens": 20,
        "cached_prompt_tokens": 4,
        "completion_tokens": 12,
        "total_tokens": 32,
    }
    assert report["total"]["requests"] == 2


def test_rows_per_pool_model_and_key_and_the_pool_filter() -> None:
    book = UsageBook()
    book.record(record("r1", pool="a", key="k1"), T0)
    book.record(record("r2", pool="a", key="k2"), T0)
    book.record(record("r3", pool="b", key="k1"), T0)
    assert len(book.report()["usage"]) == 3
    only_a = book.report(pool="a")
    assert {row["key_id"] for row in only_a["usage"]} == {"k1", "k2"}
    assert set(only_a["pools"]) == {"a"} and only_a["total"]["requests"] == 2
    usage = book.pool_usage("a")
    assert usage["requests"] == 2 and set(usage["keys"]) == {"k1", "k2"}
    assert usage["models"]["m"]["completion_tokens"] == 10


def test_since_counts_whole_minutes_from_the_one_it_falls_in() -> None:
    book = UsageBook()
    book.record(record("old"), T0)
    book.record(record("new"), T0 + 125)
    assert book.report(since=T0 + 120)["total"]["requests"] == 1
    assert book.report(since=T0 + 179)["total"]["requests"] == 1  # same minute as T0 + 125
    assert book.report(since=T0 + 180)["total"]["requests"] == 0
    assert book.report(since=T0)["total"]["requests"] == 2
    assert book.report()["total"]["requests"] == 2


def test_worker_seconds_accrue_per_pool_from_the_last_accrual() -> None:
    book = UsageBook()
    book.accrue({"a": 2, "default": 1}, T0)  # the first accrual only starts the clock
    book.accrue({"a": 2, "default": 1}, T0 + 10)
    book.accrue({"a": 0, "default": 3}, T0 + 70)
    report = book.report()
    assert report["pools"]["a"]["worker_seconds"] == 20
    assert report["pools"]["default"]["worker_seconds"] == 10 + 180
    assert report["total"]["worker_seconds"] == 210
    assert book.report(since=T0 + 60)["pools"]["default"]["worker_seconds"] == 180


def test_persisted_form_restores_totals_windows_and_dedup() -> None:
    book = UsageBook()
    book.record(record("r1"), T0)
    book.accrue({"a": 1}, T0)
    book.accrue({"a": 1}, T0 + 30)
    totals = UsageTotals.model_validate_json(book.totals.model_dump_json())
    minutes = [MinuteBucket.model_validate_json(b.model_dump_json()) for b in book.minutes.values()]
    restored = UsageBook(totals, minutes)
    assert not restored.record(record("r1"), T0 + 40)  # still remembered
    assert restored.report() == book.report()
    assert restored.report(since=T0) == book.report(since=T0)


def test_retention_drops_old_minutes_but_keeps_totals() -> None:
    book = UsageBook(retention_minutes=5)
    book.record(record("r1"), T0)
    book.prune(T0 + 10 * 60)
    assert book.minutes == {} and book.dropped_minutes == {int(T0 // 60)}
    assert book.report()["total"]["requests"] == 1
    assert book.report(since=T0)["total"]["requests"] == 0


def test_key_ids_are_stable_short_and_not_the_key() -> None:
    key = "sk-very-secret-key"
    assert key_id(key) == key_id(key.encode()) and key_id(key) != key_id("other")
    assert key_id(key).startswith("key-") and len(key_id(key)) == 16
    assert "secret" not in key_id(key) and NO_KEY == "none"


def test_shards_merged_report_as_one_book_counting_everything() -> None:
    """`tenancy.usage_shards`: each shard's book counts its workers' requests; the report merged
    from their windows is the report of one book that counted them all, for every window, pool
    and pool usage, and it does not change the books it merges."""
    rng = random.Random(7)
    whole, shards = UsageBook(), [UsageBook(), UsageBook(), UsageBook()]
    for n in range(300):
        at = T0 + 30 + n * 2.5  # over ~13 minutes
        usage = record(f"r{n}", rng.choice("abc"), rng.choice(["k1", "k2"]), n % 17, n % 5)
        shard = shards[rng.randrange(3)]
        assert whole.record(usage, at) and shard.record(usage, at)
        if n % 40 == 0:
            held = {"a": 1, "b": n % 3}
            whole.accrue(held, at)
            shards[0].accrue(held, at)  # worker-seconds are shard 0's
    before = [book.report() for book in shards]
    for since in (None, T0, T0 + 300, T0 + 10_000):
        for pool in (None, "a", "c"):
            merged = shards[0].report(since, pool, [s.window(since) for s in shards[1:]])
            assert merged == whole.report(since, pool), (since, pool)
    assert shards[0].pool_usage("b", [s.window(None) for s in shards[1:]]) == whole.pool_usage("b")
    assert [book.report() for book in shards] == before
    late = UsageBook()
    late.record(record("late"), T0 + 5_000)
    window = shards[0].window(None)
    window.merge(late.window(None))
    assert window.started_at == shards[0].totals.started_at  # the earliest of the books
    window.seconds, late_window = {"a": 2.0}, late.window(None)
    late_window.seconds = {"a": 3.0, "b": 1.0}
    window.merge(late_window)
    assert window.seconds == {"a": 5.0, "b": 1.0}


def test_a_worker_bills_to_one_shard_for_its_life_and_workers_spread() -> None:
    workers = [uuid.uuid4().hex[:8] for _ in range(1000)]
    assert [usage_shard(w, 4) for w in workers] == [usage_shard(w, 4) for w in workers]
    spread = Counter(usage_shard(w, 4) for w in workers)
    assert set(spread) == {0, 1, 2, 3} and min(spread.values()) > 200
    assert {usage_shard(w, 1) for w in workers} == {0}
