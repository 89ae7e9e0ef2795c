"""Fixtures shared by several test folders: the real Label Studio server (review and end-to-end
tests), started once per session; the tiny random CLIP and CLAP scorers (stages 3 and 4), built
once per session."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from review.server import LabelStudioServer, build_template, free_port
from standins.review_run import REPO
from standins.review_run import TEST_CREDS as CREDS

LS_VENV = REPO / ".venv-labelstudio"


@pytest.fixture(scope="session")
def ls_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's local-files document root; every test run folder lives under it."""
    return tmp_path_factory.mktemp("ls-root")


@pytest.fixture(scope="session")
def ls_server(tmp_path_factory: pytest.TempPathFactory, ls_root: Path) -> Iterator[LabelStudioServer]:
    """The real Label Studio (``make review-venv``) on 127.0.0.1, from a pre-migrated data dir."""
    if not (LS_VENV / "bin" / "label-studio").exists():
        pytest.fail(f"Label Studio is not installed in {LS_VENV}: run `make review-venv` first")
    # Migrating a fresh data dir takes ~1 min; the migrated template is kept beside the server's
    # venv (so it goes when the venv is rebuilt) and each session starts from a copy of it.
    template = build_template(LS_VENV, LS_VENV / "avcaps-test-template", CREDS, ls_root)
    data = tmp_path_factory.mktemp("ls-data") / "label-studio"
    shutil.copytree(template, data)
    server = LabelStudioServer(LS_VENV, data, ls_root, CREDS, port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def scorer_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the tiny random CLIP (``clip-tiny``) and CLAP (``clap-tiny``), built once."""
    from standins.scorers import build_tiny_clap, build_tiny_clip

    root = tmp_path_factory.mktemp("scorers")
    build_tiny_clip(root / "clip-tiny")
    build_tiny_clap(root / "clap-tiny")
    return root


@pytest.fixture(scope="session")
def tiny_clip(scorer_models: Path) -> Path:
    return scorer_models / "clip-tiny"


@pytest.fixture(scope="session")
def tiny_clap(scorer_models: Path) -> Path:
    return scorer_models / "clap-tiny"
