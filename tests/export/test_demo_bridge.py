"""The demo manifest's export and dry-run publish settings, on the demo's bridge run folder."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_demo_export_and_dry_run_publish(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import load_context
    from pipeline.runner import run_stage
    from pipeline.stage import RunOptions
    from stages.export import ExportStage
    from stages.publish import PublishStage
    from standins.demo import PREPARE

    with contextlib.ExitStack() as stack:
        overrides = PREPARE["export"](stack, tmp_path / "demo")
    if not overrides:
        pytest.skip("stages 1-5 are all registered: the demo runs them for real")
    ctx = load_context(REPO / "manifests/demo.yaml", None, tuple(overrides))
    assert ctx.workdir == tmp_path / "demo-contract"
    run_stage(ExportStage, ctx, RunOptions(progress=False))
    stats = json.loads((ctx.workdir / "export" / "statistics.json").read_text())
    assert stats["counts"] == {"test": 10}  # 12 clips: 1 not downloadable, 1 rejected
    assert stats["review"] == {"accept": 8, "edited": 1, "rejected": 1, "unreviewed": 1}
    assert stats["unreviewed_test_items"] == 1  # included, flagged (export.allow_unreviewed)
    run_stage(PublishStage, ctx, RunOptions(progress=False))
    out = capsys.readouterr().out
    assert "publish (dry run): nothing is sent" in out
    assert "repo: your-name/AudioVisualCaps-demo (dataset, private if created)" in out
