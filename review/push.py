"""Stage 5 (push, ``avcaps run review``): the test merges become Label Studio tasks for human review.

The project is created once per run folder (its id is remembered in ``DIR/05-review/project.json``);
the run's media folder is attached as local-files storage, so Label Studio serves the keyframes and
audio from there only. Nothing in Label Studio is idempotent, so tasks are keyed by ``clip_id`` in
their data: ``setup`` lists the project's tasks once and a clip already there is never imported
again (a kill between an import and its ledger commit is healed by that). Each batch of the runner
is one import call, with the merge as a prediction (the project's ``model_version``) so it shows up
prefilled. ``avcaps review pull`` (:mod:`review.pull`) reads the annotations back.

Also the run's connection to Label Studio that pull and the CLI share: :func:`connect`,
:func:`remembered_project`, :func:`document_root`, ``review:`` settings (:class:`ReviewConfig`).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from pipeline.config import StageConfig
from pipeline.errors import AbortRun, PermanentError
from pipeline.io import atomic_write_text
from pipeline.stage import Item, ItemStage, Result

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from review.client import LabelStudio

PROJECT_FILE = "project.json"


class ReviewConfig(StageConfig):
    batch_size: int = Field(250, gt=0, description="Tasks per import call (and per ledger commit).")
    url: str = Field("http://127.0.0.1:8080", description="Label Studio's base URL.")
    api_key_env: str = Field(
        "LABEL_STUDIO_API_KEY", description="Name of the environment variable holding the API key."
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


def review_config(config: Any) -> ReviewConfig:
    return config.review  # type: ignore[no-any-return]


def document_root(config: Any, workdir: Path) -> Path:
    root = review_config(config).document_root
    return Path(root) if root is not None else Path(workdir)


def api_key(cfg: ReviewConfig) -> str:
    key = os.environ.get(cfg.api_key_env, "")
    if not key:
        raise AbortRun(f"set {cfg.api_key_env} in the environment to the Label Studio API key")
    return key


def connect(config: Any) -> LabelStudio:
    """A client for the configured server, with the key checked (unreachable / 401 abort here)."""
    from review.client import LabelStudio

    cfg = review_config(config)
    client = LabelStudio(cfg.url, api_key(cfg), cfg.timeout_s)
    client.whoami()
    return client


def read_project_file(folder: Path) -> dict[str, Any]:
    path = folder / PROJECT_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]
    except ValueError as exc:
        raise AbortRun(f"{path}: not valid JSON ({exc}); fix or remove it") from None


def remembered_project(client: LabelStudio, folder: Path) -> dict[str, Any]:
    """The project remembered in ``folder/project.json``; a clear error when it was deleted."""
    from review.client import ProjectGone

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


class ReviewStage(ItemStage):
    number = 5
    name = "review"
    upstream = "merge"
    description = "Push the test merges to Label Studio for human review (pull with `avcaps review pull`)."

    @classmethod
    def output_schema(cls) -> list[pa.Field]:
        import pyarrow as pa

        return [pa.field("ls_task_id", pa.int64()), pa.field("ls_project_id", pa.int64())]

    @property
    def cfg(self) -> ReviewConfig:
        return review_config(self.config)

    selection_columns = ("split",)

    def select(self, table: pd.DataFrame) -> Any:
        return table["split"].isin(self.cfg.splits)

    # -- setup: one project per run folder, storage attached, existing tasks listed --------------
    def setup(self) -> None:
        self.workdir = Path(self.ctx.workdir)
        self.root = document_root(self.config, self.workdir)
        media = self.ctx.media_dir.resolve()
        if not media.is_relative_to(self.root.resolve()):
            raise AbortRun(
                f"the run's media folder {media} is not under the Label Studio document root {self.root} "
                "(review.document_root): the server could not serve it"
            )
        self.client = connect(self.config)
        self.project_id = self._ensure_project()
        self._ensure_storage(media)
        self.existing: dict[str, int] = {}
        for task in self.client.iter_tasks(self.project_id):
            cid = (task.get("data") or {}).get("clip_id")
            if cid:
                self.existing.setdefault(str(cid), int(task["id"]))

    def teardown(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()

    def _ensure_project(self) -> int:
        state = read_project_file(self.folder)
        if "project_id" in state:
            project = remembered_project(self.client, self.folder)
            if project.get("model_version") != self.cfg.model_version:
                raise AbortRun(
                    f"Label Studio project {project['id']} has model_version {project.get('model_version')!r}"
                    f" but review.model_version is {self.cfg.model_version!r}: the merges would not show"
                )
            return int(project["id"])
        # The token is saved before the project is made, so a kill between creating the project and
        # saving its id finds that project again by its title instead of making a second one.
        token = state.get("token") or uuid.uuid4().hex[:8]
        # Label Studio caps titles at 50 characters; the token that makes the title unique stays whole.
        title = (
            state.get("title")
            or f"{self.cfg.project_title} {self.workdir.resolve().name}"[:39] + f" [{token}]"
        )
        atomic_write_text(self.folder / PROJECT_FILE, json.dumps({"token": token, "title": title}) + "\n")
        found = [p for p in self.client.projects() if p.get("title") == title]
        if found:
            project = found[0]
        else:
            from review.labeling import INSTRUCTIONS, LABEL_CONFIG

            project = self.client.create_project(
                title=title,
                description=f"Human review of the merged captions of run {self.workdir.resolve()}",
                label_config=LABEL_CONFIG,
                expert_instruction=INSTRUCTIONS,
                show_instruction=True,
                show_collab_predictions=True,
                model_version=self.cfg.model_version,
            )
        state = {"token": token, "title": title, "project_id": int(project["id"]), "url": self.cfg.url}
        atomic_write_text(self.folder / PROJECT_FILE, json.dumps(state, indent=2) + "\n")
        return int(project["id"])

    def _ensure_storage(self, media: Path) -> None:
        storages = self.client.local_storages(self.project_id)
        if not any(Path(s.get("path", "")) == media for s in storages):
            self.client.create_local_storage(self.project_id, str(media), "run media")

    # -- process: one import call per batch ------------------------------------------------------
    def process(self, batch: list[Item]) -> list[Result]:
        from review.labeling import build_task

        results: list[Result] = []
        todo: list[tuple[str, dict[str, Any]]] = []
        for item in batch:
            if item.clip_id in self.existing:
                results.append(self._ok(item.clip_id, self.existing[item.clip_id]))
                continue
            try:
                task = build_task(item.clip_id, item.data, self.workdir, self.root, self.cfg.model_version)
            except FileNotFoundError as exc:
                results.append(
                    Result.failed(item.clip_id, PermanentError("missing_media", f"{item.clip_id}: {exc}"))
                )
                continue
            except (KeyError, TypeError, ValueError) as exc:
                err = PermanentError(
                    "bad_input", f"{item.clip_id}: missing or malformed upstream column {exc}"
                )
                results.append(Result.failed(item.clip_id, err))
                continue
            todo.append((item.clip_id, task))
        if todo:
            ids = self.client.import_tasks(self.project_id, [task for _, task in todo])
            for (cid, _), task_id in zip(todo, ids, strict=True):
                self.existing[cid] = task_id
                results.append(self._ok(cid, task_id))
        return results

    def _ok(self, clip_id: str, task_id: int) -> Result:
        return Result.ok(clip_id, ls_task_id=task_id, ls_project_id=self.project_id)

    def extra_stats(self, state: pd.DataFrame) -> dict[str, Any]:
        info = read_project_file(self.folder)
        ok = state[state["status"] == "ok"] if not state.empty else state
        return {"project_id": info.get("project_id"), "url": info.get("url"), "tasks": len(ok)}
