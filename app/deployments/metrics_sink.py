"""Where the ingress replicas' request metrics meet: the `MetricsSink` actor of an application,
and `share_metrics`, which connects an Ingress replica's `app.metrics.SHARING` to it.

One sink per Serve application: a named, detached Ray actor (namespace `poolserve`, name
`metrics-sink:<app>`), created by the first Ingress replica that asks for it, no CPU reserved.
It is not a Serve deployment on purpose: old and new replicas of a rolling update share it (a
deployment-scoped actor is one per code version, so a scrape during a rollout would see two
different totals), and counts survive redeploys.

It keeps each replica's latest shard (cumulative counts: a repeated or lost publication is
harmless). A replica silent for FOLD_AFTER_S (a live one publishes every 1-5 s) is folded: its
counts stay counted, its levels (streams in flight) no longer; a folded replica that publishes
again is taken back as it is (no double count), up to REVIVE_WITHIN_S, after which its counts
merge into one retired shard. Folded and retired counts are written to Ray's GCS key-value
store when they change, so a restarted sink (Ray restarts it) loses nothing but the live
replicas' shards, which they publish again within `metrics.HEARTBEAT_S`. A sink that nobody
called for IDLE_EXIT_S (its application was deleted) ends itself; a newer replica whose shard
format it does not know makes it save everything and end, and the next call starts a sink of
the newer code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import time
from collections.abc import Callable
from typing import Any

import ray
from ray import serve
from ray.actor import ActorHandle

from app import metrics
from app.deployments.ray_private import kv_get, kv_put
from app.metrics import Shard

logger = logging.getLogger("ray.serve")

NAMESPACE = "poolserve"
FOLD_AFTER_S = 60.0
REVIVE_WITHIN_S = 3600.0
IDLE_EXIT_S = 900.0


def sink_name(app_name: str) -> str:
    return f"metrics-sink:{app_name}"


class SinkBook:
    """A sink's state and its rules, without Ray: the latest shard per replica, the folded and
    the retired counts; `save` stores the folded and retired counts when they change (JSON)."""

    def __init__(self, saved: str | bytes | None, save: Callable[[str], None]) -> None:
        self._save = save
        self.live: dict[str, Shard] = {}
        self.folded: dict[str, Shard] = {}  # by source: taken back if it publishes again
        self.retired: Shard | None = None
        state = json.loads(saved) if saved else {}
        if state.get("retired"):
            self.retired = metrics.shard_from_json(state["retired"])
        for data in state.get("folded", []):
            shard = metrics.shard_from_json(data)
            self.folded[shard.source] = shard

    def take(self, shard: Shard, now: float) -> None:
        """Keep `shard` as its replica's latest (aged by `now`, this sink's clock); fold the
        replicas silent for FOLD_AFTER_S, retire those folded for REVIVE_WITHIN_S."""
        shard = Shard(
            shard.source, now, shard.sums, shard.peaks, shard.levels, shard.steps, shard.sources
        )
        changed = self.folded.pop(shard.source, None) is not None
        self.live[shard.source] = shard
        for source, live in list(self.live.items()):
            if now - live.at > FOLD_AFTER_S:
                self.folded[source] = metrics.retire(self.live.pop(source))
                changed = True
        expired = [s for s in self.folded.values() if now - s.at > REVIVE_WITHIN_S]
        if expired:
            for old in expired:
                del self.folded[old.source]
            retired = [self.retired] if self.retired is not None else []
            self.retired = metrics.merge_shards([*retired, *expired], now, "retired")
            changed = True
        if changed:
            self._save(self.dump())

    def others(self, source: str, now: float) -> Shard:
        """Every replica's counts but `source`'s, added up (folded and retired included)."""
        shards = [shard for s, shard in self.live.items() if s != source]
        shards.extend(self.folded.values())
        if self.retired is not None:
            shards.append(self.retired)
        return metrics.merge_shards(shards, now)

    def dump(self, with_live: bool = False) -> str:
        """The folded and retired counts as JSON (`with_live`: the live ones as folded too)."""
        folded = list(self.folded.values())
        if with_live:
            folded.extend(metrics.retire(shard) for shard in self.live.values())
        return json.dumps(
            {
                "retired": metrics.shard_to_json(self.retired) if self.retired else None,
                "folded": [metrics.shard_to_json(shard) for shard in folded],
            }
        )


@ray.remote
class MetricsSink:
    """One application's SinkBook as a Ray actor (async: one event loop; no method awaits
    while it changes the book)."""

    def __init__(self, app_name: str) -> None:
        self._key = f"metrics/{app_name}"
        self._called = time.monotonic()
        self._watch: asyncio.Task[None] | None = None
        try:
            saved = kv_get(self._key, NAMESPACE)
        except Exception:
            logger.warning("reading the retired metrics failed; counting from here", exc_info=True)
            saved = None
        try:
            self._book = SinkBook(saved, self._store)
        except (ValueError, KeyError, TypeError):
            logger.warning("the saved metrics do not parse; counting from here", exc_info=True)
            self._book = SinkBook(None, self._store)

    async def publish(self, format_version: int, payload: bytes) -> bool:
        """Keep a replica's shard; False: this sink is older than the replica's format (it
        saved what it holds and is ending: call again)."""
        return self._take(format_version, payload) is not None

    async def exchange(self, format_version: int, payload: bytes) -> bytes | None:
        """Keep a replica's shard and answer (pickled) the merge of every other replica's,
        folded and retired ones included; None as for `publish`."""
        shard = self._take(format_version, payload)
        if shard is None:
            return None
        return pickle.dumps(self._book.others(shard.source, time.time()))

    def _take(self, format_version: int, payload: bytes) -> Shard | None:
        self._called = time.monotonic()
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._exit_when_idle())
        if format_version > metrics.SHARD_FORMAT:
            self._end("a replica publishes a newer shard format")
            return None
        shard: Shard = pickle.loads(payload)
        self._book.take(shard, time.time())
        return shard

    def _store(self, state: str) -> None:
        try:
            kv_put(self._key, state, NAMESPACE)
        except Exception:
            logger.warning("saving the retired metrics failed", exc_info=True)

    def _end(self, why: str) -> None:
        logger.info("metrics sink ending: %s", why)
        self._store(self._book.dump(with_live=True))
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    async def _exit_when_idle(self) -> None:
        while True:
            await asyncio.sleep(IDLE_EXIT_S / 10)
            if time.monotonic() - self._called > IDLE_EXIT_S:
                self._end(f"no replica called for {IDLE_EXIT_S:.0f} s")
                return


class SinkShare:
    """`app.metrics.Share` over this application's MetricsSink (found or started on first use;
    looked up again after a failed call, and when it ended itself)."""

    def __init__(self, app_name: str) -> None:
        self._app_name = app_name
        self._sink: ActorHandle[Any] | None = None

    def _handle(self) -> ActorHandle[Any]:
        if self._sink is None:
            self._sink = MetricsSink.options(  # type: ignore[attr-defined]
                name=sink_name(self._app_name),
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                max_restarts=-1,
                max_task_retries=-1,
            ).remote(self._app_name)
        assert self._sink is not None
        return self._sink

    async def _call(self, method: str, shard: Shard) -> Any:
        payload = pickle.dumps(shard)
        try:
            return await getattr(self._handle(), method).remote(metrics.SHARD_FORMAT, payload)
        except Exception:
            self._sink = None
            raise

    async def publish(self, shard: Shard) -> None:
        if not await self._call("publish", shard):
            self._sink = None
            raise RuntimeError("the metrics sink was older than this replica; it restarts")

    async def exchange(self, shard: Shard) -> Shard:
        answer = await self._call("exchange", shard)
        if answer is None:
            self._sink = None
            raise RuntimeError("the metrics sink was older than this replica; it restarts")
        others: Shard = pickle.loads(answer)
        return others


def share_metrics() -> None:
    """Connect this Ingress replica's request metrics to its application's MetricsSink (in the
    Ingress constructor; `app.api.observe.instrument` starts and stops the publishing with the
    app)."""
    context = serve.get_replica_context()
    metrics.SHARING.connect(SinkShare(context.app_name), context.replica_id.unique_id)
