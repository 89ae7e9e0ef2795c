"""Fixtures of the review tests: the real Label Studio server, and run folders per the contract."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.stage import RunContext
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


@pytest.fixture
def review_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", CREDS.api_key)
    monkeypatch.delenv("AVCAPS_APP", raising=False)  # the real stages read the written ledgers


@pytest.fixture
def run_ctx(
    ls_server: LabelStudioServer, ls_root: Path, review_env: None, request: pytest.FixtureRequest
) -> Any:
    """A factory of run folders (under the document root) with their RunContext: stages 0-4 as
    a real run leaves them (``standins.review_run``), upstream failures and retries included."""
    from stages.config import RunConfig
    from standins.review_run import write_contract_run

    def make(name: str, clips: list[dict[str, Any]], share_media: bool = False, **review: Any) -> RunContext:
        workdir = ls_root / f"{request.node.name}-{name}"
        write_contract_run(workdir, clips, share_media=share_media)
        cfg = RunConfig.model_validate(
            {
                "workdir": str(workdir),
                "review": {
                    "url": ls_server.url,
                    "document_root": str(ls_root),
                    **({"batch_size": 2} | review),
                },
            }
        )
        return RunContext(workdir=workdir, config=cfg)

    return make
