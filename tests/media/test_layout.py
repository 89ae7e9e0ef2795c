"""Where stage 1 puts clips: ``media/video/<2 hex>/<clip_id>.<ext>``, found without listing a
folder; run folders written before (flat ``media/video/<clip_id>.mp4``) keep working."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.cli import load_context
from pipeline.runner import run_stage
from pipeline.selection import stage_ledger
from pipeline.stage import RunOptions
from stages.download.stage import DownloadStage, existing_videos, video_path
from stages.keyframes import KeyframesStage
from stages.manifest import ManifestStage
from standins.media import MediaServer, make_clip
from standins.run_history import clip_history, commit_histories

from .conftest import START_S, MakeRun, add_source


def clip_id(yt: str) -> str:
    return f"{yt}_{START_S * 1000}_{(START_S + 10) * 1000}"


def test_hashed_paths() -> None:
    media = Path("media")
    p = video_path(media, "abcdefghijk_3000_13000")
    assert p.parent.parent == media / "video" and len(p.parent.name) == 2
    assert p.name == "abcdefghijk_3000_13000.mp4"
    assert p == video_path(media, "abcdefghijk_3000_13000")  # stable
    buckets = {video_path(media, f"clip{i:07d}_0_10000").parent.name for i in range(2000)}
    assert len(buckets) == 256  # spread over every folder


def test_an_old_flat_run_folder_keeps_working(
    media_root: Path, server: MediaServer, make_run: MakeRun, tmp_path: Path
) -> None:
    kinds = ["layoutoldok", "layoutflat1", "layouthash1", "layoutfresh"]
    for yt in kinds:
        add_source(media_root, yt, "okh264clip1")
    config = make_run(kinds, download={"url_template": server.url_template()})
    ctx = load_context(config, None, ())
    run_stage(ManifestStage, ctx, RunOptions(progress=False))
    wd, media = ctx.workdir, ctx.workdir / "media"
    cut = make_clip(tmp_path / "cut", 10)  # a clip as stage 1 cuts it

    # An older run downloaded `layoutoldok` into the flat layout and committed it ...
    old = clip_id("layoutoldok")
    flat = media / "video" / f"{old}.mp4"
    flat.parent.mkdir(parents=True)
    shutil.copyfile(cut, flat)
    outputs = {
        "video_path": f"media/video/{old}.mp4",
        "video_duration_s": 10.0,
        "audio_duration_s": 10.0,
        "source_duration_s": 20.0,
        "video_width": 96,
        "video_height": 64,
        "file_bytes": flat.stat().st_size,
        "source_url": server.url_template().format(id="layoutoldok"),
    }
    commit_histories(wd, [{DownloadStage: clip_history(DownloadStage, old, outputs)}])
    # ... and was killed after placing `layoutflat1` (old layout) and `layouthash1` (new layout)
    # but before committing them.
    leftover_flat = media / "video" / f"{clip_id('layoutflat1')}.mp4"
    shutil.copyfile(cut, leftover_flat)
    leftover_hashed = video_path(media, clip_id("layouthash1"))
    leftover_hashed.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cut, leftover_hashed)
    assert existing_videos(media, clip_id("layoutflat1")) == [leftover_flat]
    assert existing_videos(media, clip_id("layouthash1")) == [leftover_hashed]

    run_stage(DownloadStage, ctx, RunOptions(progress=False))
    state = stage_ledger(DownloadStage(ctx)).latest()
    assert (state["status"] == "ok").all()
    # Only the clip never fetched reached the server; the committed flat row was left alone, the
    # leftovers were taken as they are, the flat one moved into the hashed layout.
    assert server.hits.get("layoutoldok.mp4", 0) == 0
    assert server.hits.get("layoutflat1.mp4", 0) == server.hits.get("layouthash1.mp4", 0) == 0
    assert server.hits["layoutfresh.mp4"] >= 1
    assert state.loc[old, "video_path"] == f"media/video/{old}.mp4" and flat.is_file()
    assert int(state.loc[old, "seq"]) == 1  # not redone
    for yt in ("layoutflat1", "layouthash1", "layoutfresh"):
        rel = state.loc[clip_id(yt), "video_path"]
        assert rel == video_path(Path("media"), clip_id(yt)).as_posix() and (wd / rel).is_file()
    assert not leftover_flat.exists()

    # Stage 2 reads every clip from the path its ledger row gives, old layout or new.
    run_stage(KeyframesStage, ctx, RunOptions(progress=False))
    kf = stage_ledger(KeyframesStage(ctx)).latest()
    assert (kf.loc[[clip_id(yt) for yt in kinds], "status"] == "ok").all(), kf[["status", "message"]]
