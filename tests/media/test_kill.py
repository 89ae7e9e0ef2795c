"""SIGKILL during stage 1 and during stage 2, then a rerun: no duplicated work, no partial file kept."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import load_context
from pipeline.runner import run_stage
from pipeline.selection import stage_ledger
from pipeline.stage import RunOptions
from stages.download.stage import DownloadStage
from stages.keyframes import KeyframesStage
from stages.manifest import ManifestStage
from standins.media import MediaServer, make_clip
from standins.run_history import Failure, clip_history, commit_histories

from .conftest import START_S, MakeRun, add_source


def avcaps(config: Path, stage: str, *settings: str) -> list[str]:
    args = [a for s in settings for a in ("--set", s)]
    code = "import sys; from pipeline.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code, "run", stage, "--config", str(config), *args]


def temp_files(folder: Path) -> list[Path]:
    return list(folder.rglob(".tmp-*")) if folder.exists() else []


def kill_mid_write(cmd: list[str], ledger: Path, media: Path, commits: int, timeout_s: float = 120) -> bool:
    """Start ``cmd``; once ``commits`` ledger parts exist, SIGKILL it (with its ffmpeg children)
    as soon as a media file is being written (a ``.tmp-`` file exists), or after 3 s more.
    Returns whether a partial file was left behind by the kill."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ledger.exists() and len(list(ledger.glob("part-*.parquet"))) >= commits:
                break
            time.sleep(0.01)
        mid = time.monotonic() + 3
        while time.monotonic() < mid and proc.poll() is None and not temp_files(media):
            pass
        assert proc.poll() is None, "the stage finished before it could be killed"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: a machine dying takes ffmpeg too
        proc.wait()
    return bool(temp_files(media))


def check_exactly_once(ledger_history: object, ids: list[str]) -> None:
    import pandas as pd

    assert isinstance(ledger_history, pd.DataFrame)
    ok = ledger_history[ledger_history["status"] == "ok"]
    assert sorted(ok["clip_id"]) == sorted(ids)  # every clip ok exactly once in the whole history


@pytest.mark.slow
def test_sigkill_during_download(media_root: Path, server: MediaServer, make_run: MakeRun) -> None:
    ids = [add_source(media_root, f"killdl{i:05d}", "okh264clip1") for i in range(6)]
    config = make_run(
        ids, download={"url_template": server.url_template(), "batch_size": 1, "concurrency": 1}
    )
    ctx = load_context(config, None, ())
    run_stage(ManifestStage, ctx, RunOptions(progress=False))
    ledger = ctx.workdir / "01-download" / "ledger"

    # A commit per batch (no group commit), so the ledger's parts show how far the stage got.
    cmd = avcaps(config, "download", "download.commit_interval_s=0")
    partial = kill_mid_write(cmd, ledger, ctx.workdir / "media", commits=2)
    assert partial  # ffmpeg was writing a clip when it died (a download takes ~1 s)
    led = stage_ledger(DownloadStage(ctx))
    done_before = set(led.latest().index)
    assert 2 <= len(done_before) < len(ids)
    hits_before = dict(server.hits)

    run_stage(DownloadStage, ctx, RunOptions(progress=False))
    clip_ids = [f"{yt}_{START_S * 1000}_{(START_S + 10) * 1000}" for yt in ids]
    check_exactly_once(led.read_all(), clip_ids)
    # Clips committed before the kill were not fetched again.
    for cid in done_before:
        yt = cid.split("_")[0]
        assert server.hits[f"{yt}.mp4"] == hits_before[f"{yt}.mp4"], cid
    # No partial file kept: only the finished clips, each a full 10-s clip.
    assert not list(ctx.workdir.rglob(".tmp-*"))
    videos = sorted(p.name for p in (ctx.workdir / "media" / "video").rglob("*") if p.is_file())
    assert videos == sorted(f"{c}.mp4" for c in clip_ids)
    assert (led.latest()["video_duration_s"] > 9.8).all()


@pytest.mark.slow
def test_sigkill_during_keyframes(tmp_path: Path, make_run: MakeRun) -> None:
    n = 40
    ids = [f"killkf{i:05d}" for i in range(n)]
    config = make_run(ids, keyframes={"frames": 8, "batch_size": 1, "workers": 1})
    ctx = load_context(config, None, ())
    run_stage(ManifestStage, ctx, RunOptions(progress=False))
    # Stage 1's ledger as a real download run leaves it, over copies of one cut 10-s clip: one clip
    # gone (404), one that ran out of attempts on 429s, one that got through on its second try.
    clip = make_clip(tmp_path / "cut", 10)
    clip_ids = list(stage_ledger(ManifestStage(ctx)).latest().index)
    gone, throttled, retried = clip_ids[5], clip_ids[6], clip_ids[7]
    failures = {
        gone: Failure(DownloadStage, "http_404"),
        throttled: Failure(DownloadStage, "http_429", "failed_transient"),
    }
    histories = []
    for cid in clip_ids:
        rel = f"media/video/{cid}.mp4"
        if cid not in failures:
            (ctx.workdir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(clip, ctx.workdir / rel)
        outputs = {
            "video_path": rel,
            "video_duration_s": 10.0,
            "audio_duration_s": 10.0,
            "source_duration_s": 10.0,
            "video_width": 96,
            "video_height": 64,
            "file_bytes": clip.stat().st_size,
            "source_url": f"https://www.youtube.com/watch?v={cid.split('_')[0]}",
        }
        rows = clip_history(
            DownloadStage,
            cid,
            outputs,
            failure=failures.get(cid),
            retried=cid == retried,
            max_attempts=ctx.config.download.max_attempts,  # type: ignore[attr-defined]
        )
        histories.append({DownloadStage: rows})
    commit_histories(ctx.workdir, histories)
    downloaded = [c for c in clip_ids if c not in failures]

    ledger = ctx.workdir / "02-keyframes" / "ledger"
    cmd = avcaps(config, "keyframes", "keyframes.commit_interval_s=0")  # a commit per batch
    kill_mid_write(cmd, ledger, ctx.workdir / "media", commits=3)
    led = stage_ledger(KeyframesStage(ctx))
    assert 3 <= len(led.latest()) < len(downloaded)

    run_stage(KeyframesStage, ctx, RunOptions(progress=False))
    # Every downloaded clip (the retried one too) extracted exactly once; the failed ones never tried.
    check_exactly_once(led.read_all(), downloaded)
    assert set(led.read_all()["clip_id"]) == set(downloaded)
    assert not list(ctx.workdir.rglob(".tmp-*"))
    state = led.latest()
    import soundfile as sf
    from PIL import Image

    for row in state.itertuples():
        frames = sorted((ctx.workdir / "media" / "frames" / row.clip_id).iterdir())
        assert [p.name for p in frames] == sorted(f"{k}.jpg" for k in range(8))
        for p in frames:
            Image.open(p).load()  # a complete JPEG
        assert sf.info(str(ctx.workdir / row.audio_path)).frames == 160_000
