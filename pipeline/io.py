"""Atomic file writes: a file is either absent or complete, never partial.

Everything is written to a temporary name in the destination folder (same filesystem) and renamed
into place; the rename is the commit. Temporary names start with ``.tmp-`` so a crash leaves only
files that no reader takes for finished ones, and :func:`clean_temp_files` removes them.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(dest: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success fsync and rename it to ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Keep the suffix so tools that pick a format by extension (ffmpeg, PIL) still work.
    tmp = dest.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{dest.name}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(dest: Path | str, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(dest: Path | str, text: str) -> None:
    atomic_write_bytes(dest, text.encode("utf-8"))


def clean_temp_files(folder: Path | str, older_than_s: float = 0.0) -> int:
    """Remove leftovers of interrupted writes under ``folder``; returns how many.

    ``older_than_s`` spares files that a concurrently running shard may still be writing.
    """
    import time

    folder = Path(folder)
    if not folder.exists():
        return 0
    n = 0
    cutoff = time.time() - older_than_s
    for p in folder.rglob(f"{TMP_PREFIX}*"):
        if p.is_file() and p.stat().st_mtime <= cutoff:
            p.unlink(missing_ok=True)
            n += 1
    return n
