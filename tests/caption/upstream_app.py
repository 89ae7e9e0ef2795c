"""Test app (``AVCAPS_APP=upstream_app``): the real stages 0 and 3 with stand-ins for stages 1-2.

Stages 1 (download) and 2 (keyframes) are being written elsewhere; until they land, the caption
tests write those stages' ledgers by hand, to the column contract, and these classes only give the
engine their names, numbers and upstream links so that ``avcaps run caption`` finds its inputs.
They cannot run.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import AbortRun
from pipeline.stage import RunOptions, WholeStage

STAGES = [
    "stages.manifest:ManifestStage",
    "upstream_app:DownloadLedgerOnly",
    "upstream_app:KeyframesLedgerOnly",
    "stages.caption:CaptionStage",
]
CONFIG_MODEL = "stages.config:RunConfig"
COMMANDS: dict[str, str] = {}


class DownloadLedgerOnly(WholeStage):
    number = 1
    name = "download"
    upstream = "manifest"

    def run(self, options: RunOptions) -> dict[str, Any]:
        raise AbortRun("test stand-in: its ledger is written by the test")


class KeyframesLedgerOnly(WholeStage):
    number = 2
    name = "keyframes"
    upstream = "download"

    def run(self, options: RunOptions) -> dict[str, Any]:
        raise AbortRun("test stand-in: its ledger is written by the test")
