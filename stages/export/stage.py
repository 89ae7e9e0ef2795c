"""Stage 6: export AudioVisualCaps as Parquet in the Hugging Face ``datasets`` layout.

Reads the run folder (the clip table, the ledgers of stages 1-5 through their stage classes, whose
``output_schema()`` is the column contract, and ``05-review/reviews.parquet``) and writes
``DIR/export/``:

```
data/<config>/<split>-NNNNN-of-NNNNN.parquet   one config per training variant (random, concat,
                                              and, per_modality); every config has the same test
README.md                                     the dataset card (YAML ``configs:`` block first)
statistics.json                               counts, availability, review figures, Table-2 stats
LICENSE                                       the AudioCaps licence and the terms of this export
SHA256SUMS                                    sha256sum of every other file
```

The export is a pure function of the run folder and the config: rows are sorted by ``clip_id``,
Parquet files carry no timestamps and no pandas metadata, and the card has no dates, so two
exports of the same run are byte-identical. It is written to a temporary folder and swapped in
whole: a crash never leaves a half-written export behind.

Beside it, pure helpers: :mod:`~stages.export.variants` (the training variants),
:mod:`~stages.export.caption_stats` (Table-2 figures), :mod:`~stages.export.card` (the card and
its offline validation); the settings are :mod:`~stages.export.config`.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import AbortRun
from pipeline.io import atomic_path, atomic_write_text, file_digest
from pipeline.selection import expected_table, stage_ledger, stale_ids, to_python
from pipeline.stage import RunContext, RunOptions, Stage, WholeStage
from pipeline.text import squash_spaces
from stages.caption.config import CaptionConfig
from stages.caption.stage import CaptionStage, pick_frame
from stages.download.stage import DownloadStage
from stages.export.caption_stats import TOKENIZATION, caption_stats
from stages.export.card import render_card, validate_card
from stages.export.config import ExportConfig
from stages.export.scores import (
    DROPPED,
    add_percentiles,
    apply_visual_filter,
    raw_scores,
    score_fields,
    score_summary,
)
from stages.export.variants import build_variant, proper_nouns_from
from stages.keyframes import KeyframesStage, middle_index
from stages.manifest import ManifestConfig, ManifestStage
from stages.merge.stage import MergeStage
from stages.review.connection import PROJECT_FILE
from stages.review.pull import REVIEWS_FILE, agreement_figures, outdated_annotations, pull
from stages.review.push import ReviewStage

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

# The upstream stages, by class: their ledgers are read with their declared schemas (the column
# contract) from their folders (``dirname()``); no folder name is spelled out here.
DOWNLOAD, KEYFRAMES, CAPTION, MERGE, REVIEW = (
    DownloadStage,
    KeyframesStage,
    CaptionStage,
    MergeStage,
    ReviewStage,
)
log = logging.getLogger("avcaps")
INPUTS_FILE = "exported.parquet"  # in DIR/06-export: what each exported clip was made from
HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}
ACCEPTED = ("accept", "edited")
VERDICTS = (*ACCEPTED, "rejected")
UNREVIEWED = "unreviewed"


def row_schema(embed_media: bool) -> pa.Schema:
    """The columns of every config and split (one schema, so ``load_dataset`` joins the splits)."""
    import pyarrow as pa

    strs = pa.list_(pa.string())
    fields = [
        pa.field("clip_id", pa.string()),
        pa.field("youtube_id", pa.string()),
        pa.field("start_time", pa.int32()),
        pa.field("end_time", pa.int32()),
        pa.field("split", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("captions", strs),
        pa.field("caption_sources", strs),
        pa.field("audio_captions", strs),
        pa.field("audiocap_ids", pa.list_(pa.int64())),
        pa.field("visual_caption", pa.string()),
        pa.field("frame_captions", strs),
        pa.field("merged_captions", strs),
        pa.field("review_verdict", pa.string()),
        pa.field("variant", pa.string()),
        pa.field("video_path", pa.string()),
        # Where stage 1 took the picture and the sound from (kind:name of the source).
        pa.field("video_source", pa.string()),
        pa.field("audio_source", pa.string()),
        pa.field("frame_path", pa.string()),
        pa.field("frame_time_s", pa.float64()),
        pa.field("audio_path", pa.string()),
        pa.field("flag_black_frame", pa.bool_()),
        pa.field("flag_silent", pa.bool_()),
        pa.field("stale", pa.bool_()),  # made from settings or upstream results changed since
        pa.field("caption_model", pa.string()),
        pa.field("caption_revision", pa.string()),
        pa.field("merge_model", pa.string()),
        pa.field("merge_backend", pa.string()),
        pa.field("merge_prompt_hash", pa.string()),
        # Quality scores: raw, run percentiles, the visual-caption filter (stages/export/scores.py).
        *score_fields(),
    ]
    metadata = None
    if embed_media:
        media = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
        fields += [pa.field("image", media), pa.field("audio", media)]
        # datasets reads feature types from this key (per field, where the Arrow type matches).
        features = {"image": {"_type": "Image"}, "audio": {"_type": "Audio"}}
        metadata = {b"huggingface": json.dumps({"info": {"features": features}}, sort_keys=True).encode()}
    return pa.schema(fields, metadata=metadata)


# -- reading the run folder ------------------------------------------------------------------------
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


# -- what is exported ---------------------------------------------------------------------------------
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
    upstream rows) stops the export the same way, unless ``include_stale`` (it is then flagged). A
    review made on an earlier merge of its clip is no review of the current one.
    """
    clips = tables.clips
    problems: list[str] = []
    plan = Plan()
    splits = [s for s in HF_SPLITS if s in set(clips["split"])]
    merged = tables.ok_ids(MERGE)
    reviewed = current_reviews(tables)
    for split in splits:
        ids = set(clips.index[clips["split"] == split])
        avail: dict[str, Any] = {"clips": len(ids)}
        current = ids
        through = [DOWNLOAD, KEYFRAMES, CAPTION]
        for stage in (DOWNLOAD, KEYFRAMES, CAPTION):
            n = _missing(tables, stage, current)
            if n:
                problems.append(_missing_line(stage, n, len(current), split))
            avail[f"failed_{stage.name}"] = tables.failed(stage, current)
            current = current & tables.ok_ids(stage)
        avail["with_captions"] = len(current)
        if split == "test":
            n = _missing(tables, MERGE, current)
            if n:
                problems.append(_missing_line(MERGE, n, len(current), split))
            avail["failed_merge"] = tables.failed(MERGE, current)
            current = current & merged
            through += [MERGE, REVIEW]
            unreviewed = current - set(reviewed)
            if unreviewed and not allow_unreviewed:
                problems.append(
                    _missing_line(REVIEW, len(unreviewed), len(current), split)
                    + " (pull the reviews, or include raw merges flagged with "
                    "--set export.allow_unreviewed=true)"
                )
        merge_df = tables.stages[MERGE]
        val_merged = split == "val" and merge_df is not None and bool(current & set(merge_df.index))
        if val_merged:
            # The merge stage ran on val: val is a merged split, and every val clip needs its merge.
            n = _missing(tables, MERGE, current)
            if n:
                problems.append(_missing_line(MERGE, n, len(current), split))
            avail["failed_merge"] = tables.failed(MERGE, current)
            current = current & merged
            through.append(MERGE)
        for stage in through:
            stale = current & tables.stale.get(stage, set())
            if stale and not include_stale:
                problems.append(
                    f"stage {stage.dirname()}: {len(stale)} of {len(current)} {split} item(s) are stale "
                    "(made with other settings or from older upstream results): run "
                    f"`avcaps run {stage.number}` (or export them flagged: --set export.include_stale=true)"
                )
            plan.stale |= stale
        if split == "test" or val_merged:
            plan.merged_splits.append(split)
            verdicts = {cid: reviewed.get(cid, UNREVIEWED) for cid in current}
            counts = {v: sum(1 for x in verdicts.values() if x == v) for v in (*VERDICTS, UNREVIEWED)}
            if split == "test":
                plan.review = counts
            avail["review"] = counts
            keep = {c for c, v in verdicts.items() if v in ACCEPTED or (v == UNREVIEWED and allow_unreviewed)}
            current = keep
        avail["exported"] = len(current)
        plan.availability[split] = avail
        plan.ids[split] = sorted(current)
    plan.stale &= {c for ids in plan.ids.values() for c in ids}
    if problems:
        raise AbortRun("upstream stages are not done:\n  " + "\n  ".join(problems))
    return plan


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


