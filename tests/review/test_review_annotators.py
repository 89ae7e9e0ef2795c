"""Several annotators per task: the project's overlap, the majority policy, the agreement figures
(in `avcaps review status` and in the dataset card), against the real Label Studio server."""

from __future__ import annotations

import json
import random
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from review_helpers import avcaps, write_config

from pipeline.runner import run_stage
from pipeline.selection import stage_ledger
from pipeline.stage import RunContext, RunOptions
from stages.review.client import LabelStudio
from stages.review.connection import read_project_file
from stages.review.labeling import text_result, verdict_result
from stages.review.policy import (
    Vote,
    agreement,
    captions_distance,
    cohen_kappa,
    decide,
    fleiss_kappa,
)
from stages.review.pull import pull, read_annotations, read_reviews, review_status
from stages.review.push import ReviewStage
from standins.review_run import REPO, make_clips
from standins.review_run import TEST_CREDS as CREDS

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
MERGED = ("A brown dog barks on a lawn", "Birds chirp near a brown dog")


def vote(who: str, verdict: str, minute: int, captions: tuple[str, ...] | None = None) -> Vote:
    caps = captions if captions is not None else (MERGED if verdict == "accept" else ())
    return Vote(who, verdict, caps, "", T0 + timedelta(minutes=minute), minute)


# -- the formulas, against published worked examples and an independent implementation ------------
def test_kappas_match_the_published_worked_examples() -> None:
    # Fleiss (1971) as worked in the literature: 10 subjects, 14 raters, 5 categories ->
    # P_bar = 0.378, kappa = 0.210.
    table = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    kappa, p_bar = fleiss_kappa([{str(j): n for j, n in enumerate(row) if n} for row in table])
    assert round(p_bar, 3) == 0.378 and round(kappa or 0, 3) == 0.210
    # Cohen's textbook 2x2: 20 yes/yes, 15 no/no, 5 yes/no, 10 no/yes -> kappa = 0.4.
    pairs = [("y", "y")] * 20 + [("n", "n")] * 15 + [("y", "n")] * 5 + [("n", "y")] * 10
    assert cohen_kappa(pairs) == pytest.approx(0.4)
    assert cohen_kappa([("accept", "accept")] * 3) is None  # chance agreement 1: undefined


