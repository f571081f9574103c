"""The TenantLedger's usage store (app/deployments/tenant_ledger.UsageStore) over a fake GCS KV
store: a group commit writes only what it counted; compaction writes the minutes, the request
ids and the totals; a restart from any point (log only, compacted, both, the old whole-minute
format) restores the same book, counting nothing twice."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.deployments import tenant_ledger
from app.deployments.tenant_ledger import UsageStore
from app.tenancy.usage import MinuteBucket, UsageBook, UsageRecord

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
