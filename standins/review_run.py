"""A run folder as stages 0-4 leave it, built from the column contract (for stage 5's tests).

Until stages 1-4 are on main, this writes what they would: real media files (JPEG keyframes made
with Pillow, 16 kHz FLAC audio made with soundfile) under ``DIR/media/`` and ledger rows of
``00-manifest`` and ``04-merge`` with the contract's columns. ``AVCAPS_APP=standins.review_run``
makes the engine see a ``merge`` stage whose ledger is this prefilled one, so stage 5 runs through
the real runner. A stand-in, named as such: it computes nothing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import AbortRun
from pipeline.ledger import Ledger
from pipeline.stage import Item, ItemStage, Result
from review.server import Credentials

if TYPE_CHECKING:
    import pyarrow as pa

STAGES: list[str] = [
    "stages.manifest:ManifestStage",
    "standins.review_run:ContractMergeStage",
    "stages.review:ReviewStage",
]
CONFIG_MODEL = "stages.config:RunConfig"
COMMANDS: dict[str, str] = {"review": "review.cli:review"}

REPO = Path(__file__).resolve().parents[1]
# The admin of the tests' Label Studio: test-only, on a loopback server that lives for one session.
TEST_CREDS = Credentials(
    "admin@avcaps.test", "test-only-password-1", "5f0c7a9e2b4d6f8a1c3e5b7d9f0a2c4e6b8d0f1a"
)
COLORS = [(200, 40, 40), (40, 160, 60), (40, 80, 200), (220, 180, 30), (120, 40, 160), (30, 160, 170)]


class ContractMergeStage(ItemStage):
    """Stands for stages 1-4: its ledger is prefilled by :func:`write_contract_run`."""

    number = 4
    name = "merge"
    upstream = "manifest"

    @classmethod
    def output_schema(cls) -> list[pa.Field]:
        import pyarrow as pa

        return [
            pa.field("frame_paths", pa.list_(pa.string())),
            pa.field("frame_times_s", pa.list_(pa.float64())),
            pa.field("middle_frame", pa.int32()),
            pa.field("audio_path", pa.string()),
            pa.field("visual_caption", pa.string()),
            pa.field("merged_captions", pa.list_(pa.string())),
            pa.field("merge_model", pa.string()),
        ]

    def process(self, batch: list[Item]) -> list[Result]:
        raise AbortRun("the contract stand-in computes nothing: its ledger is prefilled")


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
    """Media and ledgers for ``clips`` (dicts with clip_id, split, audio_captions, visual_caption,
    merged_captions). ``share_media`` points every clip at the first clip's files (scale tests)."""
    from stages.manifest import ManifestStage

    workdir = Path(workdir)
    manifest_rows, merge_rows = [], []
    for i, clip in enumerate(clips):
        cid = clip["clip_id"]
        yt, start_ms, end_ms = cid.rsplit("_", 2)
        if not share_media or i == 0:
            frame_paths, audio = write_media(workdir, cid, i)
        base = {"clip_id": cid, "status": "ok", "reason": "", "message": "", "attempts": 1}
        manifest_rows.append(
            base
            | {
                "youtube_id": yt,
                "start_s": int(start_ms) // 1000,
                "end_s": int(end_ms) // 1000,
                "split": clip.get("split", "test"),
                "audio_captions": clip["audio_captions"],
                "audiocap_ids": list(range(i * 10, i * 10 + len(clip["audio_captions"]))),
            }
        )
        merge_rows.append(
            base
            | {
                "frame_paths": frame_paths,
                "frame_times_s": [2.0, 5.0, 8.0][: len(frame_paths)],
                "middle_frame": 1,
                "audio_path": audio,
                "visual_caption": clip["visual_caption"],
                "merged_captions": clip["merged_captions"],
                "merge_model": "stand-in",
            }
        )
    schema = ManifestStage.output_schema()
    Ledger(workdir / "00-manifest" / "ledger", schema).commit(manifest_rows)
    Ledger(workdir / "04-merge" / "ledger", ContractMergeStage.output_schema()).commit(merge_rows)


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
