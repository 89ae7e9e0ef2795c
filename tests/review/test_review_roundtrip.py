"""Stage 5 against the real Label Studio server: push, annotate through the API, pull."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest

from pipeline.errors import AbortRun
from pipeline.runner import run_stage
from pipeline.selection import stage_ledger
from pipeline.stage import RunContext, RunOptions
from stages.review.client import LabelStudio
from stages.review.connection import read_project_file
from stages.review.labeling import COMMENT, text_result, verdict_result
from stages.review.pull import captions_distance, pull, read_reviews, review_status, word_edit_distance
from stages.review.push import ReviewStage
from standins.review_run import RETRIED, UPSTREAM_FAILED, make_clips
from standins.review_run import TEST_CREDS as CREDS

pytestmark = pytest.mark.slow


def push(ctx: RunContext, **kw: Any) -> Any:
    return run_stage(ReviewStage, ctx, RunOptions(progress=False, **kw))


def client(ctx: RunContext) -> LabelStudio:
    return LabelStudio(ctx.config.review.url, CREDS.api_key)  # type: ignore[attr-defined]


def pushed(ctx: RunContext) -> pd.DataFrame:
    return stage_ledger(ReviewStage(ctx)).latest()


def task_ids(ctx: RunContext) -> dict[str, int]:
    ledger = pushed(ctx)
    return dict(zip(ledger["clip_id"], ledger["ls_task_id"].astype(int), strict=True))


def annotate(
    c: LabelStudio, task_id: int, verdict: str, texts: list[str] | None = None, comment: str = ""
) -> int:
    result = [verdict_result(verdict)]
    if texts is not None:
        result.append(text_result(texts))
    if comment:
        result.append(text_result([comment], from_name=COMMENT))
    return int(c.create_annotation(task_id, result)["id"])


def test_word_edit_distance() -> None:
    assert word_edit_distance("A dog barks.", "a dog barks") == 0
    assert word_edit_distance("a dog barks", "a brown dog barks loudly") == 2
    assert word_edit_distance("", "two words") == 2
    assert captions_distance(["a b", "c"], ["a x"]) == (1 + 1) / 2


def test_round_trip_push_annotate_pull(run_ctx: Any) -> None:
    clips = make_clips(4)
    clips[3]["split"] = "train"  # only the test split is reviewed
    ctx = run_ctx("run", clips)
    report = push(ctx)
    assert report.counts == {"ok": 3}
    ids = task_ids(ctx)
    # Clips failed upstream are never pushed; the ones retried upstream (merge, download) are.
    assert sorted(ids) == sorted(c["clip_id"] for c in clips[:3])
    assert not set(ids) & set(UPSTREAM_FAILED)
    for clip, stage in zip(clips, RETRIED, strict=False):
        rows = stage_ledger(stage, ctx.workdir).read_all().sort_values("seq")
        assert list(rows.loc[rows["clip_id"] == clip["clip_id"], "status"]) == ["failed_transient", "ok"]
    c = client(ctx)
    project_id = read_project_file(ctx.workdir / "05-review")["project_id"]
    for cid, tid in ids.items():
        task = c.task(tid)
        assert task["data"]["clip_id"] == cid and task["project"] == project_id
        # The merge is a prediction of the project's model version, so it shows prefilled.
        assert task["data"]["merged_captions"] == next(
            x["merged_captions"] for x in clips if x["clip_id"] == cid
        )
    project = c.project(project_id)
    assert project["model_version"] == "avcaps-merge" and project["show_collab_predictions"]

    a, b, r = (x["clip_id"] for x in clips[:3])
    annotate(c, ids[a], "accept", clips[0]["merged_captions"])
    edit = ["A brown dog barks loudly on a green lawn", "Birds chirp near the dog"]
    annotate(c, ids[b], "edited", edit, comment="dog is brown")
    annotate(c, ids[r], "rejected", comment="picture does not match")

    rep = pull(ctx)
    assert rep.counts == {"accept": 1, "edited": 1, "rejected": 1} and rep.rejected == [r]
    df = read_reviews(ctx.workdir).set_index("clip_id")
    assert list(df.loc[a, "final_captions"]) == clips[0]["merged_captions"]
    assert list(df.loc[b, "final_captions"]) == edit and df.loc[b, "comment"] == "dog is brown"
    assert list(df.loc[r, "final_captions"]) == [] and df.loc[r, "verdict"] == "rejected"
    assert set(df["annotator"]) == {CREDS.username}
    assert not df["disagreement"].any()

    st = review_status(ctx)
    assert (st["done"], st["total"], st["pending"]) == (3, 3, 0)
    assert st["rates"] == {"accept": round(1 / 3, 4), "edited": round(1 / 3, 4), "rejected": round(1 / 3, 4)}
    expected_b = captions_distance(clips[1]["merged_captions"], edit)
    assert expected_b > 0
    assert st["mean_word_edit_distance"] == pytest.approx(round((0 + expected_b) / 2, 4))

    # Pushing again adds nothing: not as a resumed run, not even forced.
    assert push(ctx).processed == 0
    push(ctx, force=True)
    assert len(list(c.iter_tasks(project_id))) == 3
    assert task_ids(ctx) == ids


def test_second_run_folder_gets_its_own_project(run_ctx: Any) -> None:
    one, two = run_ctx("one", make_clips(2, "p")), run_ctx("two", make_clips(2, "q"))
    push(one)
    push(two)
    p1 = read_project_file(one.workdir / "05-review")["project_id"]
    p2 = read_project_file(two.workdir / "05-review")["project_id"]
    assert p1 != p2
    assert set(pushed(one)["ls_project_id"]) == {p1} and set(pushed(two)["ls_project_id"]) == {p2}


def test_tasks_are_listed_page_by_page(run_ctx: Any) -> None:
    ctx = run_ctx("run", make_clips(5, "g"))
    push(ctx)
    project_id = read_project_file(ctx.workdir / "05-review")["project_id"]
    for size in (1, 2, 5, 500):
        ids = [t["id"] for t in client(ctx).iter_tasks(project_id, page_size=size)]
        assert sorted(ids) == sorted(task_ids(ctx).values()), size


def test_thousands_of_tasks_batched_and_paged(run_ctx: Any) -> None:
    n = 2000
    ctx = run_ctx("run", make_clips(n, "s"), share_media=True, batch_size=250)
    assert push(ctx).counts == {"ok": n}
    project_id = read_project_file(ctx.workdir / "05-review")["project_id"]
    listed = {t["data"]["clip_id"]: t["id"] for t in client(ctx).iter_tasks(project_id)}
    assert listed == task_ids(ctx) and len(listed) == n
    push(ctx, force=True)  # lists the 2000 tasks (4 pages) and imports none
    assert len(list(client(ctx).iter_tasks(project_id))) == n


def test_kill_between_import_and_commit_imports_nothing_twice(run_ctx: Any) -> None:
    ctx = run_ctx("run", make_clips(3, "k"))
    push(ctx)
    ids = task_ids(ctx)
    for part in (ctx.workdir / "05-review" / "ledger").glob("part-*.parquet"):
        part.unlink()  # as if killed after the import calls, before the ledger commits
    push(ctx)
    assert task_ids(ctx) == ids
    project_id = read_project_file(ctx.workdir / "05-review")["project_id"]
    assert len(list(client(ctx).iter_tasks(project_id))) == 3


def test_one_annotator_answering_twice_counts_once(run_ctx: Any) -> None:
    clips = make_clips(1, "d")
    ctx = run_ctx("run", clips)
    push(ctx)
    tid = task_ids(ctx)[clips[0]["clip_id"]]
    c = client(ctx)
    annotate(c, tid, "accept", clips[0]["merged_captions"])
    edit = ["A dog and birds", "Birds and a dog"]
    annotate(c, tid, "edited", edit)  # the same annotator changed their mind
    rep = pull(ctx)
    assert not rep.disagreements
    row = read_reviews(ctx.workdir).iloc[0]
    assert row["verdict"] == "edited" and list(row["final_captions"]) == edit
    assert row["n_annotations"] == 1 and not row["disagreement"]


def test_missing_media_fails_only_that_clip(run_ctx: Any) -> None:
    clips = make_clips(3, "m")
    ctx = run_ctx("run", clips)
    (ctx.workdir / "media" / "audio" / f"{clips[1]['clip_id']}.flac").unlink()
    push(ctx)
    state = pushed(ctx).set_index("clip_id")
    bad = state.loc[clips[1]["clip_id"]]
    assert bad["status"] == "failed_permanent" and bad["reason"] == "missing_media"
    assert f"{clips[1]['clip_id']}.flac" in bad["message"]
    assert (state["status"] == "ok").sum() == 2


def test_faults_name_the_thing_and_lose_nothing(run_ctx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.review.server import free_port

    clips = make_clips(2, "f")
    ctx = run_ctx("run", clips)
    push(ctx)
    ids = task_ids(ctx)
    c = client(ctx)
    edit = ["A dog barks at birds", "Birds chirp above a dog"]
    ann = annotate(c, ids[clips[0]["clip_id"]], "edited", edit)
    pull(ctx)
    reviews = ctx.workdir / "05-review" / "reviews.parquet"
    before = reviews.read_bytes()

    # A task edited by hand into an unknown verdict: reported, the earlier review kept.
    c.update_annotation(ann, [verdict_result("maybe"), text_result(["whatever"])])
    rep = pull(ctx)
    assert any("unknown verdict 'maybe'" in p and clips[0]["clip_id"] in p for p in rep.problems)
    row = read_reviews(ctx.workdir).iloc[0]
    assert row["verdict"] == "edited" and list(row["final_captions"]) == edit
    before = reviews.read_bytes()

    # Wrong key: 401 named, the key never printed.
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "0" * 40)
    with pytest.raises(AbortRun, match="401") as exc:
        pull(ctx)
    assert "0" * 40 not in str(exc.value)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", CREDS.api_key)

    # Server unreachable: named by URL.
    dead = ctx.config.model_copy(deep=True)  # type: ignore[attr-defined]
    dead.review.url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(AbortRun, match=r"unreachable at http://127\.0\.0\.1"):
        pull(RunContext(ctx.workdir, dead))
    with pytest.raises(AbortRun, match="unreachable"):
        push(RunContext(ctx.workdir, dead), force=True)

    # The remembered id names another run's project (review.url pointing at another server).
    state_file = ctx.workdir / "05-review" / "project.json"
    state = state_file.read_text()
    state_file.write_text(state.replace('"title": "', '"title": "elsewhere '))
    with pytest.raises(AbortRun, match="another server"):
        pull(ctx)
    state_file.write_text(state)

    # A deleted project: named, with where the reviews are; nothing overwritten.
    project_id = read_project_file(ctx.workdir / "05-review")["project_id"]
    c.delete_project(project_id)
    with pytest.raises(AbortRun, match=f"project {project_id} .*no longer exists"):
        pull(ctx)
    with pytest.raises(AbortRun, match="no longer exists"):
        push(ctx, force=True)
    assert reviews.read_bytes() == before
    assert (pushed(ctx)["status"] == "ok").all()


def test_api_key_and_password_never_logged(ls_server: Any) -> None:
    log = ls_server.log_path.read_text(errors="replace")
    assert log and CREDS.api_key not in log and CREDS.password not in log
