"""The TenantLedger's usage store (app/deployments/tenant_ledger.UsageStore) over a fake GCS KV
store: a group commit writes only what it counted; compaction writes the minutes, the request
ids and the totals; a restart from any point (log only, compacted, both, the old whole-minute
format) restores the same book, counting nothing twice."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from app.deployments import tenant_ledger
from app.deployments.tenant_ledger import UsageStore
from app.errors import UsageUnavailable
from app.tenancy.usage import MinuteBucket, UsageBook, UsageRecord, UsageWindow

T0 = 1_800_000_000.0


class Kv:
    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.fail = False

    def get(self, key: str | bytes, namespace: str) -> bytes | None:
        value = self.data.get(key.decode() if isinstance(key, bytes) else key)
        return value.encode() if value is not None else None

    def put(self, key: str, value: str | bytes, namespace: str) -> None:
        if self.fail:
            raise ConnectionError("GCS unavailable")
        self.data[key] = value.decode() if isinstance(value, bytes) else value

    def delete(self, key: str | bytes, namespace: str) -> None:
        self.data.pop(key.decode() if isinstance(key, bytes) else key, None)

    def keys(self, prefix: str, namespace: str) -> list[bytes]:
        return [key.encode() for key in self.data if key.startswith(prefix)]


@pytest.fixture
def kv(monkeypatch: pytest.MonkeyPatch) -> Iterator[Kv]:
    store = Kv()
    monkeypatch.setattr(tenant_ledger, "kv_get", store.get)
    monkeypatch.setattr(tenant_ledger, "kv_put", store.put)
    monkeypatch.setattr(tenant_ledger, "kv_delete", store.delete)
    monkeypatch.setattr(tenant_ledger, "kv_keys", store.keys)
    yield store


def record(n: int, key: str = "key-000000000001") -> UsageRecord:
    return UsageRecord(f"req-{n}", "default", "m", key, 10, 2, 5)


def count(store: UsageStore, book: UsageBook, n: int, now: float) -> None:
    if book.record(record(n), now):
        store.counted(record(n), now)


def flush(store: UsageStore, book: UsageBook, compact: bool = False) -> dict[str, str]:
    writes, deletes = store.changes(book, compact)
    store.write(writes, deletes)
    return writes


def test_a_commit_writes_only_what_it_counted(kv: Kv) -> None:
    store = UsageStore("app")
    book = store.load(60 * 24)
    sizes = []
    for batch in range(5):
        for n in range(batch * 100, batch * 100 + 100):
            count(store, book, n, T0 + batch)
        sizes.append(sum(len(v) for v in flush(store, book).values()))
    assert max(sizes) < 1.05 * min(sizes)  # flat: not the minute's or the book's size
    assert not any(key.startswith("usage/app/minute/") for key in kv.data)


@pytest.mark.parametrize("compact_after", [0, 2, 5])
def test_a_restart_restores_the_same_book_from_log_and_compaction(
    kv: Kv, compact_after: int
) -> None:
    store = UsageStore("app")
    book = store.load(60 * 24)
    for batch in range(5):
        for n in range(batch * 10, batch * 10 + 10):
            count(store, book, n, T0 + batch * 30)
        before = dict(book.totals.worker_seconds)
        book.accrue({"default": 2}, T0 + batch * 30)
        store.accrued(book, before, T0 + batch * 30)
        flush(store, book, compact=batch + 1 == compact_after)
    expected = book.report()
    restored = UsageStore("app").load(60 * 24)
    assert restored.report() == expected
    assert restored.seen("req-7") and restored.seen("req-49")
    # a retried report after the restart counts nothing
    assert not restored.record(record(7), T0 + 200)
    # and a second restart after compacting the replayed book still agrees
    again = UsageStore("app")
    book2 = again.load(60 * 24)
    flush(again, book2, compact=True)
    assert not any(key.startswith("usage/app/log/") for key in kv.data)
    assert UsageStore("app").load(60 * 24).report() == expected


def test_a_failed_write_is_written_by_the_next_commit(kv: Kv) -> None:
    store = UsageStore("app")
    book = store.load(60 * 24)
    count(store, book, 1, T0)
    writes, deletes = store.changes(book, compact=True)
    kv.fail = True
    with pytest.raises(ConnectionError):
        store.write(writes, deletes)
    store.failed(writes, deletes, book, {int(T0 // 60)})
    kv.fail = False
    count(store, book, 2, T0 + 1)
    flush(store, book, compact=True)
    restored = UsageStore("app").load(60 * 24)
    assert restored.report()["total"]["requests"] == 2
    assert restored.seen("req-1") and restored.seen("req-2")


def test_the_whole_minute_format_before_the_log_still_loads(kv: Kv) -> None:
    old = UsageBook()
    for n in range(3):
        old.record(record(n), T0)
    minute = int(T0 // 60)
    kv.data[f"usage/app/minute/{minute}"] = old.minutes[minute].model_dump_json()
    kv.data["usage/app/totals"] = old.totals.model_dump_json()
    store = UsageStore("app")
    book = store.load(60 * 24)
    assert book.report() == old.report() and book.seen("req-2")
    flush(store, book, compact=True)  # its ids move to ids/ keys
    assert MinuteBucket.model_validate_json(kv.data[f"usage/app/minute/{minute}"]).request_ids == []
    assert UsageStore("app").load(60 * 24).seen("req-2")


def test_each_usage_shard_keeps_its_own_keys_and_a_retired_one_is_found(kv: Kv) -> None:
    """`tenancy.usage_shards`: shard 0 keeps the unsharded keys (a deployment that adds shards
    loses nothing), shard i its own; compacting one deletes nothing of another; shard 0 finds
    every shard in the store, also one the config no longer names (it is still read)."""
    books = {}
    for shard in (0, 1, 3):
        store = UsageStore("app", shard)
        books[shard] = store.load(60 * 24)
        for n in range(5):
            count(store, books[shard], shard * 100 + n, T0)
        flush(store, books[shard])
        flush(store, books[shard], compact=True)
    assert tenant_ledger.stored_shards("app") == {0, 1, 3}
    assert tenant_ledger.stored_shards("other") == {0}
    for shard, book in books.items():
        restored = UsageStore("app", shard).load(60 * 24)
        assert restored.report() == book.report() and restored.report()["total"]["requests"] == 5
        assert restored.seen(f"req-{shard * 100}") and not restored.seen(
            "req-100" if shard != 1 else "req-0"
        )


def test_a_usage_shard_that_does_not_answer_is_a_503_not_a_partial_invoice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Shard 0 merges every shard's window for a usage read; a shard out (or slow) makes the
    read a 503 usage_unavailable with Retry-After, never a report short of its requests."""

    class Shard:
        def __init__(self, delay_s: float) -> None:
            self.delay_s = delay_s

        @property
        def usage_window(self) -> Shard:
            return self

        async def remote(self, since: float | None) -> UsageWindow:
            await asyncio.sleep(self.delay_s)
            return UsageBook().window(since)

    monkeypatch.setattr(tenant_ledger, "SHARD_TIMEOUT_SECONDS", 0.1)
    ledger = object.__new__(tenant_ledger.TenantLedger)
    ledger._usage, ledger._retired = UsageBook(), []
    ledger._shards = [Shard(0), Shard(0)]
    assert asyncio.run(ledger.usage_report())["total"]["requests"] == 0
    ledger._shards = [Shard(0), Shard(5)]
    with pytest.raises(UsageUnavailable) as refused:
        asyncio.run(ledger.usage_report())
    assert (refused.value.status, refused.value.code) == (503, "usage_unavailable")
    assert refused.value.retry_after_s == 1.0
