"""Ledger histories as a real run leaves them, for the stand-in run folders of the tests.

A real run never leaves one ok row per clip: a download answered 429 and succeeded on its next
attempt, a caption ran out of GPU memory once, a keyframe extraction failed and was re-queued with
``--retry-failed``, a clip is gone from YouTube, a merge failed the quality gate. This writes such
histories with each stage's own output schema (:func:`pipeline.runner.stage_ledger`: imported,
never copied) through the real ledger, one commit per pass of the runner, with ``seq`` counting
per clip as the runner counts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.stage import Stage, Status

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


def commit_histories(stage: type[Stage], workdir: Path, histories: list[list[dict[str, Any]]]) -> None:
    """Commit the clips' histories as the runner does: one part per pass (every clip's first row,
    then the second rows of those tried again, ...), each row with the ``seq`` it was given."""
    from pipeline.runner import stage_ledger

    ledger = stage_ledger(stage, workdir)
    for k in range(max((len(h) for h in histories), default=0)):
        ledger.commit([h[k] for h in histories if len(h) > k])
