"""Deterministic sharding: an item belongs to shard ``hash(clip_id) mod n``.

The hash is stable across processes and machines (not Python's salted ``hash``), so any scheduler
can run shards, and changing ``n`` between runs is safe because completion is recorded per item.
"""

from __future__ import annotations

import hashlib
import re

from pipeline.errors import AbortRun


def stable_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


def shard_of(key: str, n: int) -> int:
    return stable_hash(key) % n


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """Parse ``i/n`` (0 <= i < n); ``None`` means no sharding."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise AbortRun(f"--shard {text!r}: expected i/n, for example 0/4")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise AbortRun(f"--shard {text!r}: need 0 <= i < n")
    return i, n


def in_shard(key: str, shard: tuple[int, int] | None) -> bool:
    return shard is None or shard_of(key, shard[1]) == shard[0]
