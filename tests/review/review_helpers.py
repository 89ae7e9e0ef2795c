"""Helpers of the review tests (imported by the test modules; fixtures are in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

from pipeline.stage import RunContext
from stages.review.server import LabelStudioServer
from standins.review_run import REPO

# The team server's task pages: lower than every page size the pipeline asks for.
TEAM_PAGE_SIZE_MAX = 3


def make_run(
    workdir: Path, url: str, document_root: Path, clips: list[dict[str, Any]], share_media: bool, review: Any
) -> RunContext:
    from stages.config import RunConfig
    from standins.review_run import write_contract_run

    write_contract_run(workdir, clips, share_media=share_media)
    cfg = RunConfig.model_validate(
        {
            "workdir": str(workdir),
            "review": {"url": url, "document_root": str(document_root), **({"batch_size": 2} | review)},
        }
    )
    return RunContext(workdir=workdir, config=cfg)


def create_pat(url: str, legacy_key: str) -> str:
    """The user's personal access token (a JWT refresh token), made through the server's API as
    Account & Settings makes it; the server keeps one per user."""
    r = requests.post(f"{url}/api/token/", headers={"Authorization": f"Token {legacy_key}"}, timeout=30)
    assert r.status_code == 201, (r.status_code, r.text[:200])
    return str(r.json()["token"])


@dataclass
class TeamServer:
    """A Label Studio set up as a new organization's server is by default: personal access tokens
    only (legacy tokens turned off through the API), and task pages capped by the server
    (``TASK_API_PAGE_SIZE_MAX``)."""

    server: LabelStudioServer
    pat: str

    @property
    def url(self) -> str:
        return self.server.url


def write_config(ctx: RunContext) -> Path:
    """The run's config as a manifest file, for ``avcaps`` in a process of its own."""
    path = Path(ctx.workdir) / "review-test.yaml"
    review = ctx.config.review.model_dump(mode="json")  # type: ignore[attr-defined]
    path.write_text(yaml.safe_dump({"workdir": str(ctx.workdir), "review": review}))
    return path


def avcaps(args: list[str], api_key: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    """``avcaps ARGS`` in a process of its own, as a user runs it (key in the environment only)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO_")}
    env.pop("AVCAPS_APP", None)
    env |= {"LABEL_STUDIO_API_KEY": api_key, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)


def popen_avcaps(args: list[str], api_key: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO_")}
    env.pop("AVCAPS_APP", None)
    env |= {"LABEL_STUDIO_API_KEY": api_key, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
