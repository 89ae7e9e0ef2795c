"""Stage 6, planning: which clips are exported, per split, and why the others are not."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import AbortRun
from pipeline.stage import Stage
from stages.export.tables import CAPTION, DOWNLOAD, KEYFRAMES, MERGE, REVIEW, RunTables
from stages.review.policy import KEEP, VERDICTS

HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}
UNREVIEWED = "unreviewed"


@dataclass
class Plan:
    """Which clips are exported and why the others are not."""

    ids: dict[str, list[str]] = field(default_factory=dict)  # split -> exported clip ids (sorted)
    availability: dict[str, dict[str, Any]] = field(default_factory=dict)
    review: dict[str, int] = field(default_factory=dict)
    merged_splits: list[str] = field(default_factory=list)
    stale: set[str] = field(default_factory=set)  # exported anyway (export.include_stale), flagged


def _missing(tables: RunTables, stage: type[Stage], expected: set[str]) -> int:
    df = tables.stages[stage]
    return len(expected) if df is None else len(expected - set(df.index))


def plan_export(tables: RunTables, allow_unreviewed: bool, include_stale: bool = False) -> Plan:
    """Check that every upstream stage is done, and pick the clips to export per split.

    A stage that has not answered for an item it should have raises :class:`AbortRun` naming the
    stage and the count; failed items are excluded and counted by reason (the card reports them).
    A clip whose row in a stage it goes through is stale (made with other settings or from other
    upstream rows) stops the export the same way, unless ``include_stale`` (it is then flagged). The
    reviews are the current ones (``tables.reviews``): a review made on an earlier merge of its clip
    is no review of the current one.
    """
    clips = tables.clips
    problems: list[str] = []
    plan = Plan()
    splits = [s for s in HF_SPLITS if s in set(clips["split"])]
    merged = tables.ok_ids(MERGE)
    reviewed = tables.verdicts()
    for split in splits:
        ids = set(clips.index[clips["split"] == split])
        avail: dict[str, Any] = {"clips": len(ids)}
        current = ids
        through = [DOWNLOAD, KEYFRAMES, CAPTION]
        for stage in (DOWNLOAD, KEYFRAMES, CAPTION):
            n = _missing(tables, stage, current)
            if n:
                problems.append(_missing_line(stage, n, len(current), split))
            avail[f"failed_{stage.name}"] = tables.failed(stage, current)
            current = current & tables.ok_ids(stage)
        avail["with_captions"] = len(current)
        if split == "test":
            n = _missing(tables, MERGE, current)
            if n:
                problems.append(_missing_line(MERGE, n, len(current), split))
            avail["failed_merge"] = tables.failed(MERGE, current)
            current = current & merged
            through += [MERGE, REVIEW]
            unreviewed = current - set(reviewed)
            if unreviewed and not allow_unreviewed:
                problems.append(
                    _missing_line(REVIEW, len(unreviewed), len(current), split)
                    + " (pull the reviews, or include raw merges flagged with "
                    "--set export.allow_unreviewed=true)"
                )
        merge_df = tables.stages[MERGE]
        val_merged = split == "val" and merge_df is not None and bool(current & set(merge_df.index))
        if val_merged:
            # The merge stage ran on val: val is a merged split, and every val clip needs its merge.
            n = _missing(tables, MERGE, current)
            if n:
                problems.append(_missing_line(MERGE, n, len(current), split))
            avail["failed_merge"] = tables.failed(MERGE, current)
            current = current & merged
            through.append(MERGE)
        for stage in through:
            stale = current & tables.stale.get(stage, set())
            if stale and not include_stale:
                problems.append(
                    f"stage {stage.dirname()}: {len(stale)} of {len(current)} {split} item(s) are stale "
                    "(made with other settings or from older upstream results): run "
                    f"`avcaps run {stage.number}` (or export them flagged: --set export.include_stale=true)"
                )
            plan.stale |= stale
        if split == "test" or val_merged:
            plan.merged_splits.append(split)
            verdicts = {cid: reviewed.get(cid, UNREVIEWED) for cid in current}
            counts = {v: sum(1 for x in verdicts.values() if x == v) for v in (*VERDICTS, UNREVIEWED)}
            if split == "test":
                plan.review = counts
            avail["review"] = counts
            keep = {c for c, v in verdicts.items() if v in KEEP or (v == UNREVIEWED and allow_unreviewed)}
            current = keep
        avail["exported"] = len(current)
        plan.availability[split] = avail
        plan.ids[split] = sorted(current)
    plan.stale &= {c for ids in plan.ids.values() for c in ids}
    if problems:
        raise AbortRun("upstream stages are not done:\n  " + "\n  ".join(problems))
    return plan


def _missing_line(stage: type[Stage], n: int, of: int, split: str) -> str:
    hint = f"run `avcaps run {stage.number}`" if stage is not REVIEW else "run the review stage and pull"
    return f"stage {stage.dirname()}: {n} of {of} {split} item(s) have no result yet ({hint})"
