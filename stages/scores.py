"""Quality signals shared by the stages that write them (3, 4) and those that read them (5, 6).

Raw CLIP/CLAP cosines are not comparable across models (nor across CLIP and CLAP), so every
score is also published as a percentile over the run: the share of the run's scores of the same
column that are at or below it. The ledgers keep raw values only; readers compute percentiles
over the rows they read, so a percentile always refers to a stated population.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# The run-percentile helper sits in the engine: stages 5 and 6 rank too.
from pipeline.ranks import cell_percentiles, percentile_ranks

if TYPE_CHECKING:
    import pyarrow as pa

# Stage 3: one CLIP score per keyframe caption (keyframe i <-> frame caption i).
VISUAL_CLIP = "visual_clip_score"
# Stage 4: one score per merged caption (aligned with ``merged_captions``), and the same for what
# was merged (each source audio caption, the visual caption). Stage 5 ranks them (risk) and shows
# them in its tasks; stage 6 exports them.
MERGE_CLAP = "merge_clap_score"
MERGE_CLIP = "merge_clip_score"
SOURCE_AUDIO_CLAP = "source_audio_clap_score"
SOURCE_AUDIO_CLIP = "source_audio_clip_score"
SOURCE_VISUAL_CLAP = "source_visual_clap_score"
SOURCE_VISUAL_CLIP = "source_visual_clip_score"

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


#: Stage 4's scores (what a review task shows, raw and as percentiles).
MERGE_SCORES: tuple[str, ...] = (
    MERGE_CLAP,
    MERGE_CLIP,
    SOURCE_AUDIO_CLAP,
    SOURCE_AUDIO_CLIP,
    SOURCE_VISUAL_CLAP,
    SOURCE_VISUAL_CLIP,
)
#: Stage 4's score columns (its layer: another scorer re-scores, the merges stay).
MERGE_SCORE_COLUMNS: tuple[str, ...] = (*MERGE_SCORES, "score_models")


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
