"""Risk-ordered review against the real Label Studio server: the riskiest merges first, with their
scores in the task; tasks of the earlier form are brought up to date without losing their reviews."""

from __future__ import annotations

from typing import Any

import pytest
import requests

from pipeline.runner import run_stage
from pipeline.selection import stage_ledger
from pipeline.stage import RunContext, RunOptions
from stages.review.client import LabelStudio
from stages.review.connection import read_project_file
from stages.review.labeling import text_result, verdict_result
from stages.review.pull import pull, read_reviews
from stages.review.push import ReviewStage
from standins.review_run import TEST_CREDS as CREDS
from standins.review_run import make_clips

pytestmark = pytest.mark.slow

# (CLAP, CLIP) of the two merged captions of each clip; risk = min over captions and both scores
# of their percentiles among the 10 merged captions of the 5 scored clips (lists flattened).
SCORES: list[tuple[list[float], list[float]] | None] = [
    ([0.30, 0.31], [0.25, 0.26]),  # 0
    ([0.12, 0.35], [0.40, 0.41]),  # 1: one merge matches its audio worst of all: the riskiest
    None,  # 2: merged before scoring existed: last
    ([0.33, 0.34], [0.10, 0.36]),  # 3: the worst CLIP: second
    ([0.20, 0.21], [0.30, 0.31]),  # 4
    ([0.37, 0.38], [0.38, 0.39]),  # 5: the safest scored merge
]
# CLAP values sorted: .12 .20 .21 .30 .31 .33 .34 .35 .37 .38; CLIP: .10 .25 .26 .30 .31 .36 .38 .39 .40 .41
# risk (min percentile): clip1 CLAP .12 -> 10; clip3 CLIP .10 -> 10; clip4 CLAP .20 -> 20;
# clip0 CLIP .25 -> 20; clip5 CLAP .37 -> 90, CLIP .38 -> 70 -> 70. Ties keep clip-table order.
EXPECTED_ORDER = [1, 3, 0, 4, 5, 2]
EXPECTED_RISK = {0: 20.0, 1: 10.0, 3: 10.0, 4: 20.0, 5: 70.0, 2: None}


def scored_clips() -> list[dict[str, Any]]:
    clips = make_clips(len(SCORES), tag="r")
    for clip, scores in zip(clips, SCORES, strict=True):
        if scores is not None:
            clip["merge_scores"] = {
                "merge_clap_score": scores[0],
                "merge_clip_score": scores[1],
                "source_audio_clap_score": [0.5, 0.6],
                "source_audio_clip_score": [0.05, 0.06],
                "source_visual_clap_score": 0.07,
                "source_visual_clip_score": 0.33,
            }
    return clips


def push(ctx: RunContext, **kw: Any) -> Any:
    return run_stage(ReviewStage, ctx, RunOptions(progress=False, **kw))


def task_ids(ctx: RunContext) -> dict[str, int]:
    ledger = stage_ledger(ReviewStage(ctx)).latest()
    return dict(zip(ledger["clip_id"], ledger["ls_task_id"].astype(int), strict=True))


def next_task(url: str, project_id: int) -> dict[str, Any]:
    """The task Label Studio hands an annotator who presses "Label All Tasks"."""
    r = requests.get(
        f"{url}/api/projects/{project_id}/next/",
        headers={"Authorization": f"Token {CREDS.api_key}"},
        timeout=60,
    )
    assert r.status_code == 200, (r.status_code, r.text[:300])
    return r.json()  # type: ignore[no-any-return]


