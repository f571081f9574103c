"""vLLM's prefix-cache block hashes, reproduced without vLLM: what the engine names the KV
blocks of a token sequence in its `BlockStored` events. Pure.

vLLM 0.32 (`vllm/v1/core/kv_cache_utils.py`, `hash_block_tokens`, with the default
`prefix_caching_hash_algo: sha256`): a full block of `block_size` tokens hashes to
`sha256(pickle((parent_hash, tuple(token_ids), extra_keys)))`, the first block's parent being
`NONE_HASH = sha256(pickle(seed))`, `seed` = `PYTHONHASHSEED` when set, else
`"vllm-none-hash"`. Only full blocks are hashed (and cached). `extra_keys` is None for a prompt
without LoRA, cache salt or multimodal input: the only prompts this module hashes.
`tests/unit/test_kv_index.py` holds the function to vLLM's own on fixed vectors.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Sequence
from functools import lru_cache

DEFAULT_SEED = "vllm-none-hash"  # vLLM's DEFAULT_NONE_HASH_SEED
SUPPORTED_ALGORITHM = "sha256"
MASK_64 = (1 << 64) - 1


def engine_seed() -> str:
    """The seed the engine of this process derives its first parent hash from (vLLM's
    `resolve_none_hash_seed` for sha256; the engine process inherits this environment)."""
    return os.environ.get("PYTHONHASHSEED") or DEFAULT_SEED


@lru_cache(maxsize=8)
def none_hash(seed: str) -> bytes:
    return _sha256(seed)


def _sha256(value: object) -> bytes:
    return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def block_hashes(
    token_ids: Sequence[int], block_size: int, seed: str = DEFAULT_SEED
) -> list[bytes]:
    """The hashes of the full blocks of `token_ids`, in order (a chain: each one folds in
    every block before it)."""
    parent = none_hash(seed)
    hashes: list[bytes] = []
    full = len(token_ids) - len(token_ids) % block_size
    for start in range(0, full, block_size):
        parent = _sha256((parent, tuple(token_ids[start : start + block_size]), None))
        hashes.append(parent)
    return hashes


def block_key(block_hash: bytes | int) -> int:
    """The 64-bit key a block is indexed by: vLLM's own int form of a hash
    (`maybe_convert_block_hash` with `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`: the low 64 bits),
    so events carrying bytes or ints index the same."""
    if isinstance(block_hash, int):
        return block_hash & MASK_64
    return int.from_bytes(block_hash, "big") & MASK_64


def block_keys(token_ids: Sequence[int], block_size: int, seed: str = DEFAULT_SEED) -> list[int]:
    return [block_key(h) for h in block_hashes(token_ids, block_size, seed)]
