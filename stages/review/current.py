"""The pulled reviews as the review pull and the export take them: current ones only, one per clip.

A clip's merge can be redone after it was reviewed (stage 4 reran with other settings); the push
then updates the clip's task and records the annotations made on its earlier version
(``ls_outdated_annotations`` in stage 5's ledger, read by
:func:`stages.review.pull.outdated_annotations`). A review is a review of the clip's current merge
(:func:`is_current`) unless

- its annotation is one of those (it was made before its task was updated), or
- what it reviewed (``merged_captions``, as the task showed it) is not the clip's merge now.

A review that recorded no merge (a file from before the column, or none recorded) is judged by the
first rule alone. The pull keeps an earlier review the server no longer gives only when it is
current; the export takes only current reviews as references (:func:`current_reviews`), from the
checked reviews file (:func:`latest_reviews`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import AbortRun
from pipeline.selection import to_python
from stages.review.policy import VERDICTS

if TYPE_CHECKING:
    import pandas as pd


def is_current(review: Mapping[str, Any], merge: Sequence[Any] | None, outdated: Collection[int]) -> bool:
    """Whether ``review`` (a row of ``reviews.parquet``) reviews the clip's current merge:
    ``merge`` is the clip's merged captions now (None: not known, only ``outdated`` decides),
    ``outdated`` the ids of the annotations made before their task was updated."""
    if to_python(review.get("ls_annotation_id")) in outdated:
        return False
    reviewed = [str(c) for c in (to_python(review.get("merged_captions")) or [])]
    return merge is None or not reviewed or reviewed == [str(c) for c in merge]


def current_reviews(
    reviews: pd.DataFrame, merges: pd.DataFrame | None, outdated: Collection[int]
) -> pd.DataFrame:
    """The rows of ``reviews`` (indexed by ``clip_id``) that review their clip's current merge,
    in their order; ``merges``: stage 4's latest rows indexed by ``clip_id`` (None: it never ran)."""
    import numpy as np

    def merge_of(cid: Any) -> list[Any] | None:
        if merges is None or cid not in merges.index:
            return None
        return to_python(merges.at[cid, "merged_captions"]) or []

    keep = [
        is_current(row, merge_of(cid), outdated)
        for cid, row in zip(reviews.index, reviews.to_dict("records"), strict=True)
    ]
    return reviews[np.array(keep, dtype=bool)]


def latest_reviews(path: Path) -> pd.DataFrame | None:
    """``reviews.parquet`` checked: one row per reviewed clip (the latest by ``updated_at`` if
    repeated), indexed by ``clip_id``; None when there is no such file. A file that cannot be read,
    lacks a column the references need or holds an unknown verdict raises :class:`AbortRun` naming
    it (the pull's own reading, :func:`stages.review.pull.read_reviews`, takes every row as it is)."""
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
