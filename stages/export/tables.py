"""Stage 6, reading the run folder: the clip table, the ledgers of stages 1-5 and the reviews.

The upstream stages are named by class: their ledgers are read with their declared schemas (the
column contract) from their folders (``dirname()``); no folder name is spelled out here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import AbortRun
from pipeline.selection import stage_ledger, stale_ids
from pipeline.stage import RunContext, Stage
from stages.caption.stage import CaptionStage
from stages.download.stage import DownloadStage
from stages.keyframes import KeyframesStage
from stages.manifest import ManifestStage
from stages.merge.stage import MergeStage
from stages.review.current import current_reviews, latest_reviews
from stages.review.pull import REVIEWS_FILE, outdated_annotations
from stages.review.push import ReviewStage

if TYPE_CHECKING:
    import pandas as pd

# The stages the export reads, typed as stages (a tuple of five classes types each apart).
DOWNLOAD: type[Stage] = DownloadStage
KEYFRAMES: type[Stage] = KeyframesStage
CAPTION: type[Stage] = CaptionStage
MERGE: type[Stage] = MergeStage
REVIEW: type[Stage] = ReviewStage


def _latest(stage: type[Stage], workdir: Path) -> pd.DataFrame | None:
    ledger = stage_ledger(stage, workdir)
    return ledger.latest() if ledger.exists() else None


@dataclass
class RunTables:
    """The run folder's state, one DataFrame per stage indexed by ``clip_id`` (None: never ran).

    ``reviews``: the reviews of the clips' current merges, one per clip, indexed by ``clip_id``
    (:func:`stages.review.current.current_reviews`; None: none pulled); ``outdated_reviews``: how
    many reviews of earlier merges were left out.
    """

    clips: pd.DataFrame
    stages: dict[type[Stage], pd.DataFrame | None]
    reviews: pd.DataFrame | None
    stale: dict[type[Stage], set[str]] = field(default_factory=dict)  # ok rows made from other inputs
    outdated_reviews: int = 0

    @classmethod
    def read(cls, workdir: Path, ctx: RunContext | None = None) -> RunTables:
        """The run folder's ledgers and current reviews; with ``ctx`` (whose settings say what is
        current), which of their ok rows are stale."""
        clips = _latest(ManifestStage, workdir)
        if clips is None:
            raise AbortRun(
                f"stage {ManifestStage.dirname()} has not run yet in {workdir}: "
                f"run `avcaps run {ManifestStage.number}` first"
            )
        clips = clips[clips["status"] == "ok"]
        stages = {s: _latest(s, workdir) for s in (DOWNLOAD, KEYFRAMES, CAPTION, MERGE, REVIEW)}
        stale = {s: stale_ids(s, ctx) for s in stages} if ctx is not None else {}
        reviews = latest_reviews(workdir / REVIEW.dirname() / REVIEWS_FILE)
        outdated = outdated_annotations(workdir)
        tables = cls(clips, stages, reviews, stale)
        if reviews is not None:
            # A review of an earlier merge of its clip (the merge was redone since) is no review of
            # the current merge: it is left out, and counted.
            tables.reviews = current_reviews(reviews, stages[MERGE], outdated)
            tables.outdated_reviews = len(reviews) - len(tables.reviews)
        return tables

    def ok_ids(self, stage: type[Stage]) -> set[str]:
        df = self.stages[stage]
        return set() if df is None else set(df.index[df["status"] == "ok"])

    def failed(self, stage: type[Stage], ids: set[str]) -> dict[str, int]:
        """Failure counts by reason among ``ids`` for one stage."""
        df = self.stages[stage]
        if df is None:
            return {}
        sub = df[df.index.isin(ids) & (df["status"] != "ok")]
        reasons = sub["reason"].fillna("").replace("", "unknown")
        return {str(k): int(v) for k, v in sorted(reasons.value_counts().items())}

    def verdicts(self) -> dict[str, str]:
        """Verdict per reviewed clip (current reviews only: see ``reviews``)."""
        if self.reviews is None:
            return {}
        return {str(c): str(v) for c, v in zip(self.reviews.index, self.reviews["verdict"], strict=True)}
