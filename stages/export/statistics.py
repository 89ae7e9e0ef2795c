"""Stage 6, statistics: the figures of ``statistics.json`` (and so of the card)."""

from __future__ import annotations

from typing import Any

from stages.export.caption_stats import TOKENIZATION, caption_stats
from stages.export.config import ExportConfig
from stages.export.plan import HF_SPLITS, UNREVIEWED, Plan
from stages.export.rows import ExportRows
from stages.export.scores import score_summary
from stages.export.tables import RunTables


def export_statistics(
    cfg: ExportConfig,
    tables: RunTables,
    plan: Plan,
    rows: ExportRows,
    files: dict[str, dict[str, list[str]]],
    review_agreement: dict[str, Any],
) -> dict[str, Any]:
    """``statistics.json``: counts, availability, reviews, provenance, scores, the files written
    (``files``: per config and split) and the Table-2 figures; the card is rendered from it."""
    first = rows.by_variant[cfg.variants[0]]
    all_rows = [r for split_rows in first.values() for r in split_rows]
    exported = rows.exported
    return {
        "counts": {HF_SPLITS[s]: len(r) for s, r in first.items()},
        "availability": {HF_SPLITS[s]: a for s, a in plan.availability.items()},
        "review": plan.review,
        "review_agreement": review_agreement,
        "unreviewed_test_items": sum(1 for r in first.get("test", []) if r["review_verdict"] == UNREVIEWED),
        "stale_items": len(plan.stale),
        "outdated_reviews": tables.outdated_reviews,
        "excluded_media_missing": dict(sorted(rows.excluded.items())),
        "variants": cfg.variants,
        "default_variant": cfg.default_variant if cfg.default_variant in cfg.variants else cfg.variants[0],
        "seed": cfg.seed,
        "embed_media": cfg.embed_media,
        "merged_splits": [HF_SPLITS[s] for s in plan.merged_splits],
        "provenance": provenance(all_rows),
        "scores": {
            "population": "every exported clip once (all splits), per column, lists flattened",
            "clips": len(exported),
            "columns": score_summary(exported),
            "score_models": sorted({str(r["score_models"]) for r in exported if r.get("score_models")}),
            "clip_model": sorted({str(r["clip_model"]) for r in exported if r.get("clip_model")}),
        },
        "visual_filter": {
            "min_visual_clip_percentile": cfg.min_visual_clip_percentile,
            "splits": {HF_SPLITS[s]: c for s, c in sorted(rows.visual_filter.items())},
        },
        "files": files,
        **compute_statistics(rows.by_variant, plan),
    }


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
