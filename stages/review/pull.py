"""``avcaps review pull`` and ``avcaps review status``: annotations -> references, and their figures.

Each annotator's latest answer on a task is their vote; the votes decide the reference by the policy
of :mod:`stages.review.policy` (majority verdict; accepted = the merge as pushed, edited = one annotator's
lines, rejected = excluded and listed). Answers that cannot be used (an unknown verdict, an
"edited" with no text or with a number of lines that differs from the number of merges) are set
aside and reported, never taken. The result is ``DIR/05-review/reviews.parquet`` (one row per
reviewed clip) and ``DIR/05-review/annotations.parquet`` (one row per annotator and clip, the set
aside ones included, for the agreement figures), each written to a temporary name and renamed. A pull
never loses a review: clips that the server no longer has, or with no usable answer left, keep their
previously pulled rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.io import atomic_path
from pipeline.selection import stage_ledger
from stages.review.connection import connect, remembered_project, review_config
from stages.review.current import is_current
from stages.review.labeling import parse_result
from stages.review.policy import (
    VERDICTS,
    EditPolicy,
    Vote,
    agreement,
    captions_distance,
    decide,
    word_edit_distance,
    words,
)
from stages.review.push import ReviewStage

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from pipeline.stage import RunContext

REVIEWS_FILE = "reviews.parquet"
ANNOTATIONS_FILE = "annotations.parquet"
STAGE_DIR = ReviewStage.dirname()  # pulled reviews live beside the push's ledger and project.json
__all__ = ["captions_distance", "pull", "read_reviews", "review_status", "word_edit_distance", "words"]


def reviews_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("clip_id", pa.string(), nullable=False),
            pa.field("verdict", pa.string()),
            pa.field("final_captions", pa.list_(pa.string())),
            pa.field("merged_captions", pa.list_(pa.string())),
            pa.field("comment", pa.string()),
            pa.field("annotator", pa.string()),
            pa.field("updated_at", pa.timestamp("us", tz="UTC")),
            pa.field("ls_project_id", pa.int64()),
            pa.field("ls_task_id", pa.int64()),
            pa.field("ls_annotation_id", pa.int64()),
            pa.field("n_annotations", pa.int32()),  # usable votes
            pa.field("disagreement", pa.bool_()),
            pa.field("word_edit_distance", pa.float64()),
            pa.field("n_accept", pa.int32()),
            pa.field("n_edited", pa.int32()),
            pa.field("n_rejected", pa.int32()),
            pa.field("n_set_aside", pa.int32()),  # answers that could not be used (reported)
        ]
    )


def annotations_schema() -> pa.Schema:
    """One row per annotator and task: their latest answer, usable or set aside (and why)."""
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("clip_id", pa.string(), nullable=False),
            pa.field("annotator", pa.string()),
            pa.field("verdict", pa.string()),
            pa.field("captions", pa.list_(pa.string())),
            pa.field("comment", pa.string()),
            pa.field("updated_at", pa.timestamp("us", tz="UTC")),
            pa.field("ls_task_id", pa.int64()),
            pa.field("ls_annotation_id", pa.int64()),
            pa.field("usable", pa.bool_()),
            pa.field("problem", pa.string()),
        ]
    )


@dataclass
class PullReport:
    path: Path
    tasks: int = 0
    reviewed: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)
    disagreements: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kept: int = 0
    outdated: int = 0
    agreement: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [
            f"pulled {self.reviewed} reviewed clips of {self.tasks} tasks -> {self.path}",
            "verdicts: " + ", ".join(f"{v} {self.counts.get(v, 0)}" for v in VERDICTS),
        ]
        if self.kept:
            out.append(f"kept {self.kept} earlier reviews the server no longer gives (nothing is dropped)")
        if self.outdated:
            out.append(
                f"{self.outdated} annotations were made on an earlier merge of their clip (outdated: kept "
                "on the server, not taken as reviews of the current merge)"
            )
        if self.rejected:
            out.append(f"rejected (excluded from the references): {', '.join(sorted(self.rejected))}")
        out += [f"disagreement: {d}" for d in self.disagreements]
        out += [f"problem: {p}" for p in self.problems]
        out += [f"note: {n}" for n in self.notes]
        if self.agreement:
            from stages.review.policy import describe

            out.append(describe(self.agreement))
        return out


def _ts(text: str | None) -> datetime:
    return datetime.fromisoformat((text or "1970-01-01T00:00:00+00:00").replace("Z", "+00:00"))


def read_reviews(workdir: Path) -> pd.DataFrame:
    """The pulled reviews (empty frame with the columns when none were pulled yet)."""
    import pyarrow.parquet as pq

    path = Path(workdir) / STAGE_DIR / REVIEWS_FILE
    if not path.exists():
        return reviews_schema().empty_table().to_pandas()
    return pq.read_table(path).to_pandas().reset_index(drop=True)


def references(workdir: Path) -> dict[str, list[str]]:
    """clip_id -> reference captions of the accepted and edited clips (rejected ones excluded)."""
    df = read_reviews(workdir)
    df = df[df["verdict"].isin(["accept", "edited"])]
    return {
        cid: [str(c) for c in caps] for cid, caps in zip(df["clip_id"], df["final_captions"], strict=True)
    }


def read_annotations(workdir: Path) -> pd.DataFrame:
    """The pulled answers, one row per annotator and clip (empty frame when none were pulled)."""
    import pyarrow.parquet as pq

    path = Path(workdir) / STAGE_DIR / ANNOTATIONS_FILE
    if not path.exists():
        return annotations_schema().empty_table().to_pandas()
    return pq.read_table(path).to_pandas().reset_index(drop=True)


def _answers(
    task: dict[str, Any],
    merged: list[str],
    users: dict[int, str],
    report: PullReport,
    outdated: frozenset[int] = frozenset(),
) -> tuple[list[Vote], list[dict[str, Any]]]:
    """Each annotator's latest answer on ``task``: the usable ones as votes, and every one as a
    row of ``annotations.parquet`` (the set-aside ones with their problem, also reported)."""
    cid = str((task.get("data") or {}).get("clip_id") or "")
    where = f"task {task['id']} (clip {cid or '?'})"
    latest: dict[str, dict[str, Any]] = {}
    for ann in task.get("annotations") or []:
        if ann.get("was_cancelled"):
            continue
        if int(ann["id"]) in outdated:
            report.outdated += 1
            continue
        who = users.get(int(ann.get("completed_by") or 0), f"user {ann.get('completed_by')}")
        key = (_ts(ann.get("updated_at")), int(ann["id"]))
        if who not in latest or key > latest[who]["key"]:
            latest[who] = {"ann": ann, "key": key}
    votes: list[Vote] = []
    rows: list[dict[str, Any]] = []
    for who, entry in sorted(latest.items(), key=lambda kv: kv[1]["key"]):
        ann = entry["ann"]
        verdict, texts, comment = parse_result(ann.get("result") or [])
        problem = None
        if verdict not in VERDICTS:
            problem = f"unknown verdict {verdict!r} (expected one of {', '.join(VERDICTS)})"
        elif verdict == "edited" and not texts:
            problem = "says 'edited' but the text is empty"
        elif verdict == "edited" and len(texts) != len(merged):
            problem = (
                f"says 'edited' with {len(texts)} line(s) for {len(merged)} merged caption(s) "
                "(one line per audio caption is needed to match them)"
            )
        if verdict == "accept" and texts and texts != merged:
            report.notes.append(f"{where}: accepted by {who}, but the text was changed; the merge is kept")
        captions = tuple(merged if verdict == "accept" else texts if verdict == "edited" else [])
        if problem:
            report.problems.append(
                f"{where}: annotation {ann['id']} by {who} {problem}; set aside (its previous review, "
                "if any, is kept when no other answer decides)"
            )
        else:
            votes.append(Vote(who, str(verdict), captions, comment, entry["key"][0], int(ann["id"])))
        rows.append(
            {
                "clip_id": cid,
                "annotator": who,
                "verdict": verdict,
                "captions": list(captions) if not problem else list(texts),
                "comment": comment,
                "updated_at": entry["key"][0],
                "ls_task_id": int(task["id"]),
                "ls_annotation_id": int(ann["id"]),
                "usable": problem is None,
                "problem": problem,
            }
        )
    return votes, rows


def _review_row(
    task: dict[str, Any],
    project_id: int,
    users: dict[int, str],
    report: PullReport,
    edit_policy: EditPolicy,
    outdated: frozenset[int] = frozenset(),
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    data = task.get("data") or {}
    cid = str(data.get("clip_id") or "")
    if not cid:
        return None, []
    merged = [str(c) for c in data.get("merged_captions") or []]
    votes, answers = _answers(task, merged, users, report, outdated)
    if not votes:
        return None, answers
    d = decide(votes, merged, edit_policy)
    if d.disagreement:
        views = "; ".join(f"{v.annotator}: {v.verdict}" for v in sorted(votes, key=lambda v: v.order))
        whose = f", the edit of {d.chosen.annotator}" if d.verdict == "edited" else ""
        report.disagreements.append(
            f"task {task['id']} (clip {cid}): {len(votes)} answers differ ({views}); "
            f"{d.verdict} by the majority{whose}"
        )
    row = {
        "clip_id": cid,
        "verdict": d.verdict,
        "final_captions": list(d.captions),
        "merged_captions": merged,
        "comment": d.chosen.comment,
        "annotator": d.chosen.annotator,
        "updated_at": max(v.updated_at for v in votes),
        "ls_project_id": project_id,
        "ls_task_id": int(task["id"]),
        "ls_annotation_id": d.chosen.annotation_id,
        "n_annotations": len(votes),
        "disagreement": d.disagreement,
        "word_edit_distance": captions_distance(merged, d.captions) if d.verdict != "rejected" else None,
        "n_accept": d.counts["accept"],
        "n_edited": d.counts["edited"],
        "n_rejected": d.counts["rejected"],
        "n_set_aside": sum(1 for a in answers if not a["usable"]),
    }
    return row, answers


def _clean(rec: dict[str, Any], list_cols: tuple[str, ...]) -> dict[str, Any]:
    """A row read back from Parquet, ready to be written again (NaN -> None, arrays -> lists)."""
    rec = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in rec.items()}
    for col in list_cols:
        if col in rec:
            rec[col] = [str(c) for c in (rec[col] if rec[col] is not None else [])]
    return rec


def _write(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{name: r.get(name) for name in schema.names} for r in rows]  # old files lack new columns
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def pull(ctx: RunContext) -> PullReport:
    """Read the completed annotations of the run's project into ``reviews.parquet``."""
    folder = Path(ctx.workdir) / STAGE_DIR
    report = PullReport(folder / REVIEWS_FILE)
    edit_policy = review_config(ctx.config).edit_policy
    client = connect(ctx.config)
    try:
        project = remembered_project(client, folder)
        project_id = int(project["id"])
        users = {int(u["id"]): str(u.get("email") or u.get("username")) for u in client.users()}
        outdated = outdated_annotations(ctx.workdir)
        fresh: dict[str, dict[str, Any]] = {}
        answers: dict[str, list[dict[str, Any]]] = {}
        shown: dict[str, list[str]] = {}  # what each clip's task shows now
        for task in client.iter_tasks(project_id, full=True):
            report.tasks += 1
            data = task.get("data") or {}
            shown[str(data.get("clip_id") or "")] = [str(c) for c in data.get("merged_captions") or []]
            row, rows = _review_row(task, project_id, users, report, edit_policy, outdated)
            if row is not None:
                prev = fresh.get(row["clip_id"])
                if prev is None or row["updated_at"] >= prev["updated_at"]:
                    fresh[row["clip_id"]] = row
                    answers[row["clip_id"]] = rows
            elif rows and rows[0]["clip_id"] not in fresh:
                answers.setdefault(rows[0]["clip_id"], rows)
    finally:
        client.close()
    rows = list(fresh.values())
    for rec in read_reviews(ctx.workdir).to_dict("records"):
        rec = _clean(rec, ("final_captions", "merged_captions"))
        if rec["clip_id"] in fresh:
            continue
        if not is_current(rec, shown.get(rec["clip_id"]), outdated):
            continue  # of the clip's earlier merge, or made before its task was updated: outdated
        rows.append(rec)
        report.kept += 1
    rows.sort(key=lambda r: r["clip_id"])
    # The answers of a clip that kept its earlier review are the earlier ones too (with the
    # set-aside answers of this pull beside them), so the figures match the references.
    kept_ids = {r["clip_id"] for r in rows}
    kept_answers = [
        _clean(rec, ("captions",))
        for rec in read_annotations(ctx.workdir).to_dict("records")
        if rec["clip_id"] not in fresh
        and rec["clip_id"] in kept_ids
        and rec["ls_annotation_id"] not in outdated
    ]
    new_answers = [a for cid, rs in answers.items() for a in rs if cid in fresh or not a["usable"]]
    seen = {(a["clip_id"], a["ls_annotation_id"]) for a in new_answers}
    all_answers = new_answers + [a for a in kept_answers if (a["clip_id"], a["ls_annotation_id"]) not in seen]
    all_answers.sort(key=lambda a: (a["clip_id"], a["updated_at"], a["ls_annotation_id"]))
    _write(folder / ANNOTATIONS_FILE, all_answers, annotations_schema())
    _write(report.path, rows, reviews_schema())
    report.reviewed = len(rows)
    for r in rows:
        report.counts[r["verdict"]] = report.counts.get(r["verdict"], 0) + 1
    report.rejected = [r["clip_id"] for r in rows if r["verdict"] == "rejected"]
    report.agreement = agreement_figures(ctx.workdir)
    return report


