"""A run folder whose stages 1-5 are written directly to the column contract.

Stage 0 runs for real (the real AudioCaps CSVs, a seeded sample per split); the ledgers of stages
1-4 are committed with :class:`pipeline.ledger.Ledger` (the real on-disk format) and the reviews
written as ``05-review/reviews.parquet``, with real JPEG keyframes and WAV audio in ``media/``. It
stands in for the upstream stages until they run in the same tree, so export and publish can be
tested on every case (failures, empty visual captions, acronyms, reviews of each verdict).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FULL = Path("manifests/audiocaps.yaml")
# Visual captions cycled over the clips: plain, an acronym start, an empty one, a proper noun.
VISUAL_CAPTIONS = (
    "a man riding a motorcycle down a road.",
    "TV screen showing a football game",
    "",
    "a dog running on the grass",
    "Paris street at night with cars",
    "a group of people standing in a room",
)


@dataclass
class ContractRun:
    workdir: Path
    config: Any
    clips: dict[str, dict[str, Any]] = field(default_factory=dict)  # clip_id -> manifest row


def _fields() -> dict[str, list[Any]]:
    import pyarrow as pa

    s, ls = pa.string(), pa.list_(pa.string())
    return {
        "01-download": [pa.field("video_path", s), pa.field("video_duration_s", pa.float64())],
        "02-keyframes": [
            pa.field("frame_paths", ls),
            pa.field("frame_times_s", pa.list_(pa.float64())),
            pa.field("middle_frame", pa.int32()),
            pa.field("audio_path", s),
            pa.field("audio_samples", pa.int64()),
            pa.field("audio_padded_s", pa.float64()),
            pa.field("flag_black_frame", pa.bool_()),
            pa.field("flag_silent", pa.bool_()),
            pa.field("audio_dbfs", pa.float64()),
        ],
        "03-caption": [
            pa.field("visual_caption", s),
            pa.field("frame_captions", ls),
            pa.field("caption_model", s),
            pa.field("caption_revision", s),
            pa.field("caption_dtype", s),
            pa.field("caption_settings_hash", s),
            pa.field("caption_versions", s),
        ],
        "04-merge": [
            pa.field("merged_captions", ls),
            pa.field("merge_mode", s),
            pa.field("merge_raw", ls),
            pa.field("merge_prompt_hash", s),
            pa.field("merge_backend", s),
            pa.field("merge_model", s),
            pa.field("merge_checks", s),
        ],
    }


def _row(cid: str, status: str = "ok", reason: str = "", **outputs: Any) -> dict[str, Any]:
    return {"clip_id": cid, "status": status, "reason": reason, "message": reason, "attempts": 1, **outputs}


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    img = Image.new("RGB", (32, 24), ((seed * 40) % 256, (seed * 90) % 256, 120))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _wav(seed: int) -> bytes:
    import numpy as np
    import soundfile as sf

    t = np.arange(1600) / 16000
    buf = io.BytesIO()
    sf.write(buf, 0.1 * np.sin(2 * np.pi * (200 + 10 * seed) * t), 16000, format="WAV")
    return buf.getvalue()


def build_manifest(
    workdir: Path, sample_per_split: int | None, overrides: list[str] | None = None, config: Path = FULL
) -> Any:
    """Run the real stage 0 on a seeded sample of the AudioCaps CSVs; returns the RunContext."""
    from pipeline.cli import load_context
    from pipeline.runner import run_stage
    from pipeline.stage import RunOptions
    from stages.manifest import ManifestStage

    sets = [f"manifest.sample_per_split={sample_per_split}"] if sample_per_split else []
    ctx = load_context(config, workdir, (*sets, *(overrides or [])))
    run_stage(ManifestStage, ctx, RunOptions(progress=False))
    return ctx


def build_contract_run(
    workdir: Path,
    *,
    config: Path = FULL,
    sample_per_split: int | None = 6,
    download_failures: dict[str, str] | None = None,
    skip: dict[str, set[str]] | None = None,
    merge_splits: tuple[str, ...] = ("test",),
    verdicts: dict[str, str | None] | None = None,
    review_default: str | None = "accept",
    overrides: list[str] | None = None,
) -> ContractRun:
    """Write stages 1-5 for the sampled clips.

    ``config``: the run manifest whose stage 0 runs (``sample_per_split`` None keeps its own
    sampling); ``download_failures``: clip_id -> failure reason; ``skip``: stage folder -> clip ids
    with no row at all (a stage not done yet); ``verdicts``: clip_id -> verdict for merged clips
    (None: no review row), the others get ``review_default``.
    """
    import pandas as pd

    from pipeline.io import atomic_path
    from pipeline.ledger import Ledger

    ctx = build_manifest(workdir, sample_per_split, overrides, config)
    clips_df = Ledger(workdir / "00-manifest" / "ledger").latest()
    clips = {cid: row for cid, row in zip(clips_df.index, clips_df.to_dict("records"), strict=True)}
    download_failures = download_failures or {}
    skip = skip or {}
    verdicts = verdicts or {}
    fields = _fields()
    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in fields}
    reviews = []
    for i, cid in enumerate(sorted(clips)):
        split = clips[cid]["split"]
        if cid in download_failures:
            rows["01-download"].append(_row(cid, "failed_permanent", download_failures[cid]))
            continue
        rows["01-download"].append(_row(cid, video_path=f"media/video/{cid}.mp4", video_duration_s=10.0))
        frames = []
        for k in range(3):
            rel = f"media/frames/{cid}/{k}.jpg"
            with atomic_path(workdir / rel) as tmp:
                tmp.write_bytes(_jpeg(i + k))
            frames.append(rel)
        audio = f"media/audio/{cid}.wav"
        with atomic_path(workdir / audio) as tmp:
            tmp.write_bytes(_wav(i))
        rows["02-keyframes"].append(
            _row(
                cid,
                frame_paths=frames,
                frame_times_s=[1.0, 5.0, 9.0],
                middle_frame=1,
                audio_path=audio,
                audio_samples=160_000,
                audio_padded_s=0.0,
                flag_black_frame=False,
                flag_silent=i % 5 == 0,
                audio_dbfs=-20.0,
            )
        )
        visual = VISUAL_CAPTIONS[i % len(VISUAL_CAPTIONS)]
        rows["03-caption"].append(
            _row(
                cid,
                visual_caption=visual,
                frame_captions=[visual] * 3,
                caption_model="standin/tiny-blip2",
                caption_revision="r0",
                caption_dtype="float32",
                caption_settings_hash="abc123",
                caption_versions='{"transformers": "5.2x"}',
            )
        )
        if split in merge_splits:
            audio_caps = list(clips[cid]["audio_captions"])
            merged = [f"{a} while {visual or 'nothing is seen'}" for a in audio_caps]
            rows["04-merge"].append(
                _row(
                    cid,
                    merged_captions=merged,
                    merge_mode="per_caption",
                    merge_raw=merged,
                    merge_prompt_hash="p0h4sh",
                    merge_backend="transformers",
                    merge_model="standin/tiny-gpt-oss",
                    merge_checks="{}",
                )
            )
            verdict = verdicts.get(cid, review_default)
            if verdict is not None:
                final = merged if verdict != "edited" else [m + " (edited)" for m in merged]
                reviews.append(
                    {
                        "clip_id": cid,
                        "verdict": verdict,
                        "final_captions": final if verdict != "rejected" else [],
                        "comment": "",
                        "annotator": "reviewer@example.org",
                        "updated_at": pd.Timestamp("2026-11-27T12:00:00Z"),
                    }
                )
    for dirname, stage_fields in fields.items():
        keep = [r for r in rows[dirname] if r["clip_id"] not in skip.get(dirname, set())]
        if dirname in skip and not keep:
            continue
        Ledger(workdir / dirname / "ledger", stage_fields).commit(keep)
    if reviews or "05-review" not in skip:
        keep = [r for r in reviews if r["clip_id"] not in skip.get("05-review", set())]
        if keep:
            with atomic_path(workdir / "05-review" / "reviews.parquet") as tmp:
                pd.DataFrame(keep).to_parquet(tmp, index=False)
    return ContractRun(workdir, ctx.config, clips)
