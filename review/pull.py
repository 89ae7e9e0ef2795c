"""``avcaps review pull`` and ``avcaps review status``: annotations -> references, and their figures.

The reviewed caption becomes the reference: accepted = the merge as pushed, edited = the annotator's
text, rejected = excluded (and listed). With several annotations on one task the latest wins and the
disagreement is reported. The result is ``DIR/05-review/reviews.parquet`` (written to a temporary
name and renamed), one row per reviewed clip. A pull never loses a review: clips that the server no
longer has, or whose latest annotation is unusable (an unknown verdict, an "edited" with no text),
keep their previously pulled row.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.io import atomic_path
from pipeline.selection import stage_ledger
from review.labeling import VERDICTS, parse_result
from review.push import ReviewStage, connect, remembered_project

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from pipeline.stage import RunContext

REVIEWS_FILE = "reviews.parquet"
STAGE_DIR = ReviewStage.dirname()  # pulled reviews live beside the push's ledger and project.json


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
            pa.field("n_annotations", pa.int32()),
            pa.field("disagreement", pa.bool_()),
            pa.field("word_edit_distance", pa.float64()),
        ]
    )


_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def word_edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between the word sequences of ``a`` and ``b`` (case and punctuation
    ignored)."""
    x, y = words(a), words(b)
    prev = list(range(len(y) + 1))
    for i, wx in enumerate(x, 1):
        cur = [i]
        for j, wy in enumerate(y, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (wx != wy)))
        prev = cur
    return prev[-1]


def captions_distance(merged: list[str], final: list[str]) -> float:
    """Mean word edit distance over the caption pairs (a missing caption counts as empty)."""
    n = max(len(merged), len(final))
    if n == 0:
        return 0.0
    pad = lambda xs: list(xs) + [""] * (n - len(xs))  # noqa: E731
    return sum(word_edit_distance(m, f) for m, f in zip(pad(merged), pad(final), strict=True)) / n


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

    def lines(self) -> list[str]:
        out = [
            f"pulled {self.reviewed} reviewed clips of {self.tasks} tasks -> {self.path}",
            "verdicts: " + ", ".join(f"{v} {self.counts.get(v, 0)}" for v in VERDICTS),
        ]
        if self.kept:
            out.append(f"kept {self.kept} earlier reviews the server no longer gives (nothing is dropped)")
        if self.rejected:
            out.append(f"rejected (excluded from the references): {', '.join(sorted(self.rejected))}")
        out += [f"disagreement: {d}" for d in self.disagreements]
        out += [f"problem: {p}" for p in self.problems]
        out += [f"note: {n}" for n in self.notes]
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


def _review_row(
    task: dict[str, Any], project_id: int, users: dict[int, str], report: PullReport
) -> dict[str, Any] | None:
    data = task.get("data") or {}
    cid = str(data.get("clip_id") or "")
    where = f"task {task['id']} (clip {cid or '?'})"
    anns = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not cid or not anns:
        return None
    anns.sort(key=lambda a: (_ts(a.get("updated_at")), int(a["id"])))
    merged = [str(c) for c in data.get("merged_captions") or []]
    parsed = []
    for ann in anns:
        verdict, texts, comment = parse_result(ann.get("result") or [])
        who = users.get(int(ann.get("completed_by") or 0), f"user {ann.get('completed_by')}")
        if verdict not in VERDICTS:
            if ann is anns[-1]:
                report.problems.append(
                    f"{where}: annotation {ann['id']} by {who} has unknown verdict {verdict!r} "
                    f"(expected one of {', '.join(VERDICTS)}); its previous review, if any, is kept"
                )
                return None
            continue
        if verdict == "edited" and not texts:
            if ann is anns[-1]:
                report.problems.append(
                    f"{where}: annotation {ann['id']} by {who} says 'edited' but the text is empty; "
                    "its previous review, if any, is kept"
                )
                return None
            continue
        if verdict == "accept" and texts and texts != merged:
            report.notes.append(
                f"{where}: accepted, but the text was changed; the merge is kept (use 'edited')"
            )
        final = merged if verdict == "accept" else texts if verdict == "edited" else []
        parsed.append((ann, who, verdict, final, comment))
    if not parsed:
        return None
    ann, who, verdict, final, comment = parsed[-1]
    distinct = {(v, tuple(f)) for _, _, v, f, _ in parsed}
    if len(distinct) > 1:
        views = "; ".join(f"{w}: {v}" for _, w, v, _, _ in parsed)
        report.disagreements.append(f"{where}: {len(parsed)} annotations differ ({views}); the latest wins")
    return {
        "clip_id": cid,
        "verdict": verdict,
        "final_captions": final,
        "merged_captions": merged,
        "comment": comment,
        "annotator": who,
        "updated_at": _ts(ann.get("updated_at")),
        "ls_project_id": project_id,
        "ls_task_id": int(task["id"]),
        "ls_annotation_id": int(ann["id"]),
        "n_annotations": len(parsed),
        "disagreement": len(distinct) > 1,
        "word_edit_distance": captions_distance(merged, final) if verdict != "rejected" else None,
    }