def _missing_line(stage: type[Stage], n: int, of: int, split: str) -> str:
    hint = f"run `avcaps run {stage.number}`" if stage is not REVIEW else "run the review stage and pull"
    return f"stage {stage.dirname()}: {n} of {of} {split} item(s) have no result yet ({hint})"


# -- building rows ------------------------------------------------------------------------------------
def _cell(tables: RunTables, stage: type[Stage], cid: str, column: str) -> Any:
    df = tables.stages[stage]
    if df is None or cid not in df.index or column not in df.columns:
        return None
    return to_python(df.at[cid, column])


def _str_list(value: Any) -> list[str]:
    return [squash_spaces(v) for v in (value or []) if squash_spaces(v)]


def _cells(tables: RunTables, stage: type[Stage], cid: str) -> dict[str, Any]:
    df = tables.stages[stage]
    if df is None or cid not in df.index:
        return {}
    return {k: to_python(v) for k, v in df.loc[cid].items()}


def media_sources(tables: RunTables, cid: str) -> dict[str, str | None]:
    """The sources of a clip's picture and sound; rows from before stage 1 had sources name none,
    and came from YouTube."""
    old = "youtube:youtube" if _cell(tables, DOWNLOAD, cid, "source_url") else None
    return {
        "video_source": _cell(tables, DOWNLOAD, cid, "video_source") or old,
        "audio_source": _cell(tables, DOWNLOAD, cid, "audio_source") or old,
    }


