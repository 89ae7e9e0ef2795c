"""Files: atomic writes (a file is either absent or complete, never partial), and file digests.

Everything is written to a temporary name and renamed into place; the rename is the commit, and
the folder is fsynced after it so the commit survives a power cut. Temporary names start with
``.tmp-`` and carry the writer's host and pid, so a crash leaves only files that no reader takes
for finished ones, and :func:`clean_temp_files` can tell a dead writer's leftovers from a live
writer's file. Media writers put their temporary files in one flat folder per run
(``RunContext.tmp_dir``, on the media folder's filesystem), so cleaning up after a crash lists one
small folder instead of walking the whole media tree.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def temp_name(name: str) -> str:
    """A temporary name for ``name`` in the form :func:`clean_temp_files` understands. For files
    written by external tools (yt-dlp, ffmpeg) that cannot go through :func:`atomic_path`."""
    return f"{TMP_PREFIX}{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}"


def fsync_dir(folder: Path | str) -> None:
    """Make the renames in ``folder`` durable (POSIX: a rename is in the directory's data)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows) cannot fsync a directory
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: Path | str, tmp_dir: Path | str | None = None) -> Iterator[Path]:
    """Yield a temporary path; on success fsync it, rename it to ``dest`` and fsync the folder.

    The temporary file lives in ``tmp_dir`` (default: ``dest``'s folder), which must be on the same
    filesystem as ``dest`` for the rename to be atomic.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tmp_dir) if tmp_dir is not None else dest.parent
    folder.mkdir(parents=True, exist_ok=True)
    # Host and pid in the name let a later run tell a dead writer's leftovers from a live
    # writer's file; keeping the suffix lets tools that pick a format by extension still work.
    tmp = folder / temp_name(dest.name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(dest: Path | str, data: bytes, tmp_dir: Path | str | None = None) -> None:
    with atomic_path(dest, tmp_dir) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(dest: Path | str, text: str, tmp_dir: Path | str | None = None) -> None:
    atomic_write_bytes(dest, text.encode("utf-8"), tmp_dir)


def clean_temp_files(folder: Path | str, older_than_s: float = 3600.0, recursive: bool = True) -> int:
    """Remove leftovers of interrupted writes in ``folder``; returns how many.

    A leftover is removed when its writer (same host) has exited, or when it is older than
    ``older_than_s`` (writers on other hosts of a shared filesystem); a live writer's file stays.
    ``recursive=False`` lists ``folder`` alone (what the runner does at every start).
    """
    folder = Path(folder)
    if not folder.exists():
        return 0
    n = 0
    cutoff = time.time() - older_than_s
    found = folder.rglob(f"{TMP_PREFIX}*") if recursive else folder.glob(f"{TMP_PREFIX}*")
    for p in found:
        try:
            if p.is_file() and (_writer_is_dead(p.name) or p.stat().st_mtime <= cutoff):
                p.unlink(missing_ok=True)
                n += 1
        except FileNotFoundError:
            continue
    return n


def read_json(path: Path) -> tuple[dict[str, Any], str | None]:
    """A JSON object file (``stats.json``...: empty when absent) and, when it cannot be read (cut
    short, zero bytes, overwritten), why: the caller names it instead of raising a traceback."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}, None
    except (OSError, UnicodeDecodeError) as exc:
        return {}, f"{path}: unreadable ({exc})"
    try:
        data = json.loads(text)
    except ValueError as exc:
        return {}, f"{path}: not valid JSON ({exc})"
    if not isinstance(data, dict):
        return {}, f"{path}: not a JSON object"
    return data, None


def file_digest(path: Path | str, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes (read in chunks: exports and media can be large). The one
    file hash of the code base: checksum files, uploads and installed jars all use it."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, algorithm).hexdigest()


#: Bytes of a large file's head and of its tail that :func:`folder_fingerprint` reads.
SAMPLE = 1 << 16


def folder_fingerprint(folder: Path | str) -> str:
    """``local:<hash>`` of a folder's file names and sizes, its JSON files' bytes, and the first
    and last 64 KiB of every other file.

    Cheap (a large file is sampled, not read whole), yet two checkpoints of one architecture
    differ (their weights differ from the first bytes after the safetensors header on): what
    identifies a model saved with ``save_pretrained`` in a local folder, where there is no Hub
    revision to record, whatever the path it is named by.
    """
    h = hashlib.sha256()
    for p in sorted(Path(folder).iterdir()):
        if p.is_file() and not p.name.startswith("."):
            size = p.stat().st_size
            h.update(f"{p.name}:{size}\n".encode())
            with open(p, "rb") as fh:
                if p.suffix == ".json" or size <= 2 * SAMPLE:
                    h.update(fh.read())
                else:
                    h.update(fh.read(SAMPLE))
                    fh.seek(size - SAMPLE)
                    h.update(fh.read(SAMPLE))
    return "local:" + h.hexdigest()[:16]
