"""Fixtures of the review tests: run folders per the contract (the real Label Studio server,
``ls_server``, is in ``tests/conftest.py``), personal access tokens made through the server's own
API, a second server set up as a team's default one, and the ``avcaps`` command in a process."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from pipeline.stage import RunContext
from stages.review.server import LabelStudioServer, free_port
from standins.review_run import REPO
from standins.review_run import TEST_CREDS as CREDS

sys.path.insert(0, str(Path(__file__).parent))  # review_helpers
from review_helpers import TEAM_PAGE_SIZE_MAX, TeamServer, create_pat, make_run

LS_VENV = REPO / ".venv-labelstudio"


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

    def make(name: str, clips: list[dict[str, Any]], share_media: bool = False, **review: Any) -> RunContext:
        workdir = ls_root / f"{request.node.name}-{name}"
        return make_run(workdir, ls_server.url, ls_root, clips, share_media, review)

    return make


@pytest.fixture(scope="session")
def admin_pat(ls_server: LabelStudioServer) -> str:
    return create_pat(ls_server.url, CREDS.api_key)


@pytest.fixture(scope="module")
def team_server(
    tmp_path_factory: pytest.TempPathFactory, ls_root: Path, ls_server: LabelStudioServer
) -> Iterator[TeamServer]:
    # ls_server has built the migrated template; this server starts from a copy of it (~4 s).
    data = tmp_path_factory.mktemp("ls-team") / "label-studio"
    shutil.copytree(LS_VENV / "avcaps-test-template", data)
    env = {"TASK_API_PAGE_SIZE_MAX": str(TEAM_PAGE_SIZE_MAX)}
    server = LabelStudioServer(LS_VENV, data, ls_root, CREDS, port=free_port(), extra_env=env)
    server.start()
    try:
        pat = create_pat(server.url, CREDS.api_key)
        r = requests.post(
            f"{server.url}/api/jwt/settings",
            headers={"Authorization": f"Token {CREDS.api_key}"},
            json={"api_tokens_enabled": True, "legacy_api_tokens_enabled": False},
            timeout=30,
        )
        assert r.status_code in (200, 201), (r.status_code, r.text[:200])
        legacy = requests.get(
            f"{server.url}/api/current-user/whoami",
            headers={"Authorization": f"Token {CREDS.api_key}"},
            timeout=30,
        )
        assert legacy.status_code == 401  # the server now refuses legacy tokens, as a team's does
        yield TeamServer(server, pat)
    finally:
        server.stop()


@pytest.fixture
def team_run(
    team_server: TeamServer, ls_root: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Any:
    """Run folders pushed to the team server, with its personal access token in the environment."""
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", team_server.pat)
    monkeypatch.delenv("AVCAPS_APP", raising=False)

    def make(name: str, clips: list[dict[str, Any]], **review: Any) -> RunContext:
        workdir = ls_root / f"team-{request.node.name}-{name}"
        return make_run(workdir, team_server.url, ls_root, clips, False, review)

    return make
