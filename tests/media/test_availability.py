"""The availability report set against what public AudioCaps downloaders published (7-9% of
train, 3-9% of test gone from YouTube), so a user sees at once when a run is far off."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.cli import load_context
from pipeline.runner import run_stage
from pipeline.stage import RunOptions
from pipeline.status import format_table, run_status
from stages.download.availability import compare_with_public
from stages.download.stage import DownloadStage
from stages.manifest import ManifestStage
from standins.media import MediaServer
from standins.run_history import Failure, clip_history, commit_histories

from .conftest import START_S, MakeRun, add_source


def test_verdicts() -> None:
    ok = {"private": 5, "http_404": 2, "no_audio": 3}  # 7 gone, 3 unusable
    within = compare_with_public("train", 90, ok, 0)
    assert within["gone"] == 7 and within["gone_pct"] == 7.0 and within["vs_public"] == "within"
    assert within["public_gone_pct"] == [7.0, 9.0]
    assert compare_with_public("test", 198, {"removed": 2}, 0)["vs_public"] == "below"  # 1%
    assert compare_with_public("train", 90, {"unavailable": 10}, 0)["vs_public"] == "above"  # 10%
    far = compare_with_public("test", 80, {"unavailable": 20}, 0)  # 20%
    assert far["vs_public"] == "far_above" and "far above" in far["note"] and "yt-dlp -v" in far["note"]
    assert compare_with_public("test", 20, {"private": 10}, 0)["vs_public"] == "too_few"
    assert compare_with_public("val", 300, {"private": 10}, 0)["vs_public"] == "no_public_figure"
    # Many clips still failing transiently: said, whatever the verdict.
    assert "40 clips still failing transiently" in compare_with_public("test", 95, {"private": 5}, 40)["note"]


def test_status_sets_a_run_against_the_public_figures(
    media_root: Path, server: MediaServer, make_run: MakeRun
) -> None:
    """A run folder as a real run leaves it: 118 clips tried before (18 gone: private videos and
    404s), and a run of stage 1 that downloads the last two and writes the stats."""
    ids = [f"avail{i:06d}" for i in range(120)]
    for yt in ids[-2:]:
        add_source(media_root, yt, "okh264clip1")
    config = make_run(ids, download={"url_template": server.url_template()})
    ctx = load_context(config, None, ())
    run_stage(ManifestStage, ctx, RunOptions(progress=False))
    histories = []
    for k, yt in enumerate(ids[:-2]):
        cid = f"{yt}_{START_S * 1000}_{(START_S + 10) * 1000}"
        outputs = {"video_path": f"media/video/{cid}.mp4", "video_duration_s": 10.0, "file_bytes": 1}
        failure = Failure(DownloadStage, "private" if k < 15 else "http_404") if k < 18 else None
        histories.append(
            {DownloadStage: clip_history(DownloadStage, cid, outputs, failure=failure, retried=k == 30)}
        )
    commit_histories(ctx.workdir, histories)

    run_stage(DownloadStage, ctx, RunOptions(progress=False))
    stats = json.loads((ctx.workdir / "01-download" / "stats.json").read_text())
    test = stats["summary"]["availability"]["test"]
    assert test["downloaded"] == 102 and test["gone"] == 18 and test["gone_pct"] == 15.0
    assert test["public_gone_pct"] == [3.0, 9.0] and test["vs_public"] == "far_above"
    table = format_table(run_status(ctx))
    assert (
        "! test: 15.0% of 120 settled clips gone from the source (public downloaders: 3-9%): far above"
        in table
    )