def base_row(tables: RunTables, cid: str, caption_frame: str | int = "middle") -> dict[str, Any]:
    """Everything about a clip except its references (same in every config); its scores are raw
    here (percentiles come from the whole export: :func:`~stages.export.scores.add_percentiles`)."""
    clip = {k: to_python(v) for k, v in tables.clips.loc[cid].items()}
    frames = _cell(tables, KEYFRAMES, cid, "frame_paths") or []
    times = _cell(tables, KEYFRAMES, cid, "frame_times_s") or []
    middle = _cell(tables, KEYFRAMES, cid, "middle_frame")
    mid = middle_index(len(frames), middle)
    caption_row = _cells(tables, CAPTION, cid)
    n_caps = len(caption_row.get("frame_captions") or [])
    scores = raw_scores(
        caption_row,
        _cells(tables, MERGE, cid),
        clip,
        pick_frame(caption_frame, n_caps, middle if isinstance(middle, int) else None) if n_caps else None,
    )
    return {
        "clip_id": cid,
        "youtube_id": clip["youtube_id"],
        "start_time": clip["start_s"],
        "end_time": clip["end_s"],
        "split": clip["split"],
        "audio_captions": _str_list(clip["audio_captions"]),
        "audiocap_ids": list(clip.get("audiocap_ids") or []),
        "visual_caption": squash_spaces(_cell(tables, CAPTION, cid, "visual_caption")),
        "frame_captions": [squash_spaces(c) for c in _cell(tables, CAPTION, cid, "frame_captions") or []],
        "merged_captions": _str_list(_cell(tables, MERGE, cid, "merged_captions")),
        "video_path": _cell(tables, DOWNLOAD, cid, "video_path"),
        **media_sources(tables, cid),
        "frame_path": frames[mid] if mid is not None else None,
        "frame_time_s": float(times[mid]) if mid is not None and mid < len(times) else None,
        "audio_path": _cell(tables, KEYFRAMES, cid, "audio_path"),
        "flag_black_frame": _cell(tables, KEYFRAMES, cid, "flag_black_frame"),
        "flag_silent": _cell(tables, KEYFRAMES, cid, "flag_silent"),
        "caption_model": _cell(tables, CAPTION, cid, "caption_model"),
        "caption_revision": _cell(tables, CAPTION, cid, "caption_revision"),
        "merge_model": _cell(tables, MERGE, cid, "merge_model"),
        "merge_backend": _cell(tables, MERGE, cid, "merge_backend"),
        "merge_prompt_hash": _cell(tables, MERGE, cid, "merge_prompt_hash"),
        **scores,
    }


