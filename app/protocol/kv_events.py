"""An engine's KV-cache events as the rest of poolserve sees them: vLLM's `BlockStored`,
`BlockRemoved` and `AllBlocksCleared` (`vllm/distributed/kv_events.py`), each block named by
its 64-bit key (`app.routing.kv_hash.block_key`). Plain data: the engine layer decodes them,
the routing layer indexes them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BlockStored:
    keys: tuple[int, ...]  # the blocks, in chain order
    parent: int | None  # the block before the first one (None: the prompt's start)
    plain: bool = True  # no LoRA / cache salt / multimodal extra keys in their hashes


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    keys: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
