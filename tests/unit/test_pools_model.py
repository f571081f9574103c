"""Pool specs (validation of create bodies), the pool book (leases, renew, delete) and the SIE
response shapes (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from app.config import AppConfig
from app.errors import InvalidRequest, PoolNotFound
from app.pools.book import PoolBook
from app.pools.decide import Snapshot, decide
from app.pools.model import PoolRequest, pool_body, pool_list_item, spec_from_request

CONFIG = AppConfig.model_validate(
    {
        "models": [{"id": "org/m", "profiles": ["cpu", "l4"]}],
        "profiles": [{"name": "cpu"}, {"name": "l4", "num_gpus": 1, "num_replicas": 0}],
    }
)


def spec(**body: Any) -> Any:
    return spec_from_request(PoolRequest.model_validate({"name": "Eval-Bench", **body}), CONFIG)


def test_names_and_profiles_are_lower_cased() -> None:
    result = spec(gpus={"L4": 1}, gpu_caps={"l4": 2}, pinned_models=["org/m:L4"])
    assert result.name == "eval-bench"
    assert result.gpus == {"l4": 1}
    assert result.pinned_models == ("org/m:l4",)
    assert result.queue_pool == "default"


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"name": "has/slash"}, "name", "pool name"),
        ({"name": "default"}, None, "base capacity"),
        ({"gpus": {"h100": 1}}, "gpus", "unknown machine profile 'h100'"),
        ({"gpu_caps": {"l4": -1}}, "gpu_caps", ">= 0"),
        ({"gpus": {"l4": 3}, "gpu_caps": {"l4": 2}}, "gpus", "exceeds gpu_caps"),
        ({"gpu_caps": {"l4": 1}, "minimum_worker_count": 2}, "minimum_worker_count", "exceeds"),
        ({"pinned_models": ["org/unknown"]}, "pinned_models", "unknown model"),
    ],
)
def test_invalid_specs(body: dict[str, Any], param: str | None, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        spec(**body)
    assert fragment in caught.value.message
    assert caught.value.param == param


def test_book_lifecycle_and_persistence() -> None:
    book = PoolBook()
    created = book.upsert(spec(gpus={"cpu": 1}), now=100.0, lease_seconds=50)
    assert (created.state, created.created_at, created.last_renewed) == ("pending", 100.0, 100.0)
    renewed = book.renew("EVAL-BENCH", now=120.0)
    assert renewed.last_renewed == 120.0 and renewed.created_at == 100.0
    decision = decide(Snapshot(pools=book.pools, workers=[]), CONFIG, now=171.0)
    assert book.apply(decision)
    assert book.get("eval-bench").state == "expired"  # type: ignore[union-attr]
    assert not book.apply(decision), "applying the same decision twice changes nothing"
    revived = book.renew("eval-bench", now=200.0)
    assert revived.state == "pending"
    restored = PoolBook.model_validate_json(book.model_dump_json())
    assert restored == book
    assert book.delete("Eval-Bench") is True
    assert book.delete("eval-bench") is False
    with pytest.raises(PoolNotFound):
        book.renew("eval-bench", now=300.0)


def test_update_keeps_created_at_and_changes_the_spec() -> None:
    book = PoolBook()
    book.upsert(spec(gpus={"cpu": 1}), now=1.0, lease_seconds=10)
    updated = book.upsert(spec(gpus={"cpu": 2}), now=5.0, lease_seconds=10)
    assert updated.created_at == 1.0 and updated.last_renewed == 5.0
    assert updated.spec.gpus == {"cpu": 2}


def test_sdk_shapes() -> None:
    book = PoolBook()
    record = book.upsert(spec(gpus={"cpu": 1}, bundle="b1"), now=1.0, lease_seconds=10)
    record = record.model_copy(update={"assigned_workers": ["w1"]})
    body = pool_body(record, {"w1": ("serve://Generator-cpu/w1", "cpu")})
    assert body["name"] == "eval-bench"
    assert set(body["spec"]) >= {
        "name",
        "queue_pool",
        "gpus",
        "gpu_caps",
        "bundle",
        "minimum_worker_count",
        "pinned_models",
    }
    assert body["status"]["state"] == "pending"
    assert body["status"]["assigned_workers"] == [
        {"name": "w1", "url": "serve://Generator-cpu/w1", "gpu": "cpu", "bundle": "b1"}
    ]
    assert isinstance(body["status"]["created_at"], float)
    assert pool_list_item(record) == {
        "name": "eval-bench",
        "state": "pending",
        "gpus": {"cpu": 1},
        "worker_count": 1,
    }
