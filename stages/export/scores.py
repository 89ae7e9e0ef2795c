"""The quality scores in the export: raw, as run percentiles, and the visual-caption filter.

Stages 3 and 4 write raw CLIP/CLAP cosines (``stages/scores.py``). The export carries them as they
are and ranks each as a **percentile over the export**: the population of a column is every value
of it among all exported clips (every split, each clip once), lists flattened (one value per
caption); a null is no value and is not counted. A clip without scores (a run with scoring off,
rows from before scoring existed) exports nulls.

``export.min_visual_clip_percentile`` (off by default) drops the visual captions whose CLIP
percentile (``visual_caption_clip_percentile``: the score of the frame whose caption is the clip's
visual caption, ranked among the exported clips' visual captions) is below it from the references
of the splits built by a training variant (train, and validation unless it was merged): the clip
keeps its audio caption(s), and every variant treats the dropped caption as it treats an empty one
(:mod:`~stages.export.variants`): ``random`` always picks the audio caption, ``concat`` and ``and``
give the audio caption alone (``concat`` still as a sentence), ``per_modality`` has no visual
reference. The ``visual_caption`` column keeps the caption, and ``visual_caption_dropped`` says
which were dropped. A clip with no score is never dropped (it is counted as unscored). Merged
splits are never filtered: their references are the reviewed merges.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.text import squash_spaces
from stages.scores import (
    MERGE_CLAP,
    MERGE_CLIP,
    SOURCE_AUDIO_CLAP,
    SOURCE_AUDIO_CLIP,
    SOURCE_VISUAL_CLAP,
    SOURCE_VISUAL_CLIP,
    VISUAL_CLIP,
    cell_percentiles,
)

if TYPE_CHECKING:
    import pyarrow as pa

VISUAL_CAPTION_CLIP = "visual_caption_clip_score"
DROPPED = "visual_caption_dropped"
#: Export score columns: (name, is a list, what it is aligned with / means).
SCORE_COLUMNS: tuple[tuple[str, bool, str], ...] = (
    (VISUAL_CLIP, True, "CLIP keyframe <-> caption, one per `frame_captions` entry (stage 3)"),
    (VISUAL_CAPTION_CLIP, False, "the `visual_clip_score` of the frame whose caption is `visual_caption`"),
    (MERGE_CLAP, True, "CLAP audio <-> merged caption, one per `merged_captions` entry (stage 4)"),
    (MERGE_CLIP, True, "CLIP keyframe <-> merged caption, one per `merged_captions` entry (stage 4)"),
    (SOURCE_AUDIO_CLAP, True, "CLAP audio <-> audio caption, one per `audio_captions` entry (stage 4)"),
    (SOURCE_AUDIO_CLIP, True, "CLIP keyframe <-> audio caption, one per `audio_captions` entry (stage 4)"),
    (SOURCE_VISUAL_CLAP, False, "CLAP audio <-> the visual caption that was merged (stage 4)"),
    (SOURCE_VISUAL_CLIP, False, "CLIP keyframe <-> the visual caption that was merged (stage 4)"),
)


def percentile_name(column: str) -> str:
    return column.removesuffix("_score") + "_percentile"


def score_fields() -> list[pa.Field]:
    """The export's score columns (raw, percentile), the filter's flag and the scorers' ids."""
    import pyarrow as pa

    fields = []
    for name, is_list, _ in SCORE_COLUMNS:
        typ = pa.list_(pa.float32()) if is_list else pa.float32()
        fields += [pa.field(name, typ), pa.field(percentile_name(name), typ)]
    return [
        *fields,
        pa.field(DROPPED, pa.bool_()),
        pa.field("clip_model", pa.string()),
        pa.field("score_models", pa.string()),
    ]


def _num(x: Any) -> float | None:
    """A score cell as a float; null and NaN (a null float cell read through pandas) are None."""
    if x is None:
        return None
    f = float(x)
    return None if f != f else f


def _aligned(texts: Any, scores: Any, keep: Any = None) -> list[float | None] | None:
    """``scores`` of the entries of ``texts`` that the export keeps (``keep``: non-empty ones by
    default); None when there are none or they do not match the captions one to one."""
    if scores is None or texts is None:
        return None
    texts, scores = list(texts), list(scores)
    if len(texts) != len(scores):
        return None  # scores of other captions than these: not shown as theirs
    keep = keep or (lambda t: bool(squash_spaces(t)))
    return [_num(s) for s, t in zip(scores, texts, strict=True) if keep(t)]


