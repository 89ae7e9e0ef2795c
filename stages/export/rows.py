"""Stage 6, the rows: the columns every config shares, each clip's row in each config, and (media
embedded) the planned clips left out because their keyframe or audio file is gone."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.selection import to_python
from pipeline.stage import Stage
from pipeline.text import squash_spaces
from stages.caption.stage import pick_frame
from stages.export.config import ExportConfig
from stages.export.plan import UNREVIEWED, Plan
from stages.export.scores import DROPPED, add_percentiles, apply_visual_filter, raw_scores, score_fields
from stages.export.tables import CAPTION, DOWNLOAD, KEYFRAMES, MERGE, RunTables
from stages.export.variants import build_variant, proper_nouns_from
from stages.keyframes import middle_index

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass
class ExportRows:
    """The rows of an export (:func:`export_rows`)."""

    by_variant: dict[str, dict[str, list[dict[str, Any]]]]  # config -> split -> rows, clip_id order
    exported: list[dict[str, Any]]  # every exported clip once: its base row, with percentiles
    visual_filter: dict[str, dict[str, int]]  # split -> visual captions dropped (apply_visual_filter)
    excluded: dict[str, str]  # clip_id -> why it was left out after planning (media missing)


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


MEDIA_COLUMNS = (("image", "frame_path"), ("audio", "audio_path"))  # embedded column, from the file at


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


def export_rows(
    tables: RunTables, plan: Plan, cfg: ExportConfig, caption_frame: str | int, workdir: Path
) -> ExportRows:
    """The rows of every config. With ``export.embed_media``, a planned clip whose media is gone is
    left out first (:func:`drop_missing_media`); percentiles are then taken over every exported
    clip (each once), before the visual-caption filter that the variants read."""
    proper: frozenset[str] = frozenset()
    if cfg.proper_nouns_from_corpus:
        proper = proper_nouns_from(c for caps in tables.clips["audio_captions"] for c in to_python(caps))
    bases = {cid: base_row(tables, cid, caption_frame) for ids in plan.ids.values() for cid in ids}
    excluded: dict[str, str] = {}
    if cfg.embed_media:
        drop_missing_media(plan, bases, workdir, excluded)
    exported = [bases[cid] for ids in plan.ids.values() for cid in ids]
    add_percentiles(exported)
    variant_splits = set(plan.ids) - set(plan.merged_splits)
    visual_filter = apply_visual_filter(exported, variant_splits, cfg.min_visual_clip_percentile)
    by_variant = {v: build_rows(tables, plan, v, cfg, proper, bases) for v in cfg.variants}
    return ExportRows(by_variant, exported, visual_filter, excluded)
