"""Atomic file writes: a file is either absent or complete, never partial.

Everything is written to a temporary name in the destination folder (same filesystem) and renamed
into place; the rename is the commit. Temporary names start with ``.tmp-`` so a crash leaves only
files that no reader takes for finished ones, and :func:`clean_temp_files` removes them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"
_HOST = socket.gethostname().replace("-", "_")


def _writer_is_dead(name: str) -> bool:
    """Whether the temp file ``name`` was written by a process of this host that has exited."""
    parts = name[len(TMP_PREFIX) :].split("-", 2)
    if len(parts) < 3 or parts[0] != _HOST or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@contextlib.contextmanager
def atomic_path(dest: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success fsync and rename it to ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Host and pid in the name let a later run tell a dead writer's leftovers from a live
    # writer's file; keeping the suffix lets tools that pick a format by extension still work.
    tmp = dest.with_name(f"{TMP_PREFIX}{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{dest.name}")
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


def clean_temp_files(folder: Path | str, older_than_s: float = 3600.0) -> int:
    """Remove leftovers of interrupted writes under ``folder``; returns how many.

    A leftover is removed when its writer (same host) has exited, or when it is older than
    ``older_than_s`` (writers on other hosts of a shared filesystem); a live writer's file stays.
    """
    import time

    folder = Path(folder)
    if not folder.exists():
        return 0
    n = 0
    cutoff = time.time() - older_than_s
    for p in folder.rglob(f"{TMP_PREFIX}*"):
        if p.is_file() and (_writer_is_dead(p.name) or p.stat().st_mtime <= cutoff):
            p.unlink(missing_ok=True)
            n += 1
    return n