def merged_references(tables: RunTables, row: dict[str, Any]) -> tuple[list[str], str]:
    """Reviewed final captions (or the raw merges of an unreviewed clip) and the verdict."""
    reviews = tables.reviews
    cid = row["clip_id"]
    if reviews is not None and cid in reviews.index:
        verdict = str(reviews.at[cid, "verdict"])
        final = _str_list(to_python(reviews.at[cid, "final_captions"]))
        return (final or row["merged_captions"]), verdict
    return row["merged_captions"], UNREVIEWED


def build_rows(
    tables: RunTables,
    plan: Plan,
    variant: str,
    cfg: ExportConfig,
    proper_nouns: frozenset[str],
    bases: dict[str, dict[str, Any]],
) -> dict[str, list[dict[str, Any]]]:
    """The rows of one config, per split, sorted by ``clip_id`` (``bases``: :func:`base_row` by id)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for split, ids in plan.ids.items():
        rows = []
        for cid in ids:
            row = dict(bases[cid])
            if split in plan.merged_splits:
                refs, verdict = merged_references(tables, row)
                sources = ["merged"] * len(refs)
                row["review_verdict"] = verdict
            else:
                refs, sources = build_variant(
                    variant,
                    row["audio_captions"],
                    # A visual caption dropped by export.min_visual_clip_percentile: as if empty.
                    "" if row.get(DROPPED) else row["visual_caption"],
                    clip_id=cid,
                    seed=cfg.seed,
                    proper_nouns=proper_nouns,
                )
                row["review_verdict"] = None
            row.update(
                caption=refs[0] if refs else "",
                captions=refs,
                caption_sources=sources,
                variant=variant,
                stale=cid in plan.stale,
            )
            rows.append(row)
        out[split] = rows
    return out


MEDIA_COLUMNS = (("image", "frame_path"), ("audio", "audio_path"))


def drop_missing_media(
    plan: Plan, bases: dict[str, dict[str, Any]], workdir: Path, excluded: dict[str, str]
) -> None:
    """Embedding media: a clip whose keyframe or audio file is gone is excluded, named, counted."""
    for split, ids in plan.ids.items():
        kept = []
        for cid in ids:
            missing = [
                key
                for _, key in MEDIA_COLUMNS
                if not bases[cid][key] or not (workdir / bases[cid][key]).is_file()
            ]
            if missing:
                excluded[cid] = "media missing: " + ", ".join(
                    f"{key}={bases[cid][key] or '(none in the ledger)'}" for key in missing
                )
            else:
                kept.append(cid)
        plan.availability[split]["media_missing"] = len(ids) - len(kept)
        plan.availability[split]["exported"] = len(kept)
        plan.ids[split] = kept


def _with_media(row: dict[str, Any], workdir: Path) -> dict[str, Any]:
    media = {}
    for column, key in MEDIA_COLUMNS:
        path = workdir / row[key]
        media[column] = {"bytes": path.read_bytes(), "path": path.name}
    return {**row, **media}


def _row_bytes(row: dict[str, Any], workdir: Path, embed: bool) -> int:
    """Uncompressed size of a row: its text, plus its media files when they are embedded."""
    size = len(json.dumps(row, default=str))
    if embed:
        size += sum((workdir / row[key]).stat().st_size for _, key in MEDIA_COLUMNS)
    return size


# -- writing ------------------------------------------------------------------------------------------
def write_shards(
    rows: list[dict[str, Any]],
    schema: pa.Schema,
    folder: Path,
    split: str,
    max_bytes: int,
    workdir: Path,
    embed: bool,
) -> list[Path]:
    """``<split>-NNNNN-of-NNNNN.parquet`` shards of at most ``max_bytes`` uncompressed each.

    Rows are grouped greedily in ``clip_id`` order (a row larger than the bound gets its own
    shard); media is read shard by shard, so memory holds one shard's media at most.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    groups: list[list[dict[str, Any]]] = []
    size = 0
    for row in rows:
        n = _row_bytes(row, workdir, embed)
        if not groups or (groups[-1] and size + n > max_bytes):
            groups.append([])
            size = 0
        groups[-1].append(row)
        size += n
    # An empty split is left out: datasets cannot read a 0-row shard.
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, group in enumerate(groups):
        if embed:
            group = [_with_media(row, workdir) for row in group]
        table = pa.Table.from_pylist(group, schema=schema)
        path = folder / f"{split}-{i:05d}-of-{len(groups):05d}.parquet"
        # Parquet keeps no write time; created_by names the pyarrow version only.
        pq.write_table(table, path, compression="zstd", row_group_size=10_000)
        paths.append(path)
    return paths