def visual_caption_score(
    visual: str, frame_captions: list[str], frame_scores: list[float | None] | None, index: int | None
) -> float | None:
    """The CLIP score of the frame whose caption is the clip's visual caption: the frame stage 3
    picks (``caption.caption_frame``, ``index``), else the first frame with the same text."""
    if not frame_scores or not squash_spaces(visual):
        return None
    caps = [squash_spaces(c) for c in frame_captions]
    want = squash_spaces(visual)
    if index is not None and 0 <= index < len(caps) and caps[index] == want:
        return frame_scores[index]
    return next((frame_scores[k] for k, c in enumerate(caps) if c == want), None)


def raw_scores(
    caption_row: dict[str, Any], merge_row: dict[str, Any], clip_row: dict[str, Any], frame_index: int | None
) -> dict[str, Any]:
    """One clip's raw score cells, aligned with its exported caption lists (``*_row``: the clip's
    ledger cells, as Python values; missing keys are nulls)."""
    frames = list(caption_row.get("frame_captions") or [])
    frame_scores = _aligned(frames, caption_row.get(VISUAL_CLIP), keep=lambda t: True)
    merged = merge_row.get("merged_captions")
    audio = clip_row.get("audio_captions")
    out = {
        VISUAL_CLIP: frame_scores,
        VISUAL_CAPTION_CLIP: visual_caption_score(
            str(caption_row.get("visual_caption") or ""), frames, frame_scores, frame_index
        ),
        MERGE_CLAP: _aligned(merged, merge_row.get(MERGE_CLAP)),
        MERGE_CLIP: _aligned(merged, merge_row.get(MERGE_CLIP)),
        SOURCE_AUDIO_CLAP: _aligned(audio, merge_row.get(SOURCE_AUDIO_CLAP)),
        SOURCE_AUDIO_CLIP: _aligned(audio, merge_row.get(SOURCE_AUDIO_CLIP)),
        SOURCE_VISUAL_CLAP: _num(merge_row.get(SOURCE_VISUAL_CLAP)),
        SOURCE_VISUAL_CLIP: _num(merge_row.get(SOURCE_VISUAL_CLIP)),
        "clip_model": caption_row.get("clip_model"),
        "score_models": merge_row.get("score_models"),
    }
    return out


def add_percentiles(rows: list[dict[str, Any]]) -> None:
    """Each score column's percentiles over ``rows`` (every exported clip once), in place."""
    for name, _, _ in SCORE_COLUMNS:
        for row, pct in zip(rows, cell_percentiles([r.get(name) for r in rows]), strict=True):
            row[percentile_name(name)] = pct


def apply_visual_filter(
    rows: list[dict[str, Any]], variant_splits: set[str], min_percentile: float | None
) -> dict[str, dict[str, int]]:
    """Mark ``visual_caption_dropped`` on every row (in place) and count, per split built by a
    variant: visual captions (non-empty), dropped, unscored (kept: no score to judge by)."""
    counts: dict[str, dict[str, int]] = {}
    pct_name = percentile_name(VISUAL_CAPTION_CLIP)
    for row in rows:
        row[DROPPED] = False
        split = row["split"]
        if split not in variant_splits or not squash_spaces(row.get("visual_caption") or ""):
            continue
        c = counts.setdefault(split, {"visual_captions": 0, "dropped": 0, "unscored": 0})
        c["visual_captions"] += 1
        pct = row.get(pct_name)
        if pct is None:
            c["unscored"] += 1
        elif min_percentile is not None and pct < min_percentile:
            row[DROPPED] = True
            c["dropped"] += 1
    return counts


def score_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per score column: how many values and clips have one, and the raw min / median / max."""
    import numpy as np

    out: dict[str, Any] = {}
    for name, is_list, _ in SCORE_COLUMNS:
        values: list[float] = []
        clips = 0
        for r in rows:
            cell = r.get(name)
            got = (
                [v for v in (cell if is_list else [cell]) or [] if v is not None] if cell is not None else []
            )
            values += [float(v) for v in got]
            clips += bool(got)
        entry: dict[str, Any] = {"values": len(values), "clips": clips}
        if values:
            v = np.asarray(values)
            entry.update(
                min=round(float(v.min()), 4),
                median=round(float(np.median(v)), 4),
                max=round(float(v.max()), 4),
            )
        out[name] = entry
    return out
