"""How fast one ingress replica reads request bodies: a token bucket over body bytes.

Reading and parsing a body takes CPU in the ingress, and in Serve's Python proxy where that runs
instead of direct ingress (about 10 ms per MB for the two on the 2-core reference machine). On a machine that also runs the engine, a client posting
maximum-size bodies back to back (~100 MB/s) takes that CPU from the engine and every stream
slows down. The bucket holds one maximum-size body, so a body now and then is read at once;
beyond that, bodies are read at `rate` bytes/s in total, and a flood waits on its own reads
(backpressure through HAProxy or the proxy to the sender) instead of taking the engine's CPU. Only the
bytes of a body beyond its first UNPACED_BYTES count, so a request of ordinary size (a long
document in a chat turn included) never waits behind a flood of big bodies. Pure: every time is
passed in."""

from __future__ import annotations

from dataclasses import dataclass

UNPACED_BYTES = 256 * 1024


@dataclass(slots=True)
class ByteBucket:
    rate: float
    """Bytes per second over time; 0 means unpaced."""
    capacity: float
    """Bytes that can be read at once after a quiet spell."""
    level: float = 0.0
    stamp: float | None = None

    def take(self, size: int, now: float) -> float:
        """Take `size` bytes; the seconds the caller waits before reading on (0 while the bucket
        holds them). Takes always succeed: a debt makes later takers wait longer, in order."""
        if self.rate <= 0:
            return 0.0
        if self.stamp is None:
            self.level = self.capacity
        else:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        self.level -= size
        return 0.0 if self.level >= 0 else -self.level / self.rate
