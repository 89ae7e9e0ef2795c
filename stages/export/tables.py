"""Stage 6, reading the run folder: the clip table, the ledgers of stages 1-5 and the reviews.

The upstream stages are named by class: their ledgers are read with their declared schemas (the
column contract) from their folders (``dirname()``); no folder name is spelled out here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import AbortRun
from pipeline.selection import stage_ledger, stale_ids, to_python
from pipeline.stage import RunContext, Stage
from stages.caption.stage import CaptionStage
from stages.download.stage import DownloadStage
from stages.keyframes import KeyframesStage
from stages.manifest import ManifestStage
from stages.merge.stage import MergeStage
from stages.review.pull import REVIEWS_FILE, outdated_annotations
from stages.review.push import ReviewStage

if TYPE_CHECKING:
    import pandas as pd

DOWNLOAD, KEYFRAMES, CAPTION, MERGE, REVIEW = (
    DownloadStage,
    KeyframesStage,
    CaptionStage,
    MergeStage,
    ReviewStage,
)
ACCEPTED = ("accept", "edited")
VERDICTS = (*ACCEPTED, "rejected")


def _latest(stage: type[Stage], workdir: Path) -> pd.DataFrame | None:
    ledger = stage_ledger(stage, workdir)
    return ledger.latest() if ledger.exists() else None


@dataclass
class RunTables:
    """The run folder's state, one DataFrame per stage indexed by ``clip_id`` (None: never ran)."""

    clips: pd.DataFrame
    stages: dict[type[Stage], pd.DataFrame | None]
    reviews: pd.DataFrame | None
    stale: dict[type[Stage], set[str]] = field(default_factory=dict)  # ok rows made from other inputs
    outdated_reviews: int = 0
    outdated_annotations: frozenset[int] = frozenset()

    @classmethod
    def read(cls, workdir: Path, ctx: RunContext | None = None) -> RunTables:
        """The run folder's ledgers; with ``ctx`` (whose settings say what is current), which of
        their ok rows are stale."""
        clips = _latest(ManifestStage, workdir)
        if clips is None:
            raise AbortRun(
                f"stage {ManifestStage.dirname()} has not run yet in {workdir}: "
                f"run `avcaps run {ManifestStage.number}` first"
            )
        clips = clips[clips["status"] == "ok"]
        stages = {s: _latest(s, workdir) for s in (DOWNLOAD, KEYFRAMES, CAPTION, MERGE, REVIEW)}
        stale = {s: stale_ids(s, ctx) for s in stages} if ctx is not None else {}
        tables = cls(clips, stages, read_reviews(workdir / REVIEW.dirname() / REVIEWS_FILE), stale)
        tables.outdated_annotations = outdated_annotations(workdir)
        if tables.reviews is not None:
            # A review of an earlier merge of its clip (the merge was redone since) is no review of
            # the current merge: it is left out, and counted.
            current = current_reviews(tables)
            tables.outdated_reviews = len(tables.reviews) - len(current)
            tables.reviews = tables.reviews.loc[[c for c in tables.reviews.index if c in current]]
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


def read_reviews(path: Path) -> pd.DataFrame | None:
    """``reviews.parquet``: one row per reviewed clip (the latest by ``updated_at`` if repeated)."""
    import pandas as pd

    if not path.exists():
        return None
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # a corrupt file must name itself
        raise AbortRun(f"{path}: cannot read the reviews ({type(exc).__name__}: {exc})") from exc
    missing = [c for c in ("clip_id", "verdict", "final_captions") if c not in df.columns]
    if missing:
        raise AbortRun(f"{path}: missing column(s) {', '.join(missing)}")
    bad = df[~df["verdict"].isin(VERDICTS)]
    if len(bad):
        row = bad.iloc[0]
        raise AbortRun(
            f"{path}: clip {row['clip_id']}: unknown verdict {row['verdict']!r} "
            f"(expected one of {', '.join(VERDICTS)}); {len(bad)} such row(s)"
        )
    order = ["clip_id", "updated_at"] if "updated_at" in df.columns else ["clip_id"]
    df = df.sort_values(order, kind="stable").drop_duplicates("clip_id", keep="last")
    return df.set_index("clip_id", drop=False)


def current_reviews(tables: RunTables) -> dict[str, str]:
    """Verdict per clip, for reviews of the clip's current merge only (a review of an earlier merge,
    before the merge was redone, is not a review of this one)."""
    reviews, merges = tables.reviews, tables.stages[MERGE]
    if reviews is None:
        return {}
    out = {}
    for cid, row in zip(reviews.index, reviews.to_dict("records"), strict=True):
        if to_python(row.get("ls_annotation_id")) in tables.outdated_annotations:
            continue  # made before its task was updated with a redone merge
        if merges is not None and cid in merges.index and "merged_captions" in row:
            reviewed = [str(c) for c in (to_python(row["merged_captions"]) or [])]
            if reviewed and reviewed != [
                str(c) for c in (to_python(merges.at[cid, "merged_captions"]) or [])
            ]:
                continue
        out[str(cid)] = str(row["verdict"])
    return out
