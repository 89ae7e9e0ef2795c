"""Stages 1-3 with ``--executor ray`` on the demo manifest, against the local media server and the
tiny BLIP-2: the ledgers equal a local-executor run's (same items, statuses and outputs). As in a
real run, one clip is gone from its source (404) and one is served only on its second try: stages
2 and 3 are fed a download ledger with a failed and a retried clip."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from pipeline.cli import load_context
from pipeline.registry import find_stage
from pipeline.runner import run_stage
from pipeline.stage import RunContext, RunOptions
from standins.media import MediaServer, make_sources

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
DEMO = Path(__file__).parents[2] / "manifests" / "demo.yaml"
COMPARED = {
    "01-download": ["video_duration_s", "audio_duration_s", "video_width", "video_height"],
    "02-keyframes": ["frame_paths", "frame_times_s", "middle_frame", "audio_path", "audio_samples"],
    "03-caption": ["visual_caption", "frame_captions", "caption_settings_hash"],
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MediaServer, Path]]:
    """Stand-in media for the demo's 12 clips on 127.0.0.1, and a tiny BLIP-2 on disk."""
    from standins.blip2 import build_tiny_blip2

    tmp = tmp_path_factory.mktemp("ray-stages")
    probe = load_context(DEMO, tmp / "probe", ())
    run_stage(find_stage("manifest"), probe, RunOptions(progress=False))
    clips = pd.read_parquet(tmp / "probe" / "00-manifest" / "ledger", columns=["youtube_id", "start_s"])
    make_sources(tmp / "media", [(str(r.youtube_id), int(r.start_s)) for r in clips.itertuples()])
    model = build_tiny_blip2(tmp / "blip2-tiny")
    with MediaServer(tmp / "media") as server:
        yield server, model


def context(workdir: Path, url_template: str, model: Path) -> RunContext:
    return load_context(
        DEMO,
        workdir,
        (
            f"download.url_template={url_template}",
            f"caption.model={model}",
            "caption.score=false",  # stages 0-3 under Ray: the scores are tested in tests/caption
            "download.backoff_s=0.05",
        ),
    )


def run_all(ctx: RunContext, executor: str, server: MediaServer) -> tuple[str, str]:
    """Stages 0-3; returns the clip gone from its source and the one served on its second try."""
    run_stage(find_stage("manifest"), ctx, RunOptions(progress=False, executor=executor))
    clips = pd.read_parquet(ctx.workdir / "00-manifest" / "ledger").sort_values("clip_id")
    (gone, gone_yt), (flaky, flaky_yt) = clips[["clip_id", "youtube_id"]].head(2).itertuples(index=False)
    server.set_fault(f"{gone_yt}.mp4", "404")
    server.set_fault(f"{flaky_yt}.mp4", "500", times=1)  # set anew per run: it counts what it served
    for stage in ("download", "keyframes", "caption"):
        run_stage(find_stage(stage), ctx, RunOptions(progress=False, executor=executor))
    return gone, flaky


def state(workdir: Path, stage: str) -> pd.DataFrame:
    """The current row of every clip, after checking that no row was committed twice."""
    df = pd.read_parquet(workdir / stage / "ledger")
    assert not df.duplicated(["clip_id", "seq"]).any(), f"{stage}: an item was committed twice"
    return df.sort_values("seq").drop_duplicates("clip_id", keep="last").set_index("clip_id").sort_index()


def test_stages_1_to_3_on_ray_equal_local(
    tmp_path: Path, served: tuple[MediaServer, Path], cluster: None
) -> None:
    server, model = served
    local, distributed = tmp_path / "local", tmp_path / "ray"
    gone, flaky = run_all(context(local, server.url_template(), model), "local", server)
    assert run_all(context(distributed, server.url_template(), model), "ray", server) == (gone, flaky)
    for stage, columns in COMPARED.items():
        a, b = state(local, stage), state(distributed, stage)
        cols = ["status", "reason", "attempts", "seq", *columns]
        pd.testing.assert_frame_equal(a[cols], b[cols], check_dtype=False)
        if stage == "01-download":
            assert len(a) == 12
            assert tuple(a.loc[gone, ["status", "reason"]]) == ("failed_permanent", "http_404")
            assert tuple(a.loc[flaky, ["status", "attempts", "seq"]]) == ("ok", 2, 2)
        else:  # the clip gone never reaches stages 2 and 3; the retried one does
            assert len(a) == 11 and gone not in a.index and (a["status"] == "ok").all(), stage
            assert a.loc[flaky, "attempts"] == 1
    for rel in state(distributed, "02-keyframes")["audio_path"]:
        assert (distributed / rel).stat().st_size > 0
