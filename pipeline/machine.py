"""Run-level conditions of the machine: a full disk or quota, a read-only filesystem, no memory, no
file handles. They are not the item's fault, so they never become a failed row: the run stops
with :class:`~pipeline.errors.RunHalted` (exit 5) and one line naming the path, the free space and
the fix; finished items are committed, the items in flight get no row (they keep their attempts),
and a rerun after the fix finishes.

Decided here once for every stage (the executors and the runner call it):

- :func:`machine_cause`: an exception whose chain holds such an error (by errno, or by the C
  library's text when a wrapper kept only the text, as pyarrow and yt-dlp do) stops the run
  instead of failing its item as ``unexpected:OSError``.
- :func:`check_room`: before every batch, and after a batch in which an item failed, the
  filesystems the stage writes to (:meth:`~pipeline.stage.Stage.write_dirs`) must be writable and
  have ``min_free_mb`` free. This also catches writers that report a full disk without an errno
  (ffmpeg under yt-dlp says only "exited with code 1", libsndfile "System error"): any failed
  write of a file smaller than ``min_free_mb`` leaves less than that free, since the free space
  before the write was smaller than the file. The check keeps that room for the ledger commit too.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

from pipeline.errors import RunHalted

DISK_FIX = "free space there (or give the run folder a larger disk) and rerun"
#: errno -> (what happened, the fix). ENOMEM also stands for Python's MemoryError.
CONDITIONS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on device", DISK_FIX),
    errno.EDQUOT: ("disk quota exceeded", "free space within the quota (or raise it) and rerun"),
    errno.EROFS: (
        "read-only file system",
        "the filesystem is read-only (a remount after disk errors? see dmesg): make it writable and rerun",
    ),
    errno.EMFILE: (
        "too many open files in this process",
        "raise the limit (ulimit -n) or lower the stage's workers/concurrency, and rerun",
    ),
    errno.ENFILE: (
        "too many open files on this machine",
        "close other programs' files (or raise fs.file-max) and rerun",
    ),
    errno.ENOMEM: (
        "out of memory",
        "lower the stage's batch_size/workers/concurrency or free memory, and rerun",
    ),
}
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
# The C library's texts of those errors, for wrappers that keep only the text ("[errno 28] No space
# left on device" from pyarrow, "unable to write data: [Errno 28] ..." from yt-dlp).
TEXTS: dict[int, str] = {code: os.strerror(code).lower() for code in CONDITIONS}


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: ``__cause__``, ``__context__``, and an ``exc_info`` tuple (the
    convention of libraries that keep the original error as an attribute)."""
    seen: list[BaseException] = []
    todo: list[object] = [exc]
    while todo and len(seen) < 32:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or any(e is s for s in seen):
            continue
        seen.append(e)
        info = getattr(e, "exc_info", None)
        if isinstance(info, tuple) and len(info) > 1:
            todo.append(info[1])
        todo += [e.__cause__, e.__context__]
    return seen


def text_cause(text: str) -> int | None:
    """The condition a message names by its C-library text (``No space left on device``), if any."""
    low = text.lower()
    # "too many open files in system" contains "too many open files": the longer text first.
    for code in sorted(TEXTS, key=lambda c: -len(TEXTS[c])):
        if TEXTS[code] in low:
            return code
    return None


def machine_cause(exc: BaseException) -> tuple[int, BaseException] | None:
    """``(errno, the exception that carries it)`` when ``exc``'s chain holds a machine condition."""
    chain = _chain(exc)
    for e in chain:
        if isinstance(e, MemoryError):
            return errno.ENOMEM, e
        if isinstance(e, OSError) and e.errno in CONDITIONS:
            return int(e.errno), e
    for e in chain:
        if (code := text_cause(str(e))) is not None:
            return code, e
    return None


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (a folder not made yet is on its parent's disk)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def filesystems(dirs: Iterable[Path]) -> list[tuple[Path, os.statvfs_result]]:
    """One ``(folder, statvfs)`` per distinct filesystem among ``dirs`` (first folder named)."""
    out: list[tuple[Path, os.statvfs_result]] = []
    devices: set[int] = set()
    for d in dirs:
        p = _existing(Path(d))
        try:
            dev = p.stat().st_dev
            if dev in devices:
                continue
            devices.add(dev)
            out.append((Path(d), os.statvfs(p)))
        except OSError:
            continue
    return out


def room_line(dirs: Iterable[Path], code: int = errno.ENOSPC) -> str:
    """``PATH: X free of Y`` for the filesystem among those of ``dirs`` that shows condition
    ``code``: a read-only one for EROFS, else the fullest."""
    found = filesystems(dirs)
    if not found:
        return ""
    if code == errno.EROFS:
        found = [f for f in found if f[1].f_flag & os.ST_RDONLY] or found
    path, st = min(found, key=lambda f: f[1].f_bavail * f[1].f_frsize)
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    ro = ", read-only" if st.f_flag & os.ST_RDONLY else ""
    return f"{path}: {_size(free)} free of {_size(total)}{ro}"


def _memory_line() -> str:
    try:
        pages, avail = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_AVPHYS_PAGES")
        page = os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return ""
    return f"{_size(avail * page)} of {_size(pages * page)} memory free"


def _nofile_line() -> str:
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return ""
    return f"ulimit -n is {soft}"


KEPT = "finished items are committed, items in flight keep their attempts"


def halt_for(
    code: int, cause: BaseException | None, dirs: Iterable[Path], doing: str = "", kept: str = KEPT
) -> RunHalted:
    """The one-line :class:`RunHalted` for condition ``code`` (``cause``: the error that showed it;
    ``doing``: what the run was doing; ``kept``: what became of the finished work)."""
    what, fix = CONDITIONS[code]
    where = getattr(cause, "filename", None) if isinstance(cause, OSError) else None
    head = what + (f": {where}" if where else "")
    if code in DISK_ERRNOS:
        # The file's own filesystem first, when the error names it.
        detail = room_line([*([Path(where)] if where else []), *dirs], code)
    elif code == errno.ENOMEM:
        detail = _memory_line()
    else:
        detail = _nofile_line()
    line = "; ".join(p for p in (head + (f" ({doing})" if doing else ""), detail, fix) if p)
    said = str(cause or "")
    if said and TEXTS[code] not in said.lower():  # what the error said, when it adds something
        line += f" [{type(cause).__name__}: {said[:300]}]"
    return RunHalted(f"{line}; {kept}")


def check_room(dirs: Iterable[Path], min_free_mb: float, setting: str) -> RunHalted | None:
    """A :class:`RunHalted` when a filesystem of ``dirs`` is read-only or has less than
    ``min_free_mb`` free (``setting``: the config key to name), else None."""
    for path, st in filesystems(dirs):
        free = st.f_bavail * st.f_frsize
        total = st.f_blocks * st.f_frsize
        if st.f_flag & os.ST_RDONLY:
            return halt_for(errno.EROFS, None, [path])
        if free < min_free_mb * 1e6:
            return RunHalted(
                f"only {_size(free)} free of {_size(total)} on the filesystem of {path}, under "
                f"{setting} = {min_free_mb:g} (room kept for the files of a batch and the ledger): "
                f"{DISK_FIX}; finished items are committed, items not done keep their attempts"
            )
    return None
