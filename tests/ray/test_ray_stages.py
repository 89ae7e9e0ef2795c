"""Stages 1-3 with ``--executor ray`` on the demo manifest, against the local media server and the
tiny BLIP-2: the ledgers equal a local-executor run's (same items, statuses and outputs)."""

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
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """Stand-in media for the demo's 12 clips on 127.0.0.1, and a tiny BLIP-2 on disk."""
    from standins.blip2 import build_tiny_blip2

    tmp = tmp_path_factory.mktemp("ray-stages")
    probe = load_context(DEMO, tmp / "probe", ())
    run_stage(find_stage("manifest"), probe, RunOptions(progress=False))
    clips = pd.read_parquet(tmp / "probe" / "00-manifest" / "ledger", columns=["youtube_id", "start_s"])
    make_sources(tmp / "media", [(str(r.youtube_id), int(r.start_s)) for r in clips.itertuples()])
    model = build_tiny_blip2(tmp / "blip2-tiny")
    with MediaServer(tmp / "media") as server:
        yield server.url_template(), model


def context(workdir: Path, url_template: str, model: Path) -> RunContext:
    return load_context(
        DEMO,
        workdir,
        (f"download.url_template={url_template}", f"caption.model={model}", "download.backoff_s=0.05"),
    )


def run_all(ctx: RunContext, executor: str) -> None:
    for stage in ("manifest", "download", "keyframes", "caption"):
        run_stage(find_stage(stage), ctx, RunOptions(progress=False, executor=executor))


def state(workdir: Path, stage: str) -> pd.DataFrame:
    df = pd.read_parquet(workdir / stage / "ledger")
    assert df["clip_id"].is_unique, f"{stage}: an item was committed twice"
    return df.set_index("clip_id").sort_index()


def test_stages_1_to_3_on_ray_equal_local(tmp_path: Path, served: tuple[str, Path], cluster: None) -> None:
    url, model = served
    local, distributed = tmp_path / "local", tmp_path / "ray"
    run_all(context(local, url, model), "local")
    run_all(context(distributed, url, model), "ray")
    for stage, columns in COMPARED.items():
        a, b = state(local, stage), state(distributed, stage)
        assert len(a) == 12 and (a["status"] == "ok").all(), stage
        cols = ["status", "reason", "attempts", *columns]
        pd.testing.assert_frame_equal(a[cols], b[cols], check_dtype=False)
    for rel in state(distributed, "02-keyframes")["audio_path"]:
        assert (distributed / rel).stat().st_size > 0
