"""Which worker should serve a request, among the eligible workers of its pool and profile.
Pure: the ingress (`ServeBackend._choose`) feeds it each worker's load and KV headroom and its
own memory of which prefixes it sent where.

A request's affinity keys are either its explicit key (`prompt_cache_key`, else `routing_key`)
or a chain of hashes over the leading blocks of its prompt text (the model, the LoRA adapter and
every earlier block are folded into each hash, so equal keys mean equal prefixes). The worker
that last received the longest run of a request's leading keys probably still holds that
prefix in its KV cache; a prefix seen nowhere, or held for less than `prefix_threshold` of its
keys (only a shared system prompt, say), goes to the rendezvous-hash home of its first key past
what is held, so every ingress replica picks the same worker for it without sharing state and
new sessions spread over the workers.

Ranking, in order: KV headroom (never a worker that cannot admit the request now when another
can), then affinity, unless the affine worker's load exceeds the least loaded one's by more
than `max_imbalance` requests (then least loaded: a hot prefix spreads rather than queues)."""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from app.protocol.generation import GenerationRequest
from app.protocol.workers import WorkerStatus

BLOCK_CHARS = 256  # ~64 tokens of English text: finer than vLLM's 128-token KV block
MAX_PREFIX_BLOCKS = 64
CHARS_PER_TOKEN_ESTIMATE = 4
TEMPLATE_TOKENS_ESTIMATE = 16

REASONS = (
    "prefix",  # the worker that holds the longest cached run of the request's prefix
    "home",  # prefix seen nowhere yet: its rendezvous-hash home
    "room",  # KV events: prefix no engine holds: the one of its two workers with more room
    "least_loaded",  # no affinity keys (a short prompt): the least loaded worker
    "imbalance",  # the affine worker is too far above the least loaded one
    "headroom",  # the affine worker cannot admit the request now; another can
    "no_headroom",  # no worker can admit it now: the one with the shortest KV queue
)


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    worker_id: str
    ongoing: int  # requests in flight on the worker
    kv_free_blocks: int | None = None  # None: unknown (no stats yet)
    kv_block_size: int | None = None
    kv_waiting: int = 0  # requests queued on the worker for KV space
    kv_total_blocks: int | None = None  # the engine's KV cache, in blocks

    @property
    def load(self) -> int:
        return self.ongoing + self.kv_waiting


@dataclass(frozen=True, slots=True)
class RouteDecision:
    order: tuple[str, ...]  # best first
    reason: str
    prefix_match: int  # leading affinity keys the chosen worker is believed to hold

    @property
    def chosen(self) -> str:
        return self.order[0]


def routing_stats(status: WorkerStatus) -> dict[str, object]:
    """What a worker publishes for routers (Serve's `record_routing_stats`): plain JSON."""
    return {
        "active": status.active_requests,
        "kv": {
            model.model: {
                "free_blocks": model.stats.kv_blocks_total - model.stats.kv_blocks_used,
                "total_blocks": model.stats.kv_blocks_total,
                "block_size": model.stats.kv_block_size_tokens,
                "waiting": model.stats.kv_waiting,
            }
            for model in status.models
            if model.stats is not None
        },
    }


def worker_load(
    worker_id: str, ongoing: int, stats: Mapping[str, object] | None, model: str
) -> WorkerLoad:
    """A worker's load for ranking: requests in flight (the larger of what this router sent
    and what the worker last reported) and the model's KV headroom from its routing stats."""
    stats = stats or {}
    active = stats.get("active")
    kv_by_model = stats.get("kv")
    kv = kv_by_model.get(model) if isinstance(kv_by_model, Mapping) else None
    if not isinstance(kv, Mapping):
        return WorkerLoad(worker_id, max(ongoing, active if isinstance(active, int) else 0))
    return WorkerLoad(
        worker_id,
        max(ongoing, active if isinstance(active, int) else 0),
        kv_free_blocks=int(kv["free_blocks"]),
        kv_block_size=int(kv["block_size"]),
        kv_waiting=int(kv["waiting"]),
        kv_total_blocks=int(total) if (total := kv.get("total_blocks")) is not None else None,
    )


def prompt_text(request: GenerationRequest) -> str:
    """The request's prompt as the router sees it (for OpenAI calls, the text of the messages
    or prompt in order: `app.api.openai_routes.routing_text`)."""
    return request.prompt or ""


