"""The schema of a run manifest (``manifests/*.yaml``): one section per stage."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from pipeline.config import RunConfigBase
from stages.caption.config import CaptionConfig
from stages.download.stage import DownloadConfig
from stages.export.config import ExportConfig
from stages.keyframes import KeyframesConfig
from stages.manifest import ManifestConfig
from stages.merge.config import MergeConfig
from stages.publish import PublishConfig
from stages.review.connection import ReviewConfig
from stages.scoring import ScoringConfig


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
