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
    reviewed = tables.verdicts()
    for split in [s for s in HF_SPLITS if s in set(clips["split"])]:
        current = set(clips.index[clips["split"] == split])
        avail: dict[str, Any] = {"clips": len(current)}
        through: list[type[Stage]] = [DOWNLOAD, KEYFRAMES, CAPTION]
        for stage in (DOWNLOAD, KEYFRAMES, CAPTION):
            current = _made_ok(tables, stage, current, split, avail, problems)
        avail["with_captions"] = len(current)
        merged = _is_merged(tables, split, current)
        if merged:
            current = _made_ok(tables, MERGE, current, split, avail, problems)
            through.append(MERGE)
        if split == "test":
            through.append(REVIEW)
            unreviewed = current - set(reviewed)
            if unreviewed and not allow_unreviewed:
                problems.append(
                    _missing_line(REVIEW, len(unreviewed), len(current), split)
                    + " (pull the reviews, or include raw merges flagged with "
                    "--set export.allow_unreviewed=true)"
                )
        plan.stale |= _stale(tables, through, current, split, include_stale, problems)
        if merged:
            plan.merged_splits.append(split)
            current, avail["review"] = _by_review(current, reviewed, allow_unreviewed)
            if split == "test":
                plan.review = avail["review"]
        avail["exported"] = len(current)
        plan.availability[split] = avail
        plan.ids[split] = sorted(current)
    plan.stale &= {c for ids in plan.ids.values() for c in ids}
    if problems:
        raise AbortRun("upstream stages are not done:\n  " + "\n  ".join(problems))
    return plan


def _made_ok(
    tables: RunTables,
    stage: type[Stage],
    ids: set[str],
    split: str,
    avail: dict[str, Any],
    problems: list[str],
) -> set[str]:
    """The clips of ``ids`` that ``stage`` made ok. Those it has no row for yet are a problem; its
    failures among ``ids`` are counted by reason in ``avail``."""
    n = _missing(tables, stage, ids)
    if n:
        problems.append(_missing_line(stage, n, len(ids), split))
    avail[f"failed_{stage.name}"] = tables.failed(stage, ids)
    return ids & tables.ok_ids(stage)


def _is_merged(tables: RunTables, split: str, captioned: set[str]) -> bool:
    """test is always a merged split; val is one when the merge stage ran on it (then every val
    clip needs its merge)."""
    merges = tables.stages[MERGE]
    return split == "test" or (split == "val" and merges is not None and bool(captioned & set(merges.index)))


def _stale(
    tables: RunTables,
    through: list[type[Stage]],
    ids: set[str],
    split: str,
    include_stale: bool,
    problems: list[str],
) -> set[str]:
    """The clips of ``ids`` with a stale row in a stage they went through (a problem each stage,
    unless ``include_stale``)."""
    out: set[str] = set()
    for stage in through:
        stale = ids & tables.stale.get(stage, set())
        if stale and not include_stale:
            problems.append(
                f"stage {stage.dirname()}: {len(stale)} of {len(ids)} {split} item(s) are stale "
                "(made with other settings or from older upstream results): run "
                f"`avcaps run {stage.number}` (or export them flagged: --set export.include_stale=true)"
            )
        out |= stale
    return out


def _by_review(
    ids: set[str], reviewed: dict[str, str], allow_unreviewed: bool
) -> tuple[set[str], dict[str, int]]:
    """The clips of a merged split that are exported (kept by their review, or unreviewed and
    ``allow_unreviewed``), and the count of each verdict among ``ids``."""
    verdicts = {cid: reviewed.get(cid, UNREVIEWED) for cid in ids}
    counts = {v: sum(1 for x in verdicts.values() if x == v) for v in (*VERDICTS, UNREVIEWED)}
    keep = {c for c, v in verdicts.items() if v in KEEP or (v == UNREVIEWED and allow_unreviewed)}
    return keep, counts


def _missing_line(stage: type[Stage], n: int, of: int, split: str) -> str:
    hint = f"run `avcaps run {stage.number}`" if stage is not REVIEW else "run the review stage and pull"
    return f"stage {stage.dirname()}: {n} of {of} {split} item(s) have no result yet ({hint})"