def outdated_annotations(workdir: Path) -> frozenset[int]:
    """Ids of the annotations made on an earlier merge of their clip (recorded by the push when it
    updated the task)."""
    pushed = stage_ledger(ReviewStage, workdir).latest_table(["ls_outdated_annotations"])
    ids = pushed["ls_outdated_annotations"].combine_chunks().flatten().drop_null()
    return frozenset(int(i) for i in ids.to_pylist())


def votes_by_clip(workdir: Path) -> dict[str, list[Vote]]:
    """The usable answers of the last pull, grouped by clip (for the agreement figures)."""
    df = read_annotations(workdir)
    out: dict[str, list[Vote]] = {}
    if df.empty:
        return out
    for rec in df[df["usable"].fillna(False).astype(bool)].to_dict("records"):
        vote = Vote(
            str(rec["annotator"]),
            str(rec["verdict"]),
            tuple(str(c) for c in (rec["captions"] if rec["captions"] is not None else [])),
            str(rec["comment"] or ""),
            rec["updated_at"],
            int(rec["ls_annotation_id"]),
        )
        out.setdefault(str(rec["clip_id"]), []).append(vote)
    return out


def agreement_figures(workdir: Path) -> dict[str, Any]:
    """Inter-annotator agreement of the last pull (:func:`stages.review.policy.agreement`), rounded."""
    fig = agreement(votes_by_clip(workdir))
    for key in ("kappa", "observed_agreement", "inter_annotator_word_edit_distance"):
        if fig[key] is not None:
            fig[key] = round(float(fig[key]), 4)
    return fig


