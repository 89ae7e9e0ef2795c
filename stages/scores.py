"""Quality signals shared by the stages that write them (3, 4) and those that read them (5, 6).

Raw CLIP/CLAP cosines are not comparable across models (nor across CLIP and CLAP), so every
score is also published as a percentile over the run: the share of the run's scores of the same
column that are at or below it. The ledgers keep raw values only; readers compute percentiles
over the rows they read, so a percentile always refers to a stated population.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

# Stage 3: one CLIP score per keyframe caption (keyframe i <-> frame caption i).
VISUAL_CLIP = "visual_clip_score"
# Stage 4: one score per merged caption (aligned with ``merged_captions``) ...
MERGE_CLAP = "merge_clap_score"
MERGE_CLIP = "merge_clip_score"
# ... and the same for what was merged: each source audio caption and the visual caption.
SOURCE_AUDIO_CLAP = "source_audio_clap_score"
SOURCE_AUDIO_CLIP = "source_audio_clip_score"
SOURCE_VISUAL_CLAP = "source_visual_clap_score"
SOURCE_VISUAL_CLIP = "source_visual_clip_score"


def caption_score_fields() -> list[pa.Field]:
    """Columns stage 3 adds to its ledger."""
    import pyarrow as pa

    return [
        pa.field(VISUAL_CLIP, pa.list_(pa.float32())),
        pa.field("clip_model", pa.string()),
    ]


def merge_score_fields() -> list[pa.Field]:
    """Columns stage 4 adds to its ledger."""
    import pyarrow as pa

    return [
        pa.field(MERGE_CLAP, pa.list_(pa.float32())),
        pa.field(MERGE_CLIP, pa.list_(pa.float32())),
        pa.field(SOURCE_AUDIO_CLAP, pa.list_(pa.float32())),
        pa.field(SOURCE_AUDIO_CLIP, pa.list_(pa.float32())),
        pa.field(SOURCE_VISUAL_CLAP, pa.float32()),
        pa.field(SOURCE_VISUAL_CLIP, pa.float32()),
        # How many answers the ``min_clap_percentile`` rule asked for (1 when it is off or the
        # first answer passed); the ledger keeps the best-scoring one.
        pa.field("merge_score_tries", pa.int32()),
        pa.field("score_models", pa.string()),  # JSON: {"clip": id@revision, "clap": id@revision}
    ]


def percentile_ranks(values: Any) -> Any:
    """Percentile (0-100) of each value among ``values``: the share of values at or below it.

    NaN stays NaN and is not counted. Ties share the highest rank, so the best score of a run
    is always 100 and a constant column is 100 everywhere.
    """
    import numpy as np

    v = np.asarray(values, dtype="float64")
    out = np.full(v.shape, np.nan)
    ok = ~np.isnan(v)
    finite = np.sort(v[ok])
    if finite.size:
        out[ok] = 100.0 * np.searchsorted(finite, v[ok], side="right") / finite.size
    return out
