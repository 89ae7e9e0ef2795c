"""The schema of a run manifest (``manifests/*.yaml``): one section per stage."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from pipeline.config import StrictModel
from stages.manifest import ManifestConfig
from stages.review import ReviewConfig


class RunConfig(StrictModel):
    workdir: Path = Field(Path("runs/audiocaps"), description="Run folder: ledgers, media, export.")
    manifest: ManifestConfig = ManifestConfig()
    review: ReviewConfig = ReviewConfig()
