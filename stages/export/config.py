"""Stage 6's section of the run manifest (``export:``): configs (training variants), review and media."""

from __future__ import annotations

from pydantic import Field, field_validator

from pipeline.config import StrictModel
from stages.export.variants import VARIANTS, UnknownVariant, check_variants


class ExportConfig(StrictModel):
    folder: str = Field("export", description="Export folder inside the run folder.")
    variants: list[str] = Field(
        list(VARIANTS), description=f"Configs to write, one per training variant: {', '.join(VARIANTS)}."
    )
    default_variant: str = Field("and", description="The config `load_dataset(path)` loads by default.")
    seed: int = Field(0, description="Seed of the `random` variant (recorded in the card).")
    allow_unreviewed: bool = Field(
        False,
        description="Include test clips without a review, with their raw merges flagged 'unreviewed'.",
    )
    include_stale: bool = Field(
        False,
        description="Export clips whose rows are stale (made with settings or upstream results changed "
        "since), flagged in the `stale` column; by default the export stops and names the stage to rerun.",
    )
    pull_reviews: bool = Field(
        True,
        description="First pull the latest reviews from Label Studio when the run has a review project; "
        "false exports with the reviews pulled last.",
    )
    embed_media: bool = Field(
        False, description="Embed the middle keyframe and the audio (datasets Image/Audio features)."
    )
    max_shard_bytes: int = Field(
        256 * 1024 * 1024, gt=0, description="Upper bound of one Parquet shard (uncompressed rows + media)."
    )
    proper_nouns_from_corpus: bool = Field(
        True,
        description="`and` variant: keep the capital of words seen capitalised mid-caption, never lowercase.",
    )
    pretty_name: str = Field("AudioVisualCaps", description="Dataset name in the card.")
    min_visual_clip_percentile: float | None = Field(
        None,
        ge=0,
        le=100,
        description="Drop visual captions whose CLIP percentile over the export is below this from the "
        "references of the variant-built splits (train; validation unless merged): the clip keeps its "
        "audio caption(s), as with an empty visual caption. Clips without a score are kept. null = off.",
    )
    figures: bool = Field(
        True, description="Write the card's PNG figures (figures/*.png, matplotlib) and link them."
    )

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, value: list[str]) -> list[str]:
        try:
            return check_variants(value)
        except UnknownVariant as exc:
            raise ValueError(str(exc)) from None

    @field_validator("default_variant")
    @classmethod
    def _known_default(cls, value: str) -> str:
        try:
            check_variants([value])
        except UnknownVariant as exc:
            raise ValueError(str(exc)) from None
        return value
