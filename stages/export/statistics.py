"""Stage 6, statistics: the figures of ``statistics.json`` (and so of the card)."""

from __future__ import annotations

from typing import Any

from stages.export.caption_stats import TOKENIZATION, caption_stats
from stages.export.plan import HF_SPLITS, Plan


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
