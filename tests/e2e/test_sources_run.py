"""Stages 0-6 on media a lab already has (issue 23): full-length videos in a folder (clips not
starting at 0), pre-cut clips in tar shards, a dataset saved with ``datasets``, videos without
sound beside a folder of WAVs, and YouTube (the local media server, through yt-dlp) only for the
rest, with a clip rate-limited once and a damaged local file among them.

Every stage runs as ``avcaps run N`` in its own process, as a user runs it. The media server's
request log must show no request for a clip a local source held; every cut clip decodes at 10 s;
the export holds every clip that is ok all the way, each row naming its sources, and the card
counts the clips per source.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from stages.download.stage import DownloadStage
from stages.keyframes import KeyframesStage
from stages.merge.stage import MergeStage
from stages.review.client import LabelStudio
from stages.review.labeling import verdict_result
from stages.review.push import ReviewStage
from stages.review.server import LabelStudioServer
from standins.media import YTDLP_PLUGINS, MediaServer, make_clip
from standins.review_run import TEST_CREDS as CREDS
from standins.sources import make_wav, write_hf_dataset, write_tar

from .test_realistic_run import REPO, avcaps_run, export_rows, latest, write_config

pytestmark = pytest.mark.slow

# youtube id -> (split, start s, where its media is)
CLIPS: dict[str, tuple[str, int, str]] = {
    "trfullvid01": ("train", 17, "folder"),
    "trfullvid02": ("train", 3, "folder"),
    "trtarclip01": ("train", 40, "tar"),
    "trhfclip001": ("train", 9, "hf"),
    "trsilent001": ("train", 2, "silent+wav"),
    "tryoutube01": ("train", 3, "youtube"),  # rate-limited once (429), then downloaded
    "trcorrupt01": ("train", 3, "corrupt"),  # a damaged file locally, not on YouTube either
    "tefullvid01": ("test", 6, "folder"),
    "tetarclip01": ("test", 0, "tar"),
    "tehfclip001": ("test", 12, "hf"),
    "teyoutube01": ("test", 3, "youtube"),
}


def cid(yt: str) -> str:
    start = CLIPS[yt][1]
    return f"{yt}_{start * 1000}_{(start + 10) * 1000}"


def write_media(root: Path) -> list[dict[str, Any]]:
    """Every source as a lab holds it; returns the local part of download.sources."""
    tmp = root / "made"

    def one(item: tuple[str, tuple[str, int, str]]) -> bytes | None:
        yt, (_, start, where) = item
        if where == "folder":
            make_clip(root / "lab" / "videos" / f"Y{yt}", start + 12, size="480x360")
        elif where in ("tar", "hf"):
            return make_clip(tmp / yt, 10).read_bytes()  # a pre-cut clip's bytes
        elif where == "silent+wav":
            make_clip(root / "silent" / cid(yt), 10, audio=False)
            make_wav(root / "wavs" / f"{cid(yt)}.wav", 10)
        elif where == "youtube":
            os.replace(make_clip(tmp / yt, start + 12), root / "served" / f"{yt}.mp4")
        elif where == "corrupt":
            (root / "lab" / "videos" / f"Y{yt}.mp4").write_bytes(os.urandom(40_000))
        return None

    (root / "served").mkdir(parents=True)
    (root / "lab" / "videos").mkdir(parents=True)
    with ThreadPoolExecutor(2) as pool:
        made = dict(zip(CLIPS, pool.map(one, CLIPS.items()), strict=True))
    members = sorted((f"{cid(yt)}.mp4", data) for yt, data in made.items() if CLIPS[yt][2] == "tar" and data)
    hf_ids = [yt for yt in CLIPS if CLIPS[yt][2] == "hf"]
    hf = {"ytid": hf_ids, "start": [CLIPS[yt][1] for yt in hf_ids], "video": [made[yt] for yt in hf_ids]}
    write_tar(root / "shards" / "clips-000.tar", members[:1])
    write_tar(root / "shards" / "clips-001.tar", members[1:])
    write_hf_dataset(root / "hf-mirror", hf)
    return [
        {"kind": "folder", "name": "lab", "path": str(root / "lab"), "pattern": "Y{youtube_id}.mp4"},
        {"kind": "tar", "name": "shards", "path": str(root / "shards" / "clips-{000..001}.tar"),
         "pattern": "{clip_id}.mp4"},
        {"kind": "hf", "name": "mirror", "dataset": str(root / "hf-mirror"),
         "columns": {"youtube_id": "ytid", "start_time": "start"}},
        {"kind": "folder", "name": "silent", "path": str(root / "silent"), "pattern": "{clip_id}.mp4"},
        {"kind": "folder", "name": "wavs", "path": str(root / "wavs"), "pattern": "{clip_id}.wav",
         "streams": "audio"},
    ]  # fmt: skip


def write_csvs(folder: Path) -> Path:
    folder.mkdir(parents=True)
    n = 0
    for split in ("train", "test"):
        lines = ["audiocap_id,youtube_id,start_time,caption"]
        for yt, (s, start, _) in CLIPS.items():
            if s == split:
                for caption in ["A dog barks"] if split == "train" else ["A dog barks", "Dogs bark nearby"]:
                    n += 1
                    lines.append(f"{n},{yt},{start},{caption}")
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_stages_0_to_6_through_every_kind_of_source(
    ls_server: LabelStudioServer,
    ls_root: Path,
    tiny_blip2: Path,
    tiny_clip: Path,
    tiny_clap: Path,
    dog_chat_model: Path,
    tmp_path: Path,
) -> None:
    workdir = ls_root / "sources-run"
    local = write_media(tmp_path)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(YTDLP_PLUGINS)]),
        "LABEL_STUDIO_API_KEY": CREDS.api_key,
    }
    env.pop("AVCAPS_APP", None)
    with MediaServer(tmp_path / "served") as media:
        media.set_fault("tryoutube01.mp4", "429", 1)
        config = write_config(
            tmp_path / "run.yaml",
            workdir=str(workdir),
            manifest={
                "csv_dir": str(write_csvs(tmp_path / "csv")),
                "splits": {"train": "train.csv", "test": "test.csv"},
                "checksums": None,
            },
            download={
                "sources": [*local, {"kind": "youtube", "url_template": media.url_template()}],
                "max_attempts": 3,
                "backoff_s": 0.2,
                "read_timeout_s": 10,
                "socket_timeout_s": 10,
            },
            caption={
                "model": str(tiny_blip2),
                "num_beams": 1,
                "max_new_tokens": 8,
            },
            merge={
                "backend": "transformers",
                "model": str(dog_chat_model),
                "device": "cpu",
                "reasoning_effort": None,
                "max_new_tokens": 24,
                "min_visual_overlap": 0.0,
                "min_audio_overlap": 0.3,
                "max_quality_retries": 1,
            },
            review={"url": ls_server.url, "document_root": str(ls_root)},
            scoring={"clip_model": str(tiny_clip), "clap_model": str(tiny_clap)},
        )
        for stage in (0, 1, 2, 3, 4, 5):
            avcaps_run(stage, config, env)
        requested = {name for _, name, _ in media.requests}

    # YouTube was asked for the clips no local source held, and for nothing else.
    assert requested == {"tryoutube01.mp4", "teyoutube01.mp4", "trcorrupt01.mp4"}
    download = latest(DownloadStage, workdir)
    want_source = {
        "folder": "folder:lab", "tar": "tar:shards", "hf": "hf:mirror", "silent+wav": "folder:silent",
        "youtube": "youtube:youtube",
    }  # fmt: skip
    for yt, (_, _, where) in CLIPS.items():
        row = download.loc[cid(yt)]
        if where == "corrupt":  # damaged locally (named), then 404 on YouTube: failed, for good
            assert (row["status"], row["reason"]) == ("failed_permanent", "http_404")
            assert (
                f"folder:lab: corrupt_source: {tmp_path / 'lab' / 'videos' / f'Y{yt}.mp4'}" in row["message"]
            )
            continue
        assert (row["status"], row["video_source"]) == ("ok", want_source[where]), (yt, row["message"])
        tol = 0.6
        assert abs(row["video_duration_s"] - 10) <= tol, yt  # cut or pre-cut, 10 s
        assert row["audio_source"] == ("folder:wavs" if where == "silent+wav" else want_source[where])
    assert download.loc[cid("tryoutube01"), "attempts"] == 2  # the 429 cleared on its retry
    assert (latest(KeyframesStage, workdir)["status"] == "ok").all()

    # The annotators accept every pushed merge; the export pulls the reviews.
    client = LabelStudio(ls_server.url, CREDS.api_key)
    for task_id in latest(ReviewStage, workdir)["ls_task_id"]:
        client.create_annotation(int(task_id), [verdict_result("accept")])
    avcaps_run(6, config, env)

    merged = latest(MergeStage, workdir)
    ok = set(download.index[download["status"] == "ok"])
    rows = export_rows(workdir, "and")
    assert set(rows["train"].index) == {cid(y) for y, c in CLIPS.items() if c[0] == "train"} & ok
    assert set(rows["test"].index) == set(merged.index[merged["status"] == "ok"]) & ok
    assert len(rows["test"]) == 4
    everything = pd.concat(rows.values())
    for c, row in everything.iterrows():
        assert row["video_source"] == download.loc[c, "video_source"]
        assert row["audio_source"] == download.loc[c, "audio_source"]
    stats = json.loads((workdir / "export" / "statistics.json").read_text())
    video = {"folder:lab": 3, "folder:silent": 1, "hf:mirror": 2, "tar:shards": 2, "youtube:youtube": 2}
    assert stats["provenance"]["video_sources"] == video
    card = (workdir / "export" / "README.md").read_text()
    assert (
        "- media sources (exported clips per source): picture: folder:lab 3, folder:silent 1, hf:mirror 2, "
        "tar:shards 2, youtube:youtube 2; sound: folder:lab 3, folder:wavs 1, hf:mirror 2, tar:shards 2, "
        "youtube:youtube 2"
    ) in card
    # A rerun takes nothing again: no new row, and no request for anything.
    for stage in (1, 2):
        assert "nothing to do" in avcaps_run(stage, config, env)