def write_checksums(folder: Path) -> Path:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    lines = [f"{file_digest(p)}  {p.relative_to(folder).as_posix()}" for p in files]
    dest = folder / "SHA256SUMS"
    dest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest


def swap_in(new: Path, dest: Path) -> None:
    """Replace ``dest`` by ``new`` (both folders): rename old away, rename new in, remove old."""
    old = dest.with_name(f".tmp-old-{uuid.uuid4().hex[:8]}-{dest.name}")
    if dest.exists():
        dest.rename(old)
    new.rename(dest)
    if old.exists():
        shutil.rmtree(old)


def compute_statistics(
    rows_by_variant: dict[str, dict[str, list[dict[str, Any]]]], plan: Plan
) -> dict[str, Any]:
    """Table-2-style figures per split: AudioCaps vs AudioVisualCaps (per variant where it applies)."""
    stats: dict[str, Any] = {"tokenization": TOKENIZATION, "splits": {}}
    any_variant = next(iter(rows_by_variant.values()))
    for split, rows in any_variant.items():
        entry: dict[str, Any] = {
            "AudioCaps": caption_stats(c for r in rows for c in r["audio_captions"]).as_dict()
        }
        if split in plan.merged_splits:
            entry["AudioVisualCaps"] = caption_stats(c for r in rows for c in r["captions"]).as_dict()
        else:
            for variant, by_split in rows_by_variant.items():
                entry[f"AudioVisualCaps ({variant})"] = caption_stats(
                    c for r in by_split[split] for c in r["captions"]
                ).as_dict()
        stats["splits"][HF_SPLITS[split]] = entry
    return stats


