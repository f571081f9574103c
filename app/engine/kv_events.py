"""vLLM's KV-cache events from one engine, on this worker: a SUB socket here binds a free
port on 127.0.0.1 before the engine starts, and the engine's publisher connects to it (vLLM
connects to an endpoint with a concrete address; `KVEventsConfig`), with its replay endpoint
on another 127.0.0.1 port. A thread receives the batches, asks the replay endpoint for any it
missed (a gap in their sequence numbers), decodes them into `app.protocol.kv_events` and hands
them to the event loop. The decoding needs no vLLM import (msgpack, as `ZmqEventPublisher`
encodes it)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from app.protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

logger = logging.getLogger(__name__)
END_SEQ = (-1).to_bytes(8, "big", signed=True)
MASK_64 = (1 << 64) - 1
POLL_MS = 200
REPLAY_TIMEOUT_MS = 2000


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _key(block_hash: Any) -> int:
    if isinstance(block_hash, int):
        return block_hash & MASK_64
    return int.from_bytes(block_hash, "big") & MASK_64


def decode_batch(payload: bytes) -> list[KVEvent]:
    """A `KVEventBatch` (msgpack: [ts, events, dp_rank]; each event a map tagged by `type`)
    -> our events. Blocks of another medium (a CPU offload tier) are left out."""
    batch = msgspec.msgpack.decode(payload)
    events: list[KVEvent] = []
    for raw in batch[1] if isinstance(batch, list) and len(batch) > 1 else ():
        kind, fields = _fields(raw)
        medium = fields.get("medium")
        if medium not in (None, "GPU"):
            continue
        if kind == "BlockStored":
            parent = fields.get("parent_block_hash")
            plain = not fields.get("extra_keys") and fields.get("lora_name") is None
            plain = plain and fields.get("lora_id") is None
            events.append(
                BlockStored(
                    tuple(_key(h) for h in fields.get("block_hashes", ())),
                    None if parent is None else _key(parent),
                    plain,
                )
            )
        elif kind == "BlockRemoved":
            events.append(BlockRemoved(tuple(_key(h) for h in fields.get("block_hashes", ()))))
        elif kind == "AllBlocksCleared":
            events.append(AllBlocksCleared())
    return events


_ORDER = {  # field order of array-encoded events (msgspec array_like), after the tag
    "BlockStored": (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
        "extra_keys",
    ),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": (),
}


def _fields(raw: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(raw, dict):
        return str(raw.get("type", "")), raw
    if isinstance(raw, list) and raw:
        kind = str(raw[0])
        return kind, dict(zip(_ORDER.get(kind, ()), raw[1:], strict=False))
    return "", {}


class KVEventFeed:
    """One engine's events. `engine_config()` goes into the engine's arguments before it
    starts; `start()` once it has; `deliver(events)` runs on the event loop, in order."""

    def __init__(self, deliver: Callable[[list[KVEvent]], None]) -> None:
        self.deliver = deliver
        self._context: zmq.Context[Any] = zmq.Context.instance()
        self._sub = self._context.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.bind("tcp://127.0.0.1:0")  # bound first: no race for the port
        self.port = int(self._sub.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self.replay_port = free_port()
        self.received = 0  # batches
        self.replayed = 0
        self.missed = 0  # batches lost for good (older than the engine's replay buffer)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def engine_config(self) -> dict[str, Any]:
        """`KVEventsConfig`'s fields: published on 127.0.0.1 only."""
        return {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://127.0.0.1:{self.port}",
            "replay_endpoint": f"tcp://127.0.0.1:{self.replay_port}",
        }

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _hand_over(self, payload: bytes) -> None:
        try:
            events = decode_batch(payload)
        except Exception:
            logger.warning("an undecodable KV event batch", exc_info=True)
            return
        if events and self._loop is not None:
            self._loop.call_soon_threadsafe(self.deliver, events)

    def catch_up(self, loop: asyncio.AbstractEventLoop, start: int = 0) -> int:
        """Every batch from `start` the engine's replay buffer still has, delivered on `loop`
        (blocking: call it on a thread). Returns the next sequence number."""
        self._loop = loop
        return self._replay(self._context, start, start)

    def _run(self) -> None:
        context, sub = self._context, self._sub
        expected = 0  # the next sequence number; the engine's first batch is 0
        try:
            while not self._stop.is_set():
                if not sub.poll(POLL_MS):
                    continue
                frames = sub.recv_multipart()
                if len(frames) != 3:
                    continue
                seq = int.from_bytes(frames[1], "big", signed=True)
                if seq < expected:
                    continue  # already had it (through a replay)
                if seq > expected:
                    expected = self._replay(context, expected, seq)
                    if seq < expected:
                        continue
                self._hand_over(frames[2])
                self.received += 1
                expected = seq + 1
        finally:
            sub.close(linger=0)

    def _replay(self, context: zmq.Context[Any], start: int, until: int) -> int:
        """Batches `start`.. (before `until`) from the replay endpoint; returns the next
        expected sequence number."""
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://127.0.0.1:{self.replay_port}")
        expected = start
        try:
            dealer.send_multipart((b"", start.to_bytes(8, "big")))
            while dealer.poll(REPLAY_TIMEOUT_MS):
                frames = dealer.recv_multipart()
                if len(frames) != 4 or frames[2] == END_SEQ:
                    break
                seq = int.from_bytes(frames[2], "big", signed=True)
                if seq < expected:
                    continue
                if seq > expected:
                    self.missed += seq - expected
                self._hand_over(frames[3])
                self.replayed += 1
                expected = seq + 1
        finally:
            dealer.close(linger=0)
        if expected < until:
            self.missed += until - expected
            expected = until
        return expected
