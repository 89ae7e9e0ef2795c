"""A run folder as stages 0-4 leave it, for stage 5's tests: real media, real ledgers.

Writes real media files (JPEG keyframes made with Pillow, 16 kHz FLAC audio made with soundfile)
under ``DIR/media/``, the clip table (``00-manifest``) and the ledgers of stages 1-4 with each
stage's own output schema, as a real run leaves them (:mod:`standins.run_history`): beside the
clips asked for, a test clip whose download failed for good and one whose merge failed the quality
gate (neither may reach stage 5), and the first clips' merge and download each failed once before
they succeeded. Stage 5 then runs through the real runner of the real application: the stages'
ledgers are what it reads, nothing here computes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipeline.stage import Stage
from stages.download.stage import DownloadStage
from stages.merge.stage import MergeStage
from stages.review.server import Credentials
from standins.run_history import Failure, clip_histories, commit_histories, ok_outputs

REPO = Path(__file__).resolve().parents[1]
# The admin of the tests' Label Studio: test-only, on a loopback server that lives for one session.
TEST_CREDS = Credentials(
    "admin@avcaps.test", "test-only-password-1", "5f0c7a9e2b4d6f8a1c3e5b7d9f0a2c4e6b8d0f1a"
)
COLORS = [(200, 40, 40), (40, 160, 60), (40, 80, 200), (220, 180, 30), (120, 40, 160), (30, 160, 170)]
# Test clips written beside the ones asked for, which end failed upstream: never pushed.
UPSTREAM_FAILED: dict[str, Failure] = {
    "dlfail00000_0_10000": Failure(DownloadStage, "private"),
    "mgfail00000_0_10000": Failure(MergeStage, "gate_missing_visual"),
}
# The k-th clip asked for failed a first try in this stage, then succeeded.
RETRIED: tuple[type[Stage], ...] = (MergeStage, DownloadStage)


def write_media(workdir: Path, clip_id: str, index: int, frames: int = 3) -> tuple[list[str], str]:
    import numpy as np
    import soundfile as sf
    from PIL import Image, ImageDraw

    frame_paths = []
    for k in range(frames):
        rel = f"media/frames/{clip_id}/{k}.jpg"
        (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
        img = Image.new("RGB", (320, 240), COLORS[(index + k) % len(COLORS)])
        ImageDraw.Draw(img).text((10, 10), f"{clip_id} frame {k}", fill=(255, 255, 255))
        img.save(workdir / rel, quality=90)
        frame_paths.append(rel)
    audio = f"media/audio/{clip_id}.flac"
    (workdir / audio).parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(16000 * 10) / 16000
    tone = 0.3 * np.sin(2 * math.pi * (220 + 55 * index) * t)
    sf.write(workdir / audio, tone.astype("float32"), 16000, format="FLAC")
    return frame_paths, audio


def write_contract_run(workdir: Path, clips: list[dict[str, Any]], share_media: bool = False) -> None:
    """Media and ledgers of stages 0-4 for ``clips`` (dicts with clip_id, split, audio_captions,
    visual_caption, merged_captions, and optionally merge_scores: stage 4's score columns) plus
    :data:`UPSTREAM_FAILED`. Every clip is merged whatever its split (as with ``merge.splits``
    covering it), so what keeps a clip out of stage 5 is either its upstream failure or stage 5's
    own ``review.splits``. ``share_media`` points every clip at the first clip's files (scale
    tests)."""
    from pipeline.selection import stage_ledger
    from stages.manifest import ManifestStage

    workdir = Path(workdir)
    failed = [
        {
            "clip_id": cid,
            "split": "test",
            "audio_captions": ["A car passes by"],
            "visual_caption": "a red car on a road",
            "merged_captions": ["A red car passes by on a road"],
        }
        for cid in UPSTREAM_FAILED
    ]
    manifest_rows, histories = [], []
    media: tuple[list[str], str] | None = None
    for i, clip in enumerate([*clips, *failed]):
        cid = clip["clip_id"]
        yt, start_ms, end_ms = cid.rsplit("_", 2)
        failure = UPSTREAM_FAILED.get(cid)
        downloaded = failure is None or failure.stage is not DownloadStage
        if downloaded and (media is None or not share_media):
            media = write_media(workdir, cid, i)
        frame_paths, audio = media or ([], "")
        manifest_rows.append(
            {
                "clip_id": cid,
                "status": "ok",
                "reason": "",
                "message": "",
                "attempts": 1,
                "youtube_id": yt,
                "start_s": int(start_ms) // 1000,
                "end_s": int(end_ms) // 1000,
                "split": clip.get("split", "test"),
                "audio_captions": clip["audio_captions"],
                "audiocap_ids": list(range(i * 10, i * 10 + len(clip["audio_captions"]))),
            }
        )
        scores = {MergeStage: clip["merge_scores"]} if clip.get("merge_scores") else None
        outputs = ok_outputs(
            cid, yt, frame_paths, audio, clip["visual_caption"], clip["merged_captions"], scores=scores
        )
        histories.append(
            clip_histories(
                cid,
                outputs,
                failure=failure,
                retried_in=RETRIED[i] if i < len(RETRIED) and i < len(clips) else None,
            )
        )
    stage_ledger(ManifestStage, workdir).commit(manifest_rows)
    commit_histories(workdir, histories)


def make_clips(n: int, tag: str = "a") -> list[dict[str, Any]]:
    clips = []
    for i in range(n):
        clips.append(
            {
                "clip_id": f"{tag}{i:02d}xxxxxxxx"[:11] + f"_{i * 1000}_{i * 1000 + 10000}",
                "split": "test",
                "audio_captions": [f"A dog barks number {i}", f"Birds chirp {i}"],
                "visual_caption": f"a brown dog on a lawn {i}",
                "merged_captions": [f"A brown dog barks on a lawn {i}", f"Birds chirp near a brown dog {i}"],
            }
        )
    return clips
