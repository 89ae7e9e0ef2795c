"""Fixtures of the media tests: generated source clips, a local HTTP server, small run folders."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from standins.media import YTDLP_PLUGINS, MediaServer, make_clip

REPO = Path(__file__).resolve().parents[2]

# youtube_id -> (duration s, codec profile, has audio). Every clip starts at 3 s in its source.
SOURCES: dict[str, tuple[float, str, bool]] = {
    "okh264clip1": (20, "h264", True),
    "okfaststrt1": (20, "h264_faststart", True),
    "okvp9webm01": (20, "vp9", True),
    "okmpeg4mkv1": (20, "mpeg4", True),
    "shortclip07": (7, "h264", True),
    "noaudioclip": (20, "h264", False),
}
START_S = 3


@pytest.fixture(scope="session")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The source clips, each served as ``<id>.mp4`` whatever its container (ffmpeg sniffs it)."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("sources")

    def one(item: tuple[str, tuple[float, str, bool]]) -> None:
        yt, (dur, profile, audio) = item
        made = make_clip(root / yt, dur, profile=profile, audio=audio)
        os.replace(made, root / f"{yt}.mp4")

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, SOURCES.items()))
    return root


def add_source(root: Path, youtube_id: str, like: str) -> str:
    """Serve a copy of source ``like`` as ``youtube_id`` (each fault gets its own URL)."""
    import shutil

    shutil.copyfile(root / f"{like}.mp4", root / f"{youtube_id}.mp4")
    return youtube_id


@pytest.fixture
def server(media_root: Path) -> Iterator[MediaServer]:
    with MediaServer(media_root, stall_s=60) as srv:
        yield srv


def write_manifest(folder: Path, ids: list[str], start_s: int = START_S) -> Path:
    """A one-split AudioCaps-style CSV of ``ids`` (one caption each) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["audiocap_id,youtube_id,start_time,caption"]
    lines += [f"{i + 1},{yt},{start_s},a tone plays" for i, yt in enumerate(ids)]
    (folder / "test.csv").write_text("\n".join(lines) + "\n")
    return folder


MakeRun = Callable[..., Path]


@pytest.fixture
def make_run(tmp_path: Path) -> MakeRun:
    """Write a manifest of ``ids`` and a run config; return the config file's path."""
    import yaml

    def make(ids: list[str], download: dict | None = None, keyframes: dict | None = None) -> Path:
        csv_dir = write_manifest(tmp_path / "csv", ids)
        cfg = {
            "workdir": str(tmp_path / "run"),
            "manifest": {"csv_dir": str(csv_dir), "splits": {"test": "test.csv"}, "checksums": None},
            "download": {
                "backoff_s": 0.05,
                "backoff_max_s": 0.2,
                "read_timeout_s": 2,
                "socket_timeout_s": 2,
                # A test that trips the rate-limit breaker waits seconds, not 10 minutes.
                "breaker_cooldown_s": 1,
                **(download or {}),
            },
            "keyframes": keyframes or {},
        }
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return make


def avcaps(config: Path, *args: str) -> subprocess.Popen[str]:
    """``avcaps ARGS --config CONFIG`` in its own process, with the yt-dlp plugin standing in for
    YouTube's extractor on its path (the server's watch-page faults need it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(YTDLP_PLUGINS)])}
    env.pop("AVCAPS_APP", None)
    code = "import sys; from pipeline.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", code, *args, "--config", str(config)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], timeout_s: float = 240) -> tuple[int, str]:
    """Wait for ``proc``; its exit status and stderr."""
    _, err = proc.communicate(timeout=timeout_s)
    return proc.returncode, err