def review_status(ctx: RunContext) -> dict[str, Any]:
    """done / total, verdict rates, the mean word edit distance merge -> final, and the agreement
    between annotators (all from the last pull)."""
    workdir = Path(ctx.workdir)
    pushed = stage_ledger(ReviewStage, workdir).latest()
    total = int((pushed["status"] == "ok").sum()) if not pushed.empty else 0
    df = read_reviews(workdir)
    done = len(df)
    counts = {v: int((df["verdict"] == v).sum()) for v in VERDICTS}
    kept = df[df["verdict"] != "rejected"]
    dist = kept["word_edit_distance"].dropna()
    per_task = review_config(ctx.config).annotators_per_task
    answers = read_annotations(workdir)
    n_votes = df["n_annotations"].fillna(1).astype(int) if done else df["n_annotations"]
    return {
        "workdir": str(workdir),
        "total": total,
        "done": done,
        "pending": max(total - done, 0),
        "counts": counts,
        "rates": {v: round(counts[v] / done, 4) if done else None for v in VERDICTS},
        "mean_word_edit_distance": round(float(dist.mean()), 4) if len(dist) else None,
        "disagreements": int(df["disagreement"].fillna(False).astype(bool).sum()) if done else 0,
        "annotators_per_task": per_task,
        "complete": int((n_votes >= per_task).sum()) if done else 0,
        "set_aside": int((~answers["usable"].fillna(False).astype(bool)).sum()) if len(answers) else 0,
        "outdated_annotations": len(outdated_annotations(workdir)),
        "agreement": agreement_figures(workdir),
        "reviews_file": str(workdir / STAGE_DIR / REVIEWS_FILE),
    }
