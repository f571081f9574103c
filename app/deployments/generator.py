"""Generator-<profile> deployment: one replica is one worker hosting its profile's engines."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.config import AppConfig
from app.deployments.calls import ENDED, WorkerItem, WorkerMessage
from app.deployments.kv_source import KVSource
from app.deployments.ray_private import route_on_this_loop
from app.engine.worker import Worker, omp_threads_bind
from app.errors import InternalError, ServiceError, WorkerUnavailable
from app.protocol.generation import EngineCounts, GenerationRequest
from app.protocol.workers import WorkerStatus
from app.routing.affinity import routing_stats
from app.routing.targets import request_pool
from app.serve_env import freeze_startup_heap
from app.tenancy.reports import UsageReports, usage_shard
from app.tenancy.requests import ahead_of_bill, engine_usage, terminal_stats

logger = logging.getLogger("ray.serve")
FORGET_TIMEOUT_S = 2.0
FORGET_HEADSTART_S = 0.2
SETTLE_TIMEOUT_S = 2.0


class Generator:
    """Plain class; `builder.py` turns it into one Serve deployment per machine profile."""

    async def __init__(  # type: ignore[misc]  # Serve (and Ray actors) await an async __init__
        self,
        config: AppConfig,
        profile: str,
        autoscaler: DeploymentHandle[Any],
        ledgers: list[DeploymentHandle[Any]] | None = None,
    ) -> None:
        self._config = config  # validated by the builder; unpickled without validation
        context = serve.get_replica_context()
        profile_config = config.profile(profile)
        assert profile_config is not None, "the builder makes one Generator per profile"
        cores_per_worker = profile_config.cpu_cores_per_worker
        if cores_per_worker is not None and context.rank is not None:
            # before the engine starts: vLLM reads it when its CPU worker binds its threads
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = omp_threads_bind(
                cores_per_worker, context.rank.local_rank, sorted(os.sched_getaffinity(0))
            )
        self._worker = Worker(config, profile)
        # handle calls routed on this replica's loop: no hand-off to Serve's router thread
        # per call (a usage bill per round trip, a heartbeat)
        self._autoscaler = route_on_this_loop(autoscaler)
        self._worker_id = context.replica_id.unique_id
        # requests are billed here, from the engine's counts, however they end; to the usage
        # shard of this worker (tenancy.usage_shards)
        self._billing: UsageReports | None = None
        if ledgers:
            ledger = route_on_this_loop(ledgers[usage_shard(self._worker_id, len(ledgers))])
            self._billing = UsageReports(
                lambda records: ledger.record_usage.remote(records),
                releases=not config.tenancy.leased_limits,
            )
        # its engines' KV events for the routers (routing.kv_events), before they start
        self._kv = KVSource(self._worker, self._config, epoch=os.urandom(8).hex())
        self._node_id = ray.get_runtime_context().get_node_id()
        self._pool = "default"  # pushed by the PoolAutoscaler in its heartbeat replies
        self._running: dict[str, asyncio.Task[None]] = {}  # request id -> its task
        self._settling: set[asyncio.Task[None]] = set()  # bills waiting for aborts to end
        loop = asyncio.get_running_loop()
        self._loading = loop.create_task(self._worker.load_all())
        self._heartbeat = loop.create_task(self._heartbeat_forever())
        # Serve routes to a replica once its constructor returns: only after the models
        # loaded (a failed load is reported, not raised). So a rolling update with surge stops
        # the old replica only when the new one can serve. The heartbeat reports "loading"
        # meanwhile (/health, the dashboard).
        await self._loading
        freeze_startup_heap()

    async def generate(
        self, requests: list[GenerationRequest], worker: str | None = None
    ) -> AsyncIterator[WorkerMessage]:
        """A group of requests the ingress sent to `worker` (this replica, unless an
        assignment moved), answered on one stream (`app.deployments.calls`): first an
        acknowledgement with this worker's routing stats, then messages carrying every item
        ready at that moment, each request's items in order and ending with ENDED or a
        refusal. A refusal (400, 503 QUEUE_FULL, ...) is an answer for the client, not a
        failure of this replica, so it travels as an item: Serve neither logs a traceback nor
        counts an error for it. Cancelling the call cancels its requests.

        A replica assigned to another pool than a request's refuses it (retryable) rather
        than serve another pool's request; one of the request's pool that the ingress did not
        name (it replaced a draining one) serves it."""
        ready: list[tuple[str, WorkerItem]] = []
        wake = asyncio.Event()
        tasks: dict[str, asyncio.Task[None]] = {}

        def put(request_id: str, item: WorkerItem) -> None:
            ready.append((request_id, item))
            wake.set()

        for request in requests:
            if worker not in (None, self._worker_id) and request_pool(request) != self._pool:
                pool = request_pool(request)
                put(
                    request.request_id,
                    WorkerUnavailable(f"the chosen worker left pool '{pool}'; retry"),
                )
                continue
            task = asyncio.ensure_future(self._serve(request, put))
            tasks[request.request_id] = task
            self._running[request.request_id] = task
        stats: dict[str, Any] | None = self._kv.annotate(
            routing_stats(self._worker.status(self._worker_id, self._node_id, self._pool))
        )
        try:
            while True:
                items = ready[:]  # taken before the yield: more arrive while it is suspended
                ready.clear()
                wake.clear()
                for request_id, item in items:
                    if item is ENDED or isinstance(item, ServiceError):
                        tasks.pop(request_id, None)
                if items or stats is not None:
                    yield stats, items  # the first message (the acknowledgement) has the stats
                    stats = None
                if not tasks and not ready:
                    return
                if not ready:
                    await wake.wait()
        finally:
            for request_id, task in tasks.items():
                task.cancel()
                self._running.pop(request_id, None)

    async def _serve(
        self, request: GenerationRequest, put: Callable[[str, WorkerItem], None]
    ) -> None:
        """Serve one request and bill it with what the engine did (`EngineCounts`): before
        its last item goes out when it ends here (so its client's usage block is in the
        ledger first), in the background when its client left. A request that never reached
        the engine is billed without usage (its limits released)."""
        request_id = request.request_id
        counts = EngineCounts()
        billed = False
        last: WorkerItem = ENDED
        try:
            async for batch in self._worker.stream(request, counts):
                if not billed and terminal_stats(batch) is not None:
                    billed = True
                    ahead, batch = ahead_of_bill(batch)  # the last tokens do not wait for it
                    if ahead:
                        put(request_id, ahead)
                    await self._bill(request, counts)
                put(request_id, batch)
        except ServiceError as refusal:
            last = refusal
        except asyncio.CancelledError:
            if not billed and self._billing is not None:  # `cancel`: the call goes on
                self._bill_later(request, counts)
            put(request_id, ENDED)
            raise
        except Exception:
            logger.exception("request %s failed on this worker", request_id)
            last = InternalError(request_id)
        finally:
            self._running.pop(request_id, None)
        if not billed:
            await self._bill(request, counts)
        put(request_id, last)

    async def _bill(self, request: GenerationRequest, counts: EngineCounts) -> None:
        try:
            await settled(counts)
        except asyncio.CancelledError:
            if self._billing is not None:  # cut while its aborts end: billed behind it
                self._bill_later(request, counts)
            raise
        self._kv.counted(request.model, counts)
        if self._billing is not None:
            await self._billing.before_reply(request.request_id, engine_usage(request, counts))

    def _bill_later(self, request: GenerationRequest, counts: EngineCounts) -> None:
        """In the background, once its engine requests ended (their aborts counted)."""
        assert self._billing is not None
        billing = self._billing
        if not counts.open_requests:
            billing.later(request.request_id, engine_usage(request, counts))
            return

        async def bill() -> None:
            await settled(counts)
            billing.later(request.request_id, engine_usage(request, counts))

        task = asyncio.get_running_loop().create_task(bill())
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def cancel(self, request_ids: list[str], worker: str | None = None) -> None:
        """Stop requests of a call whose client left (the call goes on for the others).
        `worker`: the replica the caller's router sends this to (the one serving them)."""
        for request_id in request_ids:
            task = self._running.get(request_id)
            if task is not None:
                task.cancel()

    def status(self) -> WorkerStatus:
        status = self._worker.status(self._worker_id, self._node_id, self._pool)
        return self._kv.status(dataclasses.replace(status, memory_used_bytes=_resident_bytes()))

    def kv_keys(self, model: str, worker: str | None = None) -> list[Any] | None:
        """The affinity keys this worker's cache holds, whole (`app.routing.kv_keys`): for an
        ingress replica that missed changes. `worker`: the replica the router sends it to."""
        return self._kv.full(model)

    async def _heartbeat_forever(self) -> None:
        interval = self._config.worker_heartbeat_seconds
        while True:
            try:
                assigned = await self._autoscaler.heartbeat.remote(self.status())
                if isinstance(assigned, str):
                    self._pool = assigned
            except Exception:
                logger.warning("heartbeat to the PoolAutoscaler failed", exc_info=True)
            await asyncio.sleep(interval)

    def check_health(self) -> None:
        """Serve replaces a replica whose check fails: a dead engine is not coming back."""
        if self._heartbeat.done():
            raise RuntimeError("worker heartbeat stopped")
        dead = self._worker.dead_engines()
        if dead:
            raise RuntimeError(f"the engine of {', '.join(dead)} died")

    async def __del__(self) -> None:
        self._heartbeat.cancel()
        # bounded: when the whole app is deleted the PoolAutoscaler goes too, and a handle call
        # to a deployment without replicas waits for one (until the graceful-shutdown timeout);
        # a live PoolAutoscaler answers within FORGET_HEADSTART_S, before the engine stops
        # (which holds the loop), a gone one is waited for while it stops
        forgetting = asyncio.ensure_future(
            asyncio.wait_for(self._autoscaler.forget.remote(self._worker_id), FORGET_TIMEOUT_S)
        )
        await asyncio.wait({forgetting}, timeout=FORGET_HEADSTART_S)
        try:
            await self._worker.shutdown()
        finally:
            with contextlib.suppress(Exception):
                await forgetting


async def settled(counts: EngineCounts) -> None:
    """Until the request's engine requests ended (within SETTLE_TIMEOUT_S): one cancelled
    with its caller is counted as its abort ends, and vLLM's OpenAI layer runs the prompts of
    a completion list as tasks of their own, which end a few loop turns after the call."""
    deadline = asyncio.get_running_loop().time() + SETTLE_TIMEOUT_S
    while counts.open_requests and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.005)


def _resident_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
