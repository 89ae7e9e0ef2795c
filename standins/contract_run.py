"""A run folder whose stages 1-5 are written as a real run leaves them, for the export tests.

Stage 0 runs for real (the real AudioCaps CSVs, a seeded sample per split). The ledgers of stages
1-4 are written with each stage's own output schema (imported, never copied) through the real
ledger, with the histories a real run leaves (:mod:`standins.run_history`): clips that end failed
at some stage (``failures``) and, in every run, clips that failed a first try and then succeeded
(:data:`RETRY_CYCLE`). The reviews are written as ``05-review/reviews.parquet``, with real JPEG
keyframes and WAV audio in ``media/``. Export and publish are tested on every case this way
(failures, retries, empty visual captions, acronyms, reviews of each verdict).

Clips are named by their place in their split, ``("test", 0)`` being the first test clip in
clip-id order, so a test can say which clip fails before the sample is drawn.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.stage import Stage
from stages.download.stage import DownloadStage
from stages.keyframes import KeyframesStage
from stages.merge.stage import MergeStage
from stages.review.push import ReviewStage
from standins.run_history import (
    UPSTREAM,
    Failure,
    clip_histories,
    commit_histories,
    deterministic_scores,
    ok_outputs,
)

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
# The j-th clip of each split failed a first try in this stage, then succeeded (if it does not
# fail for good there): every run has a retried clip in every stage it has enough clips for.
RETRY_CYCLE: tuple[type[Stage] | None, ...] = (None, *UPSTREAM)
Pick = tuple[str, int]  # (split, j): the j-th clip of the split in clip-id order
# What a run without ``failures`` holds: the first clip of each split fails for good.
DEFAULT_FAILURES: dict[Pick, Failure] = {
    ("train", 0): Failure(DownloadStage, "private"),
    ("val", 0): Failure(KeyframesStage, "corrupt_video"),
    ("test", 0): Failure(DownloadStage, "removed"),
}


@dataclass
class ContractRun:
    workdir: Path
    config: Any
    clips: dict[str, dict[str, Any]] = field(default_factory=dict)  # clip_id -> manifest row
    failed: dict[str, Failure] = field(default_factory=dict)  # clip_id -> where it ended failed
    retried: dict[str, type[Stage]] = field(default_factory=dict)  # clip_id -> stage that retried it

    def ids(self, split: str) -> list[str]:
        """The split's clip ids in clip-id order (``ids(split)[j]`` is the clip ``(split, j)``)."""
        return sorted(c for c, row in self.clips.items() if row["split"] == split)


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


def _write_media(workdir: Path, cid: str, i: int) -> None:
    """The keyframes and audio stage 2 writes for a clip it extracts."""
    from pipeline.io import atomic_path

    files = {f"media/frames/{cid}/{k}.jpg": _jpeg(i + k) for k in range(3)}
    files[f"media/audio/{cid}.wav"] = _wav(i)
    for rel, data in files.items():
        with atomic_path(workdir / rel) as tmp:
            tmp.write_bytes(data)


def _outputs(cid: str, clip: dict[str, Any], i: int, scored: bool) -> dict[type[Stage], dict[str, Any]]:
    visual = VISUAL_CAPTIONS[i % len(VISUAL_CAPTIONS)]
    merged = [f"{a} while {visual or 'nothing is seen'}" for a in clip["audio_captions"]]
    n_audio = len(clip["audio_captions"])
    return ok_outputs(
        cid,
        clip["youtube_id"],
        [f"media/frames/{cid}/{k}.jpg" for k in range(3)],
        f"media/audio/{cid}.wav",
        visual,
        merged,
        flag_silent=i % 5 == 0,
        scores=deterministic_scores(i, 3, n_audio, len(merged)) if scored else None,
    )


