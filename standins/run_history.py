"""Ledger histories as a real run leaves them, for the stand-in run folders of the tests.

A real run never leaves one ok row per clip: a download answered 429 and succeeded on its next
attempt, a caption ran out of GPU memory once, a keyframe extraction failed and was re-queued with
``--retry-failed``, a clip is gone from YouTube, a merge failed the quality gate. This writes such
histories with each stage's own output schema (:func:`pipeline.selection.stage_ledger`: imported,
never copied) through the real ledger, one commit per pass of the runner, with ``seq`` counting
per clip as the runner counts it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.stage import Stage, Status
from stages.caption.stage import CaptionStage
from stages.download.stage import DownloadStage, video_path
from stages.keyframes import KeyframesStage
from stages.merge.stage import MergeStage

UPSTREAM: tuple[type[Stage], ...] = (DownloadStage, KeyframesStage, CaptionStage, MergeStage)

# How the first try of a retried clip failed, per stage: answers the stage really gives.
FIRST_TRY: dict[str, tuple[Status, str, str]] = {
    "download": ("failed_transient", "http_429", "HTTP Error 429: Too Many Requests"),
    # Stage 2 fails only permanently; `--retry-failed` re-queues the clip, its attempts start over.
    "keyframes": ("failed_permanent", "missing_video", "media/video/<clip>.mp4 is not in the run folder"),
    "caption": ("failed_transient", "cuda_oom", "CUDA out of memory at 1 image per call"),
    "merge": ("failed_transient", "llm_timeout", "http://127.0.0.1:8000/v1: timeout (after 3 tries)"),
}


@dataclass(frozen=True)
class Failure:
    """How a clip ends in one stage when it does not end ok (later stages never see it)."""

    stage: type[Stage]
    reason: str
    # failed_transient: it failed transiently on every one of the stage's max_attempts
    status: Status = "failed_permanent"


def clip_history(
    stage: type[Stage],
    clip_id: str,
    outputs: dict[str, Any],
    *,
    failure: Failure | None = None,
    retried: bool = False,
    max_attempts: int = 3,
    failed_outputs: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The rows a real run commits for one clip in ``stage``, oldest first.

    ``retried``: the first try failed as :data:`FIRST_TRY` says, then the clip was tried again;
    ``failure``: how it ends if not ok (``outputs`` are written only by an ok row);
    ``failed_outputs``: columns a failed row carries anyway (the merge keeps its raw answers).
    """
    rows: list[dict[str, Any]] = []

    def add(status: Status, reason: str = "", message: str = "", **cols: Any) -> int:
        # The runner retries a transient failure by itself (attempts count on); anything else is
        # redone only by --retry-failed or --force, which start the count over.
        last = rows[-1] if rows else None
        attempt = int(last["attempts"]) + 1 if last and last["status"] == "failed_transient" else 1
        row = {"clip_id": clip_id, "status": status, "reason": reason, "message": message}
        rows.append(row | {"attempts": attempt, "seq": len(rows) + 1, **cols})
        return attempt

    failed_cols = failed_outputs or {}
    if retried:
        status, reason, message = FIRST_TRY[stage.name]
        add(status, reason, message.replace("<clip>", clip_id), **failed_cols)
    if failure is None:
        add("ok", **outputs)
    elif failure.status == "failed_transient":
        attempt = 0
        while attempt < max_attempts:
            attempt = add("failed_transient", failure.reason, f"{failure.reason} (stand-in)", **failed_cols)
    else:
        add(failure.status, failure.reason, f"{failure.reason} (stand-in)", **failed_cols)
    return rows


