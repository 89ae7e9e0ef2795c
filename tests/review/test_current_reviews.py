"""Which pulled reviews count (stages/review/current.py): one rule for the pull and the export."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pipeline.errors import AbortRun
from stages.review.current import current_reviews, is_current, latest_reviews
from stages.review.labeling import LABEL_CONFIG
from stages.review.policy import VERDICTS

MERGE = ["a dog barks as a car passes.", "a man speaks near a road."]


def test_the_label_config_offers_the_verdicts_the_policy_knows() -> None:
    # VERDICTS is defined once (stages.review.policy); the annotators' choices must be the same.
    assert tuple(re.findall(r'<Choice value="([^"]+)"', LABEL_CONFIG)) == VERDICTS


@pytest.mark.parametrize(
    ("review", "merge", "current"),
    [
        ({"merged_captions": MERGE, "ls_annotation_id": 7}, MERGE, True),
        ({"merged_captions": MERGE[:1], "ls_annotation_id": 7}, MERGE, False),  # of an earlier merge
        ({"merged_captions": MERGE, "ls_annotation_id": 3}, MERGE, False),  # before its task's update
        ({"merged_captions": MERGE, "ls_annotation_id": 3}, None, False),
        ({"merged_captions": ["another merge."]}, None, True),  # the clip's merge is not known
        ({"merged_captions": []}, MERGE, True),  # it recorded no merge: outdated ids alone decide
        ({"merged_captions": None, "ls_annotation_id": None}, MERGE, True),
        ({}, [], True),  # a file from before both columns
        ({"merged_captions": MERGE}, [], False),  # the clip has no merge now
        # As pandas gives the cells: arrays for lists, floats for a nullable integer column.
        ({"merged_captions": pd.Series(MERGE).to_numpy(), "ls_annotation_id": 3.0}, MERGE, False),
        ({"merged_captions": pd.Series(MERGE).to_numpy(), "ls_annotation_id": float("nan")}, MERGE, True),
    ],
)
def test_is_current(review: dict[str, Any], merge: list[str] | None, current: bool) -> None:
    assert is_current(review, merge, frozenset({3})) is current


def _reviews(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows).set_index("clip_id", drop=False)


def test_current_reviews_keeps_the_current_rows_in_order() -> None:
    merges = pd.DataFrame(
        {"clip_id": ["a", "b", "c"], "merged_captions": [MERGE, MERGE[:1], None]}
    ).set_index("clip_id", drop=False)
    reviews = _reviews(
        [
            {"clip_id": "d", "verdict": "accept", "merged_captions": MERGE},  # no merge row
            {"clip_id": "b", "verdict": "edited", "merged_captions": MERGE},  # merge redone since
            {"clip_id": "a", "verdict": "rejected", "merged_captions": MERGE},
            {"clip_id": "c", "verdict": "accept", "merged_captions": MERGE},  # merge failed since
        ]
    )
    got = current_reviews(reviews, merges, frozenset())
    assert list(got.index) == ["d", "a"] and list(got["verdict"]) == ["accept", "rejected"]
    assert list(current_reviews(reviews, None, frozenset()).index) == ["d", "b", "a", "c"]
    none = current_reviews(reviews.iloc[:0], merges, frozenset())
    assert none.empty and list(none.columns) == list(reviews.columns)


def test_latest_reviews_one_per_clip_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "reviews.parquet"
    assert latest_reviews(path) is None
    ts = pd.Timestamp("2026-11-27T12:00:00Z")
    rows = [
        {"clip_id": "b", "verdict": "edited", "final_captions": ["new."], "updated_at": ts},
        {"clip_id": "a", "verdict": "accept", "final_captions": MERGE, "updated_at": ts},
        {"clip_id": "b", "verdict": "rejected", "final_captions": [], "updated_at": ts - pd.Timedelta("1D")},
    ]
    pd.DataFrame(rows).to_parquet(path, index=False)
    got = latest_reviews(path)
    assert got is not None
    assert list(got.index) == ["a", "b"] and got.at["b", "verdict"] == "edited"  # the latest of b
    pd.DataFrame([*rows, {**rows[0], "clip_id": "c", "verdict": "maybe"}]).to_parquet(path, index=False)
    with pytest.raises(AbortRun, match=rf"{re.escape(str(path))}: clip c: unknown verdict 'maybe'"):
        latest_reviews(path)
    pd.DataFrame(rows).drop(columns=["final_captions"]).to_parquet(path, index=False)
    with pytest.raises(AbortRun, match=r"missing column\(s\) final_captions"):
        latest_reviews(path)
    path.write_bytes(b"not parquet")
    with pytest.raises(AbortRun, match=r"cannot read the reviews"):
        latest_reviews(path)