def build_contract_run(
    workdir: Path,
    *,
    config: Path = FULL,
    sample_per_split: int | None = 6,
    failures: Mapping[Pick, Failure] | None = None,
    skip: Mapping[type[Stage], set[Pick]] | None = None,
    merge_splits: tuple[str, ...] = ("test",),
    verdicts: Mapping[Pick, str | None] | None = None,
    review_default: str | None = "accept",
    overrides: list[str] | None = None,
    scores: bool = False,
    unscored: set[Pick] | None = None,
) -> ContractRun:
    """Write stages 1-5 for the sampled clips, as a real run leaves them.

    ``config``: the run manifest whose stage 0 runs (``sample_per_split`` None keeps its own
    sampling); ``failures``: clip -> how it ends failed (:data:`DEFAULT_FAILURES` when None; the
    later stages have no row for it); ``skip``: stage -> clips with no row at all (a stage not done
    yet; ``ReviewStage``: no review); ``verdicts``: clip -> verdict for merged clips (None: no
    review row), the others get ``review_default``; ``scores``: stages 3 and 4 write their score
    columns (:func:`standins.run_history.deterministic_scores`), except for the ``unscored`` clips
    (rows from before scoring existed). Clips are ``(split, j)`` picks; a pick beyond its split's
    sample is ignored.
    """
    import pandas as pd

    from pipeline.io import atomic_path
    from pipeline.ledger import Ledger

    ctx = build_manifest(workdir, sample_per_split, overrides, config)
    clips_df = Ledger(workdir / "00-manifest" / "ledger").latest()
    run = ContractRun(
        workdir,
        ctx.config,
        {cid: row for cid, row in zip(clips_df.index, clips_df.to_dict("records"), strict=True)},
    )

    def resolve(pick: Pick) -> str | None:
        split, j = pick
        ids = run.ids(split)
        return ids[j] if j < len(ids) else None

    for pick, failure in (DEFAULT_FAILURES if failures is None else failures).items():
        if (cid := resolve(pick)) is not None:
            run.failed[cid] = failure
    skipped = {stage: {resolve(p) for p in picks} for stage, picks in (skip or {}).items()}
    chosen = {resolve(p): v for p, v in (verdicts or {}).items()}
    no_scores = {resolve(p) for p in (unscored or set())}
    position = {
        cid: j for split in {r["split"] for r in run.clips.values()} for j, cid in enumerate(run.ids(split))
    }
    max_attempts = {stage: getattr(ctx.config, stage.name).max_attempts for stage in UPSTREAM}
    histories = []
    reviews = []
    for i, cid in enumerate(sorted(run.clips)):
        clip = run.clips[cid]
        outputs = _outputs(cid, clip, i, scores and cid not in no_scores)
        stages = [s for s in UPSTREAM if s is not MergeStage or clip["split"] in merge_splits]
        # A stage not done yet for this clip: no row there, nor in any later stage.
        done = next((k for k, s in enumerate(stages) if cid in skipped.get(s, set())), len(stages))
        retried_in = RETRY_CYCLE[position[cid] % len(RETRY_CYCLE)]
        per_stage = clip_histories(
            cid,
            {s: outputs[s] for s in stages[:done]},
            failure=run.failed.get(cid),
            retried_in=retried_in,
            max_attempts=max_attempts,
        )
        histories.append(per_stage)
        if retried_in in per_stage:
            run.retried[cid] = retried_in
        if per_stage.get(KeyframesStage, [{}])[-1].get("status") == "ok":
            _write_media(workdir, cid, i)
        verdict = chosen.get(cid, review_default)
        merged_ok = per_stage.get(MergeStage, [{}])[-1].get("status") == "ok"
        if merged_ok and verdict is not None and cid not in skipped.get(ReviewStage, set()):
            merged = outputs[MergeStage]["merged_captions"]
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
    commit_histories(workdir, histories)
    if reviews:
        with atomic_path(workdir / ReviewStage.dirname() / "reviews.parquet") as tmp:
            pd.DataFrame(reviews).to_parquet(tmp, index=False)
    return run
