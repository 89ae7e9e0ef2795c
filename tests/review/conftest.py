"""Fixtures of the review tests: run folders per the contract (the real Label Studio server,
``ls_server``, is in ``tests/conftest.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.stage import RunContext
from review.server import LabelStudioServer
from standins.review_run import TEST_CREDS as CREDS


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