def affinity_keys(request: GenerationRequest) -> tuple[str, ...]:
    explicit = request.prompt_cache_key or request.routing_key
    seed = f"{request.model}\x00{request.lora_adapter or ''}"
    if explicit:
        return (digest(f"{seed}\x00key\x00{explicit}"),)
    text = prompt_text(request)
    keys: list[str] = []
    chained = seed
    for start in range(
        0, min(len(text) // BLOCK_CHARS, MAX_PREFIX_BLOCKS) * BLOCK_CHARS, BLOCK_CHARS
    ):
        chained = digest(f"{chained}\x00{text[start : start + BLOCK_CHARS]}")
        keys.append(chained)
    return tuple(keys)


def estimated_blocks(request: GenerationRequest, block_size: int) -> int:
    """A rough KV need for ranking only (the worker's ledger admits on exact token counts)."""
    prompt_tokens = len(prompt_text(request)) // CHARS_PER_TOKEN_ESTIMATE + TEMPLATE_TOKENS_ESTIMATE
    tokens = prompt_tokens + (request.sampling.max_new_tokens or 0)
    candidates = max(request.sampling.n, request.sampling.best_of or 0)
    return math.ceil(tokens / block_size) * candidates


def rendezvous_home(key: str, worker_ids: Iterable[str]) -> str:
    """Highest-random-weight hashing: stable per key, moves only 1/N of keys when N changes."""
    return max(worker_ids, key=lambda worker: digest(f"{key}\x00{worker}"))


def rank(
    workers: Sequence[WorkerLoad],
    keys: Sequence[str],
    matches: Mapping[str, int],
    need_blocks: Mapping[str, int],
    max_imbalance: int,
    prefix_threshold: float = 0.0,
) -> RouteDecision:
    """`matches`: worker id -> leading keys believed cached there; `need_blocks`: worker id ->
    estimated KV blocks the request needs there (block sizes may differ per worker);
    `prefix_threshold`: the least share of the keys a match must cover to be followed."""
    assert workers, "rank needs at least one worker"
    by_load = sorted(workers, key=lambda w: (w.load, w.worker_id))
    fits = [w for w in by_load if _fits(w, need_blocks.get(w.worker_id, 0))]
    if not fits:
        queue = sorted(workers, key=lambda w: (w.kv_waiting, w.load, w.worker_id))
        return RouteDecision(_order(queue[0], by_load), "no_headroom", 0)
    least = fits[0]
    affine, reason, match = _affine(workers, keys, matches, prefix_threshold)
    if affine is None:
        return RouteDecision(_order(least, by_load), "least_loaded", 0)
    if affine not in fits:
        return RouteDecision(_order(least, by_load), "headroom", matches.get(least.worker_id, 0))
    if affine.load - least.load > max_imbalance:
        return RouteDecision(_order(least, by_load), "imbalance", matches.get(least.worker_id, 0))
    return RouteDecision(_order(affine, by_load), reason, match)


def _affine(
    workers: Sequence[WorkerLoad],
    keys: Sequence[str],
    matches: Mapping[str, int],
    prefix_threshold: float,
) -> tuple[WorkerLoad | None, str, int]:
    if not keys:
        return None, "least_loaded", 0
    best = max(workers, key=lambda w: (matches.get(w.worker_id, 0), -w.load, w.worker_id))
    match = matches.get(best.worker_id, 0)
    if followed(match, len(keys), prefix_threshold):
        return best, "prefix", match
    # nothing cached, or too little (a system prompt every session shares): the home of its
    # first key past the match, so new sessions spread instead of following the shared part
    home = rendezvous_home(keys[match], (w.worker_id for w in workers))
    return next(w for w in workers if w.worker_id == home), "home", matches.get(home, 0)


def followed(match: int, keys: int, prefix_threshold: float) -> bool:
    """Whether a cached run of `match` of a request's `keys` leading keys is worth following:
    it is some, and at least `prefix_threshold` of them."""
    return match > 0 and match >= prefix_threshold * keys


def _fits(worker: WorkerLoad, need: int) -> bool:
    return worker.kv_free_blocks is None or worker.kv_free_blocks >= need


def _order(first: WorkerLoad, by_load: Sequence[WorkerLoad]) -> tuple[str, ...]:
    return (first.worker_id, *(w.worker_id for w in by_load if w is not first))


_NOBODY: frozenset[str] = frozenset()


def digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


class PrefixIndex:
    """The router's memory of which affinity keys it sent to which worker: per worker, the most
    recently used `capacity` keys (an LRU that stands in for the worker's own prefix cache,
    which evicts too)."""

    def __init__(self, capacity_per_worker: int = 4096) -> None:
        self.capacity = capacity_per_worker
        self._keys: dict[str, OrderedDict[str, None]] = {}
        self._holders: dict[str, set[str]] = {}  # key -> workers holding it

    def match(self, worker_id: str, keys: Sequence[str]) -> int:
        held = self._keys.get(worker_id)
        if not held:
            return 0
        count = 0
        for key in keys:
            if key not in held:
                break
            count += 1
        return count

    def holders(self, key: str) -> set[str] | frozenset[str]:
        """The workers holding `key` (do not modify)."""
        return self._holders.get(key, _NOBODY)

    def record(self, worker_id: str, keys: Sequence[str]) -> None:
        held = self._keys.setdefault(worker_id, OrderedDict())
        holders = self._holders
        for key in keys:
            held[key] = None
            held.move_to_end(key)
            holders.setdefault(key, set()).add(worker_id)
        while len(held) > self.capacity:
            self._unhold(held.popitem(last=False)[0], worker_id)

    def _unhold(self, key: str, worker_id: str) -> None:
        workers = self._holders.get(key)
        if workers is not None:
            workers.discard(worker_id)
            if not workers:
                del self._holders[key]

    def forget(self, worker_id: str) -> None:
        for key in self._keys.pop(worker_id, {}):
            self._unhold(key, worker_id)

    def retain(self, worker_ids: Iterable[str]) -> None:
        keep = set(worker_ids)
        for worker_id in [w for w in self._keys if w not in keep]:
            self.forget(worker_id)