def pull(ctx: RunContext) -> PullReport:
    """Read the completed annotations of the run's project into ``reviews.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(ctx.workdir) / STAGE_DIR
    report = PullReport(folder / REVIEWS_FILE)
    client = connect(ctx.config)
    try:
        project = remembered_project(client, folder)
        project_id = int(project["id"])
        users = {
            int(u["id"]): str(u.get("email") or u.get("username"))
            for u in client.request("GET", "/api/users/")
        }
        fresh: dict[str, dict[str, Any]] = {}
        for task in client.iter_tasks(project_id, full=True):
            report.tasks += 1
            row = _review_row(task, project_id, users, report)
            if row is not None:
                prev = fresh.get(row["clip_id"])
                if prev is None or row["updated_at"] >= prev["updated_at"]:
                    fresh[row["clip_id"]] = row
    finally:
        client.close()
    old = read_reviews(ctx.workdir)
    rows = list(fresh.values())
    for rec in old.to_dict("records"):
        if rec["clip_id"] not in fresh:
            rec = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in rec.items()}
            rec["final_captions"] = [str(c) for c in rec["final_captions"]]
            rec["merged_captions"] = [str(c) for c in rec["merged_captions"]]
            rows.append(rec)
            report.kept += 1
    rows.sort(key=lambda r: r["clip_id"])
    table = pa.Table.from_pylist(rows, schema=reviews_schema())
    with atomic_path(report.path) as tmp:
        pq.write_table(table, tmp)
    report.reviewed = len(rows)
    for r in rows:
        report.counts[r["verdict"]] = report.counts.get(r["verdict"], 0) + 1
    report.rejected = [r["clip_id"] for r in rows if r["verdict"] == "rejected"]
    return report


def review_status(ctx: RunContext) -> dict[str, Any]:
    """done / total, verdict rates and the mean word edit distance merge -> final (from the last pull)."""
    workdir = Path(ctx.workdir)
    pushed = stage_ledger(ReviewStage, workdir).latest()
    total = int((pushed["status"] == "ok").sum()) if not pushed.empty else 0
    df = read_reviews(workdir)
    done = len(df)
    counts = {v: int((df["verdict"] == v).sum()) for v in VERDICTS}
    kept = df[df["verdict"] != "rejected"]
    dist = kept["word_edit_distance"].dropna()
    return {
        "workdir": str(workdir),
        "total": total,
        "done": done,
        "pending": max(total - done, 0),
        "counts": counts,
        "rates": {v: round(counts[v] / done, 4) if done else None for v in VERDICTS},
        "mean_word_edit_distance": round(float(dist.mean()), 4) if len(dist) else None,
        "disagreements": int(df["disagreement"].fillna(False).astype(bool).sum()) if done else 0,
        "reviews_file": str(workdir / STAGE_DIR / REVIEWS_FILE),
    }
