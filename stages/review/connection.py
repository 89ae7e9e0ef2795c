"""The run's link to Label Studio, shared by stage 5's push, pull and CLI (and the export, which
pulls first): the ``review:`` settings (:class:`ReviewConfig`), the API key from the environment,
a checked client (:func:`connect`), and the project this run remembers in
``DIR/05-review/project.json`` (:func:`remembered_project`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from pipeline.config import StageConfig
from pipeline.errors import AbortRun

if TYPE_CHECKING:
    from stages.review.client import LabelStudio

PROJECT_FILE = "project.json"


class ReviewConfig(StageConfig):
    batch_size: int = Field(250, gt=0, description="Tasks per import call (and per ledger commit).")
    url: str = Field("http://127.0.0.1:8080", description="Label Studio's base URL.")
    api_key_env: str = Field(
        "LABEL_STUDIO_API_KEY",
        description="Name of the environment variable holding the API key: a personal access token "
        "(a JWT, Account & Settings) or a legacy token (40 hex); the form tells which.",
    )
    document_root: Path | None = Field(
        None,
        description="The server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT; null = the run folder "
        "(what `avcaps review server` uses).",
    )
    project_title: str = Field(
        "AudioVisualCaps review", description="Project title; the run folder's name is appended."
    )
    model_version: str = Field(
        "avcaps-merge", description="Version tag of the merge predictions (prefilled only when it matches)."
    )
    splits: list[str] = Field(["test"], description="Splits whose clips are reviewed.")
    timeout_s: float = Field(120.0, gt=0, description="HTTP timeout of one API call.")
    server_venv: Path = Field(Path(".venv-labelstudio"), description="Venv holding the server.")
    annotators_per_task: int = Field(
        1,
        ge=1,
        le=50,
        description="Annotators who answer each task (the project's overlap: maximum_annotations, "
        "for every task); their majority decides (see review/policy.py).",
    )
    edit_policy: Literal["latest", "medoid"] = Field(
        "latest",
        description="Whose edit becomes the reference when the majority says 'edited': the most recent "
        "annotator's (latest) or the edit closest to the other edits (medoid).",
    )
    guide_url: str | None = Field(
        None,
        description="URL of the annotator guide linked from the instructions; null = the guide that "
        "stage 5 writes into the run's media folder, served by Label Studio with the clips' media.",
    )
    lock_timeout_s: float = Field(
        900.0, gt=0, description="How long a shard waits for another shard's project setup or import."
    )


def review_config(config: Any) -> ReviewConfig:
    return config.review


def document_root(config: Any, workdir: Path) -> Path:
    root = review_config(config).document_root
    return Path(root) if root is not None else Path(workdir)


def api_key(cfg: ReviewConfig) -> str:
    key = os.environ.get(cfg.api_key_env, "").strip()
    if not key:
        raise AbortRun(
            f"set {cfg.api_key_env} in the environment to your Label Studio personal access token "
            "(Account & Settings) or legacy token"
        )
    return key


def connect(config: Any) -> LabelStudio:
    """A client for the configured server, with the key checked (malformed / unreachable / 401
    abort here)."""
    from stages.review.client import LabelStudio

    cfg = review_config(config)
    client = LabelStudio(cfg.url, api_key(cfg), cfg.timeout_s, env_name=cfg.api_key_env)
    client.whoami()
    return client


def read_project_file(folder: Path) -> dict[str, Any]:
    path = folder / PROJECT_FILE
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:  # cut short, zero bytes, overwritten (UnicodeDecodeError)
        raise AbortRun(
            f"{path} is damaged ({exc}): it names this run's Label Studio project. Restore it, or "
            'write {"project_id": ID} with the id Label Studio shows for this run\'s project '
            "(titled after review.project_title and the run folder); removing it makes stage 5 "
            "start a new project"
        ) from None
    return state


def remembered_project(client: LabelStudio, folder: Path) -> dict[str, Any]:
    """The project remembered in ``folder/project.json``; a clear error when it was deleted."""
    from stages.review.client import ProjectGone

    state = read_project_file(folder)
    if "project_id" not in state:
        raise AbortRun(
            f"no Label Studio project yet for this run ({folder / PROJECT_FILE}): run stage 5 first"
        )
    try:
        project = client.project(int(state["project_id"]))
    except ProjectGone:
        raise AbortRun(
            f"Label Studio project {state['project_id']} (remembered in {folder / PROJECT_FILE}) no longer "
            f"exists at {client.url}. Reviews already pulled stay in {folder / 'reviews.parquet'}; to push "
            f"into a new project, move {PROJECT_FILE} aside and run stage 5 with --force"
        ) from None
    if state.get("title") and project.get("title") != state["title"]:
        # Ids are per server: the same id on another server is another run's project.
        raise AbortRun(
            f"Label Studio project {state['project_id']} at {client.url} is {project.get('title')!r}, "
            f"not this run's {state['title']!r} ({folder / PROJECT_FILE}): "
            "does review.url point at another server?"
        )
    return project
