"""The PoolAutoscaler's pool book, persisted as one JSON value in Ray's GCS key-value store:
it survives restarts of the replica and lives as long as the cluster's GCS."""

from __future__ import annotations

from app.deployments.ray_private import kv_get, kv_put
from app.pools.book import PoolBook

KV_NAMESPACE = "poolserve"


class GcsStore:
    def __init__(self, app_name: str) -> None:
        self.key = f"pools/{app_name}"

    def load(self) -> PoolBook | None:
        raw = kv_get(self.key, KV_NAMESPACE)
        return PoolBook.model_validate_json(raw) if raw else None

    def save(self, book: PoolBook) -> None:
        kv_put(self.key, book.model_dump_json(), KV_NAMESPACE)