def test_kappas_match_nltk(tmp_path: Any) -> None:
    """NLTK's AnnotationTask (in the Label Studio venv, which ships it) on the same seeded
    answers: its kappa() is Cohen's for two coders, its pi() Fleiss' for coders who all rate
    every item."""
    rng = random.Random(16)
    verdicts = ("accept", "edited", "rejected")
    weights = (6, 3, 1)
    two = {f"c{i}": {who: rng.choices(verdicts, weights)[0] for who in ("a", "b")} for i in range(40)}
    four = {f"c{i}": {w: rng.choices(verdicts, weights)[0] for w in "abcd"} for i in range(40)}
    script = (
        "import json,sys\nfrom nltk.metrics.agreement import AnnotationTask\n"
        "d=json.load(sys.stdin)\n"
        "t2=AnnotationTask(data=[(w,i,v) for i,r in d['two'].items() for w,v in r.items()])\n"
        "t4=AnnotationTask(data=[(w,i,v) for i,r in d['four'].items() for w,v in r.items()])\n"
        "print(json.dumps({'cohen':t2.kappa(),'fleiss':t4.pi()}))\n"
    )
    out = subprocess.run(
        [str(REPO / ".venv-labelstudio" / "bin" / "python"), "-c", script],
        input=json.dumps({"two": two, "four": four}),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    nltk = json.loads(out.stdout)
    ours2 = agreement({c: [vote(w, v, k) for k, (w, v) in enumerate(r.items())] for c, r in two.items()})
    ours4 = agreement({c: [vote(w, v, k) for k, (w, v) in enumerate(r.items())] for c, r in four.items()})
    assert ours2["method"] == "cohen" and ours2["kappa"] == pytest.approx(nltk["cohen"], abs=1e-9)
    assert ours4["method"] == "fleiss" and ours4["kappa"] == pytest.approx(nltk["fleiss"], abs=1e-9)


# -- the policy --------------------------------------------------------------------------------------
def test_majority_verdict_ties_and_whose_edit() -> None:
    e1, e2, e3 = (
        ("A dog barks loudly on a lawn", "Birds chirp near a dog"),
        ("A brown dog barks on a green lawn", "Birds chirp near a brown dog"),
        ("A brown dog barks on a green lawn", "Two birds chirp near a brown dog"),
    )
    # Two keep, one rejects (the latest): kept. Accept outnumbers edited: the merge.
    d = decide([vote("a", "accept", 1), vote("b", "accept", 2), vote("c", "rejected", 3)], MERGED)
    assert (d.verdict, d.captions, d.disagreement) == ("accept", MERGED, True)
    # One keep, one reject: the tie rejects.
    assert decide([vote("a", "accept", 1), vote("b", "rejected", 2)], MERGED).verdict == "rejected"
    assert decide([vote("a", "rejected", 1), vote("b", "edited", 2, e1)], MERGED).verdict == "rejected"
    # One accept, one edit: the tie goes to the edit.
    d = decide([vote("a", "edited", 1, e1), vote("b", "accept", 2)], MERGED)
    assert (d.verdict, d.captions, d.chosen.annotator) == ("edited", e1, "a")
    # Several edits: the latest one by default; the most central with edit_policy=medoid.
    votes = [vote("a", "edited", 1, e2), vote("b", "edited", 2, e3), vote("c", "edited", 3, e1)]
    assert decide(votes, MERGED).captions == e1
    spread = {e: sum(captions_distance(e, f) for f in (e1, e2, e3)) for e in (e1, e2, e3)}
    medoid = min(spread, key=lambda e: spread[e])
    assert medoid != e1 and sorted(spread.values())[0] < sorted(spread.values())[1]  # one, not e1
    assert decide(votes, MERGED, "medoid").captions == medoid
    # One vote: its own answer, no disagreement.
    d = decide([vote("a", "edited", 1, e2)], MERGED)
    assert (d.verdict, d.captions, d.disagreement) == ("edited", e2, False)


def test_agreement_picks_cohen_for_two_annotators_and_fleiss_for_more() -> None:
    two = {"x": [vote("a", "accept", 1), vote("b", "accept", 2)], "y": [vote("a", "accept", 3)]}
    two["z"] = [vote("a", "rejected", 4), vote("b", "accept", 5)]
    fig = agreement(two)
    assert (fig["method"], fig["clips"], fig["annotators"]) == ("cohen", 2, 2)  # y has one answer
    assert fig["kappa"] == pytest.approx(cohen_kappa([("accept", "accept"), ("rejected", "accept")]))
    three = dict(two, w=[vote("c", "accept", 6), vote("b", "edited", 7, ("x", "y"))])
    assert agreement(three)["method"] == "fleiss"
    assert agreement({"y": two["y"]})["method"] is None  # no clip with two answers


# -- against the real server -------------------------------------------------------------------------
def make_annotators(c: LabelStudio, tag: str, n: int) -> dict[str, int]:
    """Annotator accounts made through the API, as an admin adds people to the organization."""
    out = {}
    for i in range(n):
        name = f"{tag}-annotator-{i}"
        user = c.request("POST", "/api/users/", json={"username": name, "email": f"{name}@avcaps.test"})
        out[str(user.get("email") or user["username"])] = int(user["id"])
    return out


def answer(c: LabelStudio, task_id: int, user_id: int, verdict: str, texts: list[str] | None = None) -> int:
    """An annotation submitted for ``user_id`` (the API takes ``completed_by`` from an admin)."""
    result = [verdict_result(verdict)] + ([text_result(texts)] if texts is not None else [])
    body = {"result": result, "completed_by": user_id}
    return int(c.request("POST", f"/api/tasks/{task_id}/annotations/", json=body)["id"])


def pushed_tasks(ctx: RunContext) -> dict[str, int]:
    ledger = stage_ledger(ReviewStage(ctx)).latest()
    return {str(k): int(v) for k, v in ledger["ls_task_id"].items()}


def test_three_annotators_per_task_majority_agreement_and_the_card(run_ctx: Any) -> None:
    clips = make_clips(5, "v")
    ctx = run_ctx("run", clips, annotators_per_task=3)
    assert run_stage(ReviewStage, ctx, RunOptions(progress=False)).counts == {"ok": 5}
    c = LabelStudio(ctx.config.review.url, CREDS.api_key)  # type: ignore[attr-defined]
    project_id = read_project_file(ctx.workdir / "05-review")["project_id"]
    project = c.project(project_id)
    assert (project["maximum_annotations"], project["overlap_cohort_percentage"]) == (3, 100)
    ids = pushed_tasks(ctx)
    assert {c.task(t)["overlap"] for t in ids.values()} == {3}  # every task wants three answers

    users = make_annotators(c, "maj", 3)
    u1, u2, u3 = users.values()
    n1, n2, _ = users
    a, b, r, f, one = (x["clip_id"] for x in clips)
    merged = {x["clip_id"]: x["merged_captions"] for x in clips}
    edit_1 = ["A brown dog barks loudly on a lawn", "Birds chirp near a brown dog"]
    edit_2 = ["A small brown dog barks on a lawn", "Two birds chirp near a brown dog"]
    answer(c, ids[a], u1, "accept")
    answer(c, ids[a], u2, "accept")
    answer(c, ids[a], u3, "rejected")  # the latest, outvoted: a latest-wins rule would reject
    answer(c, ids[b], u3, "accept")
    answer(c, ids[b], u1, "edited", edit_1)
    answer(c, ids[b], u2, "edited", edit_2)  # the most recent edit becomes the reference
    answer(c, ids[r], u1, "rejected")
    answer(c, ids[r], u2, "accept")
    answer(c, ids[r], u3, "rejected")
    answer(c, ids[f], u2, "accept")
    answer(c, ids[f], u3, "accept")
    answer(c, ids[f], u1, "edited", ["A brown dog barks at birds on a lawn"])  # 1 line for 2 merges
    answer(c, ids[one], u1, "edited", edit_1)  # one answer so far of three

    rep = pull(ctx)
    df = read_reviews(ctx.workdir).set_index("clip_id")
    assert (df.loc[a, "verdict"], list(df.loc[a, "final_captions"])) == ("accept", merged[a])
    assert (df.loc[b, "verdict"], list(df.loc[b, "final_captions"])) == ("edited", edit_2)
    assert df.loc[b, "annotator"] == n2
    assert df.loc[r, "verdict"] == "rejected" and r in rep.rejected
    assert (df.loc[f, "verdict"], df.loc[f, "n_set_aside"], df.loc[f, "n_annotations"]) == ("accept", 1, 2)
    assert (df.loc[one, "verdict"], df.loc[one, "n_annotations"]) == ("edited", 1)
    assert [int(df.loc[a, k]) for k in ("n_accept", "n_edited", "n_rejected")] == [2, 0, 1]
    # The edit with the wrong number of lines is reported by task, clip and annotator, not taken.
    flagged = [p for p in rep.problems if f in p]
    assert len(flagged) == 1 and n1 in flagged[0] and "1 line(s) for 2 merged caption(s)" in flagged[0]
    assert {x.split(":")[0] for x in rep.disagreements} == {f"task {ids[k]} (clip {k})" for k in (a, b, r)}
    answers = read_annotations(ctx.workdir)
    assert len(answers) == 13 and int((~answers["usable"]).sum()) == 1

    # Fleiss' kappa over the clips with two answers or more (a, b, r, f), by hand: per-clip
    # verdict counts a (2 accept, 1 rejected), b (1, 2 edited, 0), r (1 accept, 2 rejected),
    # f (2 accept): P_i = 1/3, 1/3, 1/3, 1; P_bar = 1/2; shares accept 6/11, edited 2/11,
    # rejected 3/11: P_e = (36 + 4 + 9) / 121 = 49/121; kappa = (1/2 - 49/121) / (1 - 49/121).
    expected = (1 / 2 - 49 / 121) / (1 - 49 / 121)
    st = review_status(ctx)
    fig = st["agreement"]
    assert (fig["method"], fig["clips"], fig["annotators"], fig["votes"]) == ("fleiss", 4, 3, 11)
    assert fig["kappa"] == pytest.approx(expected, abs=1e-4) and fig["observed_agreement"] == 0.5
    # Kept captions compared pairwise: a (merge, merge), b (merge/edit_1, merge/edit_2,
    # edit_1/edit_2), r (none: one keep), f (merge, merge).
    m = merged[a]
    dists = [0.0, captions_distance(m, edit_1), captions_distance(m, edit_2)]
    dists += [captions_distance(edit_1, edit_2), 0.0]
    assert fig["inter_annotator_word_edit_distance"] == pytest.approx(sum(dists) / 5, abs=1e-4)
    assert (st["complete"], st["annotators_per_task"], st["set_aside"]) == (3, 3, 1)

    out = avcaps(["review", "status", "--config", str(write_config(ctx))], CREDS.api_key)
    assert out.returncode == 0, out.stderr
    assert f"Fleiss' kappa {expected:.3f} over 4 clips reviewed by 3 annotators" in out.stdout
    assert "clips with all 3 answers: 3 of 5 reviewed" in out.stdout

    # The dataset card carries the same figures (the export pulls first).
    ctx.config.export.allow_unreviewed = True  # type: ignore[attr-defined]
    from stages.export.stage import ExportStage

    run_stage(ExportStage, ctx, RunOptions(progress=False))
    card = (ctx.workdir / "export" / "README.md").read_text()
    assert f"Fleiss' kappa {expected:.3f} over 4 clips reviewed by 3 annotators" in card
    stats = json.loads((ctx.workdir / "export" / "statistics.json").read_text())
    assert stats["review_agreement"]["kappa"] == pytest.approx(expected, abs=1e-4)


def test_two_annotators_give_cohens_kappa(run_ctx: Any) -> None:
    clips = make_clips(4, "k")
    ctx = run_ctx("run", clips, annotators_per_task=2)
    run_stage(ReviewStage, ctx, RunOptions(progress=False))
    c = LabelStudio(ctx.config.review.url, CREDS.api_key)  # type: ignore[attr-defined]
    ids = pushed_tasks(ctx)
    u1, u2 = make_annotators(c, "coh", 2).values()
    plan = [("accept", "accept"), ("accept", "rejected"), ("rejected", "rejected"), ("accept", "accept")]
    for clip, (v1, v2) in zip(clips, plan, strict=True):
        answer(c, ids[clip["clip_id"]], u1, v1)
        answer(c, ids[clip["clip_id"]], u2, v2)
    pull(ctx)
    fig = review_status(ctx)["agreement"]
    # p_o = 3/4; annotator 1 accepts 3/4, annotator 2 2/4: p_e = 3/8 + 1/8 = 1/2; kappa = 1/2.
    assert (fig["method"], fig["clips"], fig["annotators"]) == ("cohen", 4, 2)
    assert fig["kappa"] == pytest.approx(0.5)
    # One keep against one reject is a tie: rejected.
    assert read_reviews(ctx.workdir).set_index("clip_id").loc[clips[1]["clip_id"], "verdict"] == "rejected"
    # A changed annotators_per_task updates the project at the next push that runs (--force
    # when every clip is pushed already: it imports nothing again).
    ctx.config.review.annotators_per_task = 3  # type: ignore[attr-defined]
    run_stage(ReviewStage, ctx, RunOptions(progress=False, force=True))
    project = c.project(read_project_file(ctx.workdir / "05-review")["project_id"])
    assert project["maximum_annotations"] == 3
    assert {c.task(t)["overlap"] for t in ids.values()} == {3}
