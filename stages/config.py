"""The schema of a run manifest (``manifests/*.yaml``): one section per stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from pipeline.config import RunConfigBase
from stages.caption.config import MOVED as CAPTION_MOVED
from stages.caption.config import CaptionConfig
from stages.download.stage import DownloadConfig
from stages.export.config import ExportConfig
from stages.keyframes import KeyframesConfig
from stages.manifest import ManifestConfig
from stages.merge.config import MOVED as MERGE_MOVED
from stages.merge.config import MergeConfig
from stages.publish import PublishConfig
from stages.review.connection import ReviewConfig
from stages.scoring import ScoringConfig, move_scorer_keys


class RunConfig(RunConfigBase):
    workdir: Path = Field(Path("runs/audiocaps"), description="Run folder: ledgers, media, export.")
    manifest: ManifestConfig = ManifestConfig()
    download: DownloadConfig = DownloadConfig()
    keyframes: KeyframesConfig = KeyframesConfig()
    caption: CaptionConfig = CaptionConfig()
    review: ReviewConfig = ReviewConfig()
    export: ExportConfig = ExportConfig()
    publish: PublishConfig = PublishConfig()
    merge: MergeConfig = MergeConfig()
    # The CLIP and CLAP scorers of stages 3 and 4 (their quality scores: a layer of their own).
    scoring: ScoringConfig = ScoringConfig()

    @model_validator(mode="before")
    @classmethod
    def _scorer_keys(cls, data: Any) -> Any:
        # Manifests (and run folders' config.yaml) written before the scoring: section existed.
        return move_scorer_keys(data, {"caption": CAPTION_MOVED, "merge": MERGE_MOVED})
