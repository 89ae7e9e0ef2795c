"""A toy application of two chained item stages for the fingerprint tests (``AVCAPS_APP=fpapp``).

``toy`` (stage 1) is the toy stage of :mod:`toyapp`, whose ``flavour`` setting changes its output;
``echo`` (stage 2) copies each clip's ``toy_out`` and has a ``tag`` setting of its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import Field
from toyapp import ToySection

from pipeline.config import RunConfigBase, StageConfig
from pipeline.errors import PermanentError
from pipeline.stage import Item, ItemStage, Result
from stages.manifest import ManifestConfig

STAGES = ["stages.manifest:ManifestStage", "toyapp:ToyStage", "fpapp:EchoStage"]
CONFIG_MODEL = "fpapp:FpConfig"
COMMANDS: dict[str, str] = {}
GROUP_COLUMN = "split"


class EchoSection(StageConfig):
    tag: str = "v1"
    fail: Path | None = Field(None, description="JSON list of clip ids that fail for good.")


class FpConfig(RunConfigBase):
    workdir: Path = Path("runs/fp")
    manifest: ManifestConfig = ManifestConfig()
    toy: ToySection = ToySection()
    echo: EchoSection = EchoSection()


class EchoStage(ItemStage):
    number = 2
    name = "echo"
    upstream = "toy"

    @classmethod
    def output_schema(cls) -> list[pa.Field]:
        return [pa.field("echo", pa.string())]

    def fingerprint_settings(self) -> dict[str, Any]:
        return {"tag": self.stage_config.tag}  # type: ignore[attr-defined]

    def process(self, batch: list[Item]) -> list[Result]:
        cfg = self.stage_config
        failing = set(json.loads(cfg.fail.read_text())) if cfg.fail else set()  # type: ignore[attr-defined]
        out = []
        for it in batch:
            if it.clip_id in failing:
                out.append(Result.failed(it.clip_id, PermanentError("echo_broken", "the echo failed")))
            else:
                out.append(Result.ok(it.clip_id, echo=f"{it.data['toy_out']}/{cfg.tag}"))  # type: ignore[attr-defined]
        return out