def provenance(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("caption_model", "caption_revision", "merge_model", "merge_backend", "merge_prompt_hash")
    out: dict[str, Any] = {k: sorted({str(r[k]) for r in rows if r.get(k)}) for k in keys}
    # Exported clips per source of their picture and of their sound (stage 1's sources).
    for key, col in (("video_sources", "video_source"), ("audio_sources", "audio_source")):
        counts: dict[str, int] = {}
        for r in rows:
            name = str(r.get(col) or "unknown")
            counts[name] = counts.get(name, 0) + 1
        out[key] = dict(sorted(counts.items()))
    return out


class ExportStage(WholeStage[ExportConfig]):
    # The frame whose caption is the clip's visual caption (caption.caption_frame); the CSVs'
    # folder, for the AudioCaps licence (manifest.csv_dir).
    uses = (CaptionConfig, ManifestConfig)
    number = 6
    name = "export"
    upstream = "review"
    description = "Write the dataset: Parquet configs per training variant, card, statistics, checksums."

    def _pull_reviews(self) -> None:
        """The reviews are pulled as part of the export, so it never ships stale references."""
        try:
            report = pull(self.ctx)
        except AbortRun as exc:
            raise AbortRun(
                f"{exc} (set export.pull_reviews=false to export the reviews pulled last)"
            ) from exc
        for line in report.lines():
            log.info("review pull: %s", line)

    def _record_inputs(self, tables: RunTables, plan: Plan) -> None:
        """What each exported clip was made from (the fingerprint of the last stage it went
        through), so ``avcaps status`` can tell how many exported clips are stale since."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = []
        for split, ids in plan.ids.items():
            stage = MERGE if split in plan.merged_splits else CAPTION
            df = tables.stages[stage]
            for cid in ids:
                fp = to_python(df.at[cid, "fingerprint"]) if df is not None and cid in df.index else None
                rows.append({"clip_id": cid, "stage": stage.dirname(), "fingerprint": fp})
        schema = pa.schema([("clip_id", pa.string()), ("stage", pa.string()), ("fingerprint", pa.string())])
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.folder / INPUTS_FILE) as tmp:
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)

    def stale_count(self) -> int | None:
        """Exported clips whose last stage's row would be made differently now (settings or
        upstream results changed since the export)."""
        import pyarrow.parquet as pq

        path = self.folder / INPUTS_FILE
        if not path.exists():
            return None
        exported = pq.read_table(path).to_pylist()
        expected: dict[str, dict[str, str]] = {}
        for stage in {r["stage"] for r in exported}:
            cls = MERGE if stage == MERGE.dirname() else CAPTION
            try:
                table = expected_table(cls, self.ctx).to_pydict()
            except AbortRun:
                table = {"clip_id": [], "expected": []}
            expected[stage] = dict(zip(table["clip_id"], table["expected"], strict=True))
        return sum(
            1
            for r in exported
            if r["fingerprint"] is not None and expected[r["stage"]].get(r["clip_id"]) != r["fingerprint"]
        )

    def run(self, options: RunOptions) -> dict[str, Any]:
        cfg = self.cfg
        workdir = self.ctx.workdir
        if cfg.pull_reviews and (self.ctx.stage_dir(REVIEW) / PROJECT_FILE).exists():
            self._pull_reviews()
        tables = RunTables.read(workdir, self.ctx)
        plan = plan_export(tables, cfg.allow_unreviewed, cfg.include_stale)
        proper: frozenset[str] = frozenset()
        if cfg.proper_nouns_from_corpus:
            proper = proper_nouns_from(c for caps in tables.clips["audio_captions"] for c in to_python(caps))
        schema = row_schema(cfg.embed_media)
        caption_frame = self.section(CaptionConfig).caption_frame
        bases = {cid: base_row(tables, cid, caption_frame) for ids in plan.ids.values() for cid in ids}
        excluded: dict[str, str] = {}
        if cfg.embed_media:
            drop_missing_media(plan, bases, workdir, excluded)
        # Percentiles over every exported clip (each once), then the visual-caption filter.
        exported = [bases[cid] for ids in plan.ids.values() for cid in ids]
        add_percentiles(exported)
        variant_splits = set(plan.ids) - set(plan.merged_splits)
        visual_filter = apply_visual_filter(exported, variant_splits, cfg.min_visual_clip_percentile)
        rows_by_variant = {v: build_rows(tables, plan, v, cfg, proper, bases) for v in cfg.variants}
        dest = workdir / cfg.folder
        tmp = workdir / f".tmp-export-{uuid.uuid4().hex[:8]}"
        try:
            files: dict[str, dict[str, list[str]]] = {}
            for variant, by_split in rows_by_variant.items():
                files[variant] = {}
                for split, rows in by_split.items():
                    hf_split = HF_SPLITS[split]
                    paths = write_shards(
                        rows,
                        schema,
                        tmp / "data" / variant,
                        hf_split,
                        cfg.max_shard_bytes,
                        workdir,
                        cfg.embed_media,
                    )
                    if paths:
                        files[variant][hf_split] = [p.relative_to(tmp).as_posix() for p in paths]
            first = rows_by_variant[cfg.variants[0]]
            all_rows = [r for rows in first.values() for r in rows]
            counts = {HF_SPLITS[s]: len(r) for s, r in first.items()}
            statistics = {
                "counts": counts,
                "availability": {HF_SPLITS[s]: a for s, a in plan.availability.items()},
                "review": plan.review,
                "review_agreement": agreement_figures(workdir),
                "unreviewed_test_items": sum(
                    1 for r in first.get("test", []) if r["review_verdict"] == UNREVIEWED
                ),
                "stale_items": len(plan.stale),
                "outdated_reviews": tables.outdated_reviews,
                "excluded_media_missing": dict(sorted(excluded.items())),
                "variants": cfg.variants,
                "default_variant": cfg.default_variant
                if cfg.default_variant in cfg.variants
                else cfg.variants[0],
                "seed": cfg.seed,
                "embed_media": cfg.embed_media,
                "merged_splits": [HF_SPLITS[s] for s in plan.merged_splits],
                "provenance": provenance(all_rows),
                "scores": {
                    "population": "every exported clip once (all splits), per column, lists flattened",
                    "clips": len(exported),
                    "columns": score_summary(exported),
                    "score_models": sorted(
                        {str(r["score_models"]) for r in exported if r.get("score_models")}
                    ),
                    "clip_model": sorted({str(r["clip_model"]) for r in exported if r.get("clip_model")}),
                },
                "visual_filter": {
                    "min_visual_clip_percentile": cfg.min_visual_clip_percentile,
                    "splits": {HF_SPLITS[s]: c for s, c in sorted(visual_filter.items())},
                },
                "files": files,
                **compute_statistics(rows_by_variant, plan),
            }
            atomic_write_text(
                tmp / "statistics.json", json.dumps(statistics, indent=2, sort_keys=True) + "\n"
            )
            licence = self.section(ManifestConfig).csv_dir / "LICENSE"
            atomic_write_text(tmp / "LICENSE", license_text(licence))
            figures = []
            if cfg.figures:
                from stages.export.figures import write_figures

                figures = write_figures(tmp, exported, set(plan.merged_splits), statistics)
            atomic_write_text(tmp / "README.md", render_card(statistics, cfg, figures))
            validate_card(tmp / "README.md", tmp)
            write_checksums(tmp)
            swap_in(tmp, dest)
            self._record_inputs(tables, plan)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        flagged = statistics["unreviewed_test_items"]
        return {
            "message": f"exported {sum(counts.values())} clips ("
            + ", ".join(f"{s} {n}" for s, n in counts.items())
            + f") x {len(cfg.variants)} configs to {dest}"
            + (f"; {flagged} unreviewed test clips flagged" if flagged else ""),
            "folder": str(dest),
            "counts": counts,
            "review": plan.review,
            "unreviewed_test_items": flagged,
            "excluded_media_missing": len(excluded),
            "statistics": statistics["splits"],
        }


def license_text(audiocaps_license: Path) -> str:
    head = (
        "AudioVisualCaps export: terms\n"
        "=============================\n\n"
        "The audio captions are the AudioCaps captions: free to use for academic purposes only.\n"
        "The AudioCaps repository (CSV files) is distributed under the licence below. The visual and\n"
        "merged captions were generated by models (see the card) from YouTube content that is not\n"
        "part of this dataset; media embedded in a private copy remains the property of its owners.\n\n"
    )
    body = audiocaps_license.read_text(encoding="utf-8") if audiocaps_license.exists() else ""
    return head + ("AudioCaps licence\n-----------------\n\n" + body if body else "")