def ok_outputs(
    clip_id: str,
    youtube_id: str,
    frame_paths: list[str],
    audio_path: str,
    visual_caption: str,
    merged_captions: list[str],
    flag_silent: bool = False,
    scores: Mapping[type[Stage], dict[str, Any]] | None = None,
) -> dict[type[Stage], dict[str, Any]]:
    """A clip's ok outputs in stages 1-4: every column of each stage's schema, plausible values.

    ``scores``: the quality-signal columns (``stages/scores.py``) per stage, as a run with scoring
    on writes them (:func:`deterministic_scores`); without them those columns are null, as in a run
    with scoring off or rows from before scoring existed."""
    n = len(frame_paths)
    out = {
        DownloadStage: {
            "video_path": video_path(Path("media"), clip_id).as_posix(),
            "video_duration_s": 10.0,
            "audio_duration_s": 10.0,
            "source_duration_s": 30.0,
            "video_width": 640,
            "video_height": 360,
            "file_bytes": 412_345,
            "source_url": f"https://www.youtube.com/watch?v={youtube_id}",
        },
        KeyframesStage: {
            "frame_paths": frame_paths,
            "frame_times_s": [(k + 0.5) * 10 / n for k in range(n)],
            "middle_frame": n // 2,
            "audio_path": audio_path,
            "audio_samples": 160_000,
            "audio_sample_rate": 16_000,
            "audio_padded_s": 0.0,
            "audio_dbfs": -20.0,
            "frame_luma_mean": [100.0] * n,
            "frame_luma_std": [30.0] * n,
            "flag_black_frame": False,
            "flag_flat_frame": False,
            "flag_silent": flag_silent,
            "flag_padded": False,
        },
        CaptionStage: {
            "visual_caption": visual_caption,
            "frame_captions": [visual_caption] * n,
            "caption_model": "standin/tiny-blip2",
            "caption_revision": "r0",
            "caption_dtype": "float32",
            "caption_settings_hash": "abc123",
            "caption_versions": '{"transformers": "5.2x"}',
            "caption_gen_batch": 64,
        },
        MergeStage: {
            "merged_captions": merged_captions,
            "merge_mode": "per_caption",
            "merge_raw": merged_captions,
            "merge_prompt_hash": "p0h4sh",
            "merge_backend": "transformers",
            "merge_model": "standin/tiny-gpt-oss",
            "merge_checks": "{}",
        },
    }
    for stage, cols in (scores or {}).items():
        out[stage].update(cols)
    return out


def deterministic_scores(
    i: int, n_frames: int, n_audio: int, n_merged: int
) -> dict[type[Stage], dict[str, Any]]:
    """Score columns of clip number ``i`` as stages 3 and 4 write them: cosines in the range real
    CLIP/CLAP give (about 0.1-0.4), spread over clips by ``i`` so the ranks are known in advance
    (the ``k``-th caption of clip ``i`` scores ``base(i) + 0.001 k``; base rises with ``(7 i) mod 23``)."""
    import json

    def base(salt: int) -> float:
        return round(0.10 + 0.01 * ((7 * i + salt) % 23), 4)

    return {
        CaptionStage: {
            "visual_clip_score": [base(0) + 0.001 * k for k in range(n_frames)],
            "clip_model": "standin/tiny-clip@r0",
        },
        MergeStage: {
            "merge_clap_score": [base(1) + 0.001 * k for k in range(n_merged)],
            "merge_clip_score": [base(5) + 0.001 * k for k in range(n_merged)],
            "source_audio_clap_score": [base(2) + 0.001 * k for k in range(n_audio)],
            "source_audio_clip_score": [base(3) + 0.001 * k for k in range(n_audio)],
            "source_visual_clap_score": base(4),
            "source_visual_clip_score": base(6),
            "merge_score_tries": 1,
            "score_models": json.dumps({"clap": "standin/tiny-clap@r0", "clip": "standin/tiny-clip@r0"}),
        },
    }


def clip_histories(
    clip_id: str,
    outputs: Mapping[type[Stage], dict[str, Any]],
    *,
    failure: Failure | None = None,
    retried_in: type[Stage] | None = None,
    max_attempts: Mapping[type[Stage], int] | None = None,
) -> dict[type[Stage], list[dict[str, Any]]]:
    """One clip's rows in the stages of ``outputs`` (in pipeline order), up to the stage where it
    ends failed: a clip that fails is never handed to the next stage."""
    out: dict[type[Stage], list[dict[str, Any]]] = {}
    for stage, ok in outputs.items():
        rows = clip_history(
            stage,
            clip_id,
            ok,
            failure=failure if failure is not None and failure.stage is stage else None,
            retried=retried_in is stage,
            max_attempts=(max_attempts or {}).get(stage, 3),
            # A failed merge row keeps its raw answers and checks (merged_captions: None each).
            failed_outputs={**ok, "merged_captions": [None] * len(ok["merged_captions"])}
            if stage is MergeStage
            else None,
        )
        out[stage] = rows
        if rows[-1]["status"] != "ok":
            break
    return out


def commit_histories(workdir: Path, clips: Iterable[Mapping[type[Stage], list[dict[str, Any]]]]) -> None:
    """Commit the clips' histories as the runner does: per stage, one part per pass (every clip's
    first row, then the second rows of the clips tried again, ...), each row with its ``seq``."""
    from pipeline.selection import stage_ledger

    by_stage: dict[type[Stage], list[list[dict[str, Any]]]] = {}
    for per_stage in clips:
        for stage, rows in per_stage.items():
            by_stage.setdefault(stage, []).append(rows)
    for stage, histories in by_stage.items():
        ledger = stage_ledger(stage, workdir)
        for k in range(max(len(h) for h in histories)):
            ledger.commit([h[k] for h in histories if len(h) > k])
