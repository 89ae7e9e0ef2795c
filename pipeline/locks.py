"""Who may work on a stage of a run folder: one process per stage and shard, never two per item.

A process running a stage holds ``DIR/.locks/NN-stage/shard-I-of-N.lock`` (``shard-0-of-1`` when
it runs every item) for as long as it runs. Shards of different layouts overlap (``--shard 0/2``
and ``--shard 2/4`` share every item whose hash is 0 mod 4): two shards ``i/n`` and ``j/m`` share
items exactly when ``i = j (mod gcd(n, m))``, so a new process also checks that no overlapping
lock is held. That check and the taking of its own lock happen under one short-lived registry lock,
so two processes starting at once cannot both miss each other. A process that cannot start says
who holds the lock and exits with status 3 (:class:`StageBusy`).

The locks are ``flock`` locks through the ``filelock`` library (well kept, used by pip, tox and
Hugging Face; hand-rolled fcntl code is what the design asks us not to write). The kernel drops a
dead process's lock, so a crash never leaves a stale lock behind. ``flock`` works on local disks
and on NFSv4 and Lustre mounted with flock support; on a filesystem without it, run the shards of
one stage from one host.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import StageBusy
from pipeline.io import atomic_write_text

_LOCK_NAME = re.compile(r"shard-(\d+)-of-(\d+)\.lock")
REGISTRY_TIMEOUT_S = 120.0


def overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether shards ``a = (i, n)`` and ``b = (j, m)`` share items (for some clip id hash)."""
    (i, n), (j, m) = a, b
    g = math.gcd(n, m)
    return i % g == j % g


def _owner(path: Path) -> str:
    try:
        info = json.loads(path.with_suffix(".owner").read_text())
    except (OSError, ValueError):
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host')} (since {info.get('started')})"


@contextlib.contextmanager
def stage_lock(stage_folder: Path, label: str, shard: tuple[int, int] | None) -> Iterator[Path]:
    """Hold the lock of ``label`` (a stage's folder name) for ``shard`` while the block runs."""
    from filelock import FileLock, Timeout

    mine = shard or (0, 1)
    folder = stage_folder.parent / ".locks" / stage_folder.name
    folder.mkdir(parents=True, exist_ok=True)
    own_path = folder / f"shard-{mine[0]}-of-{mine[1]}.lock"
    own = FileLock(own_path, timeout=0)
    what = f"{label}" + (f" shard {mine[0]}/{mine[1]}" if shard else "")
    with FileLock(folder / "registry.lock", timeout=REGISTRY_TIMEOUT_S):
        try:
            own.acquire()
        except Timeout:
            raise StageBusy(
                f"{what}: {_owner(own_path)} is already running it in {stage_folder.parent}; "
                "wait for it to finish or stop it (exit status 3)"
            ) from None
        try:
            for entry in sorted(folder.glob("shard-*-of-*.lock")):
                m = _LOCK_NAME.fullmatch(entry.name)
                if entry == own_path or not m or not overlaps(mine, (int(m[1]), int(m[2]))):
                    continue
                probe = FileLock(entry, timeout=0)
                try:
                    probe.acquire()
                except Timeout:
                    raise StageBusy(
                        f"{what}: {_owner(entry)} is running {label} shard {m[1]}/{m[2]}, which shares "
                        f"items with this one, in {stage_folder.parent}; wait for it or use the same "
                        "--shard layout (exit status 3)"
                    ) from None
                probe.release()
            started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
            atomic_write_text(own_path.with_suffix(".owner"), json.dumps(info) + "\n")
        except BaseException:
            own.release()
            raise
    try:
        yield own_path
    finally:
        own.release()
