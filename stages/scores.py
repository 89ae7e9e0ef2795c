"""Quality signals shared by the stages that write them (3, 4) and those that read them (5, 6).

Raw CLIP/CLAP cosines are not comparable across models (nor across CLIP and CLAP), so every
score is also published as a percentile over the run: the share of the run's scores of the same
column that are at or below it. The ledgers keep raw values only; readers compute percentiles
over the rows they read, so a percentile always refers to a stated population.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# The run-percentile helper sits in the engine, below stage 5 (review/) and stage 6 that rank too.
from pipeline.ranks import cell_percentiles, percentile_ranks

# Stage 4: one score per merged caption (aligned with ``merged_captions``), and the same for what
# was merged (each source audio caption, the visual caption). Named once, in review.risk: stage 5
# reads them and may not import stages/, while stages may import review.
from review.risk import (
    MERGE_CLAP,
    MERGE_CLIP,
    SOURCE_AUDIO_CLAP,
    SOURCE_AUDIO_CLIP,
    SOURCE_VISUAL_CLAP,
    SOURCE_VISUAL_CLIP,
)

if TYPE_CHECKING:
    import pyarrow as pa

# Stage 3: one CLIP score per keyframe caption (keyframe i <-> frame caption i).
VISUAL_CLIP = "visual_clip_score"

__all__ = [
    "MERGE_CLAP",
    "MERGE_CLIP",
    "SOURCE_AUDIO_CLAP",
    "SOURCE_AUDIO_CLIP",
    "SOURCE_VISUAL_CLAP",
    "SOURCE_VISUAL_CLIP",
    "VISUAL_CLIP",
    "caption_score_fields",
    "cell_percentiles",
    "merge_score_fields",
    "percentile_ranks",
]


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
