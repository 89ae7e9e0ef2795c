"""Fixtures of the export/publish tests: run folders written to the column contract."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Loading a local folder needs no Hub; make sure nothing tries (set before datasets is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Manifests resolve relative paths against the current directory (the repo root)."""
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="session")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One contract run (6 clips per split, one failed download per split, every review verdict)."""
    from standins.contract_run import build_contract_run

    old = os.getcwd()
    os.chdir(REPO)
    try:
        workdir = tmp_path_factory.mktemp("run") / "run"
        probe = build_contract_run(workdir)  # to learn the sampled clip ids
        ids = sorted(probe.clips)
        by_split: dict[str, list[str]] = {}
        for cid in ids:
            by_split.setdefault(probe.clips[cid]["split"], []).append(cid)
        shutil.rmtree(workdir)
        failures = {by_split["train"][0]: "private", by_split["test"][0]: "removed"}
        test = by_split["test"]
        verdicts = {test[1]: "edited", test[2]: "rejected"}
        build_contract_run(workdir, download_failures=failures, verdicts=verdicts)
    finally:
        os.chdir(old)
    return workdir


@pytest.fixture
def run_copy(base_run: Path, tmp_path: Path) -> Callable[..., Path]:
    """A fresh copy of the base run folder (tests change it)."""

    def make(name: str = "run") -> Path:
        dest = tmp_path / name
        shutil.copytree(base_run, dest)
        return dest

    return make


def context(workdir: Path, *overrides: str) -> Any:
    from pipeline.cli import load_context

    return load_context(REPO / "manifests/audiocaps.yaml", workdir, tuple(overrides))


@pytest.fixture
def export() -> Callable[..., Path]:
    """Run stage 6 through the real runner; returns the export folder."""
    from pipeline.runner import run_stage
    from pipeline.stage import RunOptions
    from stages.export import ExportStage

    def run(workdir: Path, *overrides: str) -> Path:
        ctx = context(workdir, *overrides)
        run_stage(ExportStage, ctx, RunOptions(progress=False))
        return workdir / "export"

    return run
