"""Stages 1 and 2 on a media disk that fills (a real tmpfs): the run stops with exit 5 and one line,
no row says a clip failed, and a rerun once there is room again ends with every clip ok, each
extracted or downloaded exactly once (issue 26)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from pipeline.cli import load_context
from pipeline.runner import run_stage
from pipeline.selection import stage_ledger
from pipeline.stage import RunOptions
from stages.download.stage import DownloadStage
from stages.keyframes import KeyframesStage
from stages.manifest import ManifestStage
from standins.media import MediaServer, make_clip
from standins.run_history import Failure, clip_history, commit_histories

from .conftest import START_S, MakeRun, add_source, avcaps, finish

INFO = re.compile(r"\d{4}-\d\d-\d\d [\d:,]+ (INFO|WARNING) ")


def said(err: str) -> list[str]:
    """stderr without the progress log: what the run says to the user."""
    return [line for line in err.strip().splitlines() if line and not INFO.match(line)]


def test_keyframes_on_a_full_disk_stop_and_resume(tmp_path: Path, make_run: MakeRun, tmpfs) -> None:
    n = 16
    ids = [f"fullkf{i:05d}" for i in range(n)]
    # 1 MB kept free: more than any one file stage 2 writes (a 10-s FLAC of a tone is ~100 kB), so a
    # write that fails for want of room (libsndfile says only "System error") leaves less than that.
    config = make_run(ids, keyframes={"frames": 4, "batch_size": 2, "min_free_mb": 1})
    ctx = load_context(config, None, ())
    run_stage(ManifestStage, ctx, RunOptions(progress=False))
    # Stage 1's ledger as a real run leaves it (a clip gone for good, one retried), the videos
    # outside the media disk (a path in the ledger is all stage 2 follows).
    clip = make_clip(tmp_path / "cut", 10)
    clip_ids = list(stage_ledger(ManifestStage(ctx)).latest().index)
    gone, retried = clip_ids[3], clip_ids[4]
    histories = []
    for cid in clip_ids:
        rel = f"videos/{cid}.mp4"
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
        failure = Failure(DownloadStage, "http_404") if cid == gone else None
        rows = clip_history(
            DownloadStage, cid, outputs, failure=failure, retried=cid == retried, max_attempts=3
        )
        histories.append({DownloadStage: rows})
    commit_histories(ctx.workdir, histories)
    downloaded = [c for c in clip_ids if c != gone]
    media = tmpfs(ctx.workdir / "media", "2m")

    code, err = finish(avcaps(config, "run", "keyframes", "--no-progress"))
    assert code == 5, err
    (line,) = said(err)
    assert line.startswith("error: ") and str(media) in line and "free of 2.1 MB" in line, line
    led = stage_ledger(KeyframesStage(ctx))
    history = led.read_all()
    assert 2 <= len(history) < len(downloaded)
    assert set(history["status"]) == {"ok"}  # the disk's fault is no clip's failure
    assert not list((media / ".tmp").iterdir())

    tmpfs.resize(media, "64m")
    code, err = finish(avcaps(config, "run", "keyframes", "--no-progress"))
    assert code == 0, err
    history = led.read_all()
    assert set(history["status"]) == {"ok"}
    assert sorted(history["clip_id"]) == sorted(downloaded)  # each clip extracted exactly once
    import soundfile as sf
    from PIL import Image

    for row in led.latest().itertuples():
        for rel in row.frame_paths:
            Image.open(ctx.workdir / rel).load()
        assert sf.info(str(ctx.workdir / row.audio_path)).frames == 160_000


def test_downloads_on_a_full_disk_stop_and_resume(
    media_root: Path, server: MediaServer, make_run: MakeRun, tmpfs
) -> None:
    """yt-dlp's ffmpeg writes the clip in a subprocess: a full disk shows only as "ffmpeg exited
    with code 1". ``min_free_mb`` above a clip's size makes the run stop before that, or tells that
    failure from a clip's own."""
    ids = [add_source(media_root, f"fulldl{i:05d}", "okh264clip1") for i in range(12)]
    config = make_run(
        ids,
        download={
            "url_template": server.url_template(),
            "batch_size": 1,
            "concurrency": 1,
            "min_free_mb": 0.3,
        },
    )
    ctx = load_context(config, None, ())
    run_stage(ManifestStage, ctx, RunOptions(progress=False))
    media = tmpfs(ctx.workdir / "media", "1m")

    code, err = finish(avcaps(config, "run", "download", "--no-progress"))
    assert code == 5, err
    (line,) = said(err)
    assert line.startswith("error: ") and str(media) in line and "download.min_free_mb = 0.3" in line, line
    led = stage_ledger(DownloadStage(ctx))
    history = led.read_all()
    assert 1 <= len(history) < len(ids) and set(history["status"]) == {"ok"}
    done = list(history["clip_id"])
    hits = dict(server.hits)

    tmpfs.resize(media, "64m")
    code, err = finish(avcaps(config, "run", "download", "--no-progress"))
    assert code == 0, err
    history = led.read_all()
    clip_ids = [f"{yt}_{START_S * 1000}_{(START_S + 10) * 1000}" for yt in ids]
    assert set(history["status"]) == {"ok"} and sorted(history["clip_id"]) == sorted(clip_ids)
    for cid in done:  # the clips committed before the stop were not fetched again
        source = f"{cid.split('_')[0]}.mp4"
        assert server.hits[source] == hits[source], cid
    assert (led.latest()["video_duration_s"] > 9.8).all()
    assert not list(ctx.workdir.rglob(".tmp-*"))
