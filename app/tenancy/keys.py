"""API key ids: a short, stable, non-reversible name for a key, used in usage, limits and
metrics labels instead of the key itself. `python -m app.tenancy.keys` prints the id of a key
read from stdin (for writing `tenancy.key_limits` in serve_config.yaml)."""

from __future__ import annotations

import hashlib
import sys

NO_KEY = "none"
"""The key id of requests when the service runs without API keys."""
KEY_ID_PREFIX = "key-"


def key_id(key: str | bytes) -> str:
    """`key-` + the first 12 hex digits of SHA-256 over a fixed label and the key."""
    raw = key.encode() if isinstance(key, str) else key
    return KEY_ID_PREFIX + hashlib.sha256(b"poolserve-key-id:" + raw).hexdigest()[:12]


def main() -> None:
    for line in sys.stdin.read().split():
        print(key_id(line.strip()))


if __name__ == "__main__":
    main()