def test_push_riskiest_first_with_scores_in_the_task(run_ctx: Any) -> None:
    clips = scored_clips()
    ctx = run_ctx("run", clips)  # batch_size 2: three import calls
    assert push(ctx).counts == {"ok": len(clips)}
    ids = task_ids(ctx)
    want = [clips[i]["clip_id"] for i in EXPECTED_ORDER]
    assert sorted(ids, key=ids.__getitem__) == want  # imported riskiest first, across batches
    c = LabelStudio(ctx.config.review.url, CREDS.api_key)  # type: ignore[attr-defined]
    project_id = read_project_file(ctx.workdir / "05-review")["project_id"]
    # The data manager's default view (no ordering chosen) lists them so...
    listed = [t["data"]["clip_id"] for t in c.iter_tasks(project_id)]
    assert listed == want
    # ... and the labeling stream serves them so: the riskiest first, then the next once answered.
    url = ctx.config.review.url  # type: ignore[attr-defined]
    first = next_task(url, project_id)
    assert first["data"]["clip_id"] == want[0]
    c.create_annotation(first["id"], [verdict_result("accept")])
    assert next_task(url, project_id)["data"]["clip_id"] == want[1]
    # The scores, raw and as run percentiles, are in the task and in the text the annotator reads.
    for k, clip in enumerate(clips):
        data = c.task(ids[clip["clip_id"]])["data"]
        assert data["risk"] == EXPECTED_RISK[k]
        if SCORES[k] is None:
            assert data["scores"] == {} and "No CLAP/CLIP scores" in data["scores_text"]
            continue
        assert data["scores"]["merge_clap_score"] == pytest.approx(SCORES[k][0])
        assert data["scores"]["merge_clip_score"] == pytest.approx(SCORES[k][1])
        assert data["scores"]["source_visual_clip_percentile"] == 100.0  # the same for every clip
        assert f"Risk {EXPECTED_RISK[k]:.0f} of 100" in data["scores_text"]
    one = c.task(ids[clips[1]["clip_id"]])["data"]
    assert one["scores"]["merge_clap_percentile"] == [10.0, 80.0]  # .12 and .35 among 10 values
    assert one["scores"]["merge_clip_percentile"] == [90.0, 100.0]
    assert "Merged caption 1: CLAP 0.120 (p10), CLIP 0.400 (p90)" in one["scores_text"]
    assert "Audio caption 2: CLAP 0.600 (p100), CLIP 0.060 (p100)" in one["scores_text"]
    # The labeling config shows that text under the captions.
    assert '<Text name="scores" value="$scores_text"/>' in c.project(project_id)["label_config"]


def test_tasks_of_the_earlier_form_get_scores_and_keep_their_reviews(
    run_ctx: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A project pushed before scores existed (task form 1: no score keys, no scores view) is
    updated in place by the next push; the annotations made on it still count: the merges they
    reviewed are the ones the tasks show."""
    import stages.review.labeling as labeling
    import stages.review.push as push_mod
    from stages.review.risk import RunScores

    clips = scored_clips()
    ctx = run_ctx("run", clips)
    with monkeypatch.context() as m:  # the stage as it was: form 1
        m.setattr(push_mod, "TASK_FORMAT", 1)
        m.setattr(push_mod, "OLDER_TASK_FORMATS", ())
        m.setattr(RunScores, "task_fields", lambda self, *a: {})
        old_config = "\n".join(line for line in labeling.LABEL_CONFIG.splitlines() if "scores" not in line)
        m.setattr(labeling, "LABEL_CONFIG", old_config)
        assert push(ctx).counts == {"ok": len(clips)}
        c = LabelStudio(ctx.config.review.url, CREDS.api_key)  # type: ignore[attr-defined]
        project_id = read_project_file(ctx.workdir / "05-review")["project_id"]
        assert "scores" not in c.project(project_id)["label_config"]
        ids = task_ids(ctx)
        reviewed = clips[4]["clip_id"]
        c.create_annotation(
            ids[reviewed], [verdict_result("edited"), text_result(["A dog barks", "Birds chirp"])]
        )
    # Today's stage: every push row is stale (the form is in the fingerprint) and is redone.
    report = push(ctx)
    assert report.counts == {"ok": len(clips)}
    assert task_ids(ctx) == ids  # the same tasks, updated in place
    ledger = stage_ledger(ReviewStage(ctx)).latest()
    assert all(len(x) == 0 for x in ledger["ls_outdated_annotations"])  # no review lost
    assert "$scores_text" in c.project(project_id)["label_config"]
    data = c.task(ids[reviewed])["data"]
    assert data["risk"] == EXPECTED_RISK[4] and "Risk 20 of 100" in data["scores_text"]
    pull(ctx)
    reviews = read_reviews(ctx.workdir)
    assert list(reviews["clip_id"]) == [reviewed]
    assert list(reviews["final_captions"].iloc[0]) == ["A dog barks", "Birds chirp"]
    assert push(ctx).selected == 0  # current now: nothing to redo
