"""Stage 5 (push, ``avcaps run review``): the test merges become Label Studio tasks for human review.

The project is created once per run folder (its id is remembered in ``DIR/05-review/project.json``);
the run's media folder is attached as local-files storage, so Label Studio serves the keyframes and
audio from there only (and the annotator guide, written there). Nothing in Label Studio is
idempotent, so tasks are keyed by ``clip_id`` in their data: ``setup`` lists the project's tasks once
and a clip already there is never imported again (a kill between an import and its ledger commit is
healed by that). Each batch of the runner is one import call, with the merge as a prediction (the
project's ``model_version``) so it shows up prefilled. ``avcaps review pull`` (:mod:`stages.review.pull`)
reads the annotations back.

Shards of this stage may push at once (``--shard i/n``; the engine already keeps two processes off
the same items). They share one project: making it (and its storage, settings and guide) and every
import call happen under one lock per run folder, ``DIR/.locks/05-review/push.lock`` (``filelock``,
as the engine's stage locks), so a second shard finds the project the first one made instead of
making its own, and the server gets one bulk import at a time (Label Studio's default SQLite
database takes one writer at a time).

The run's connection to Label Studio, which pull and the CLI share, is
:mod:`stages.review.connection`.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import AbortRun, PermanentError
from pipeline.io import atomic_write_text
from pipeline.stage import Item, ItemStage, Result
from stages.review.connection import (
    PROJECT_FILE,
    ReviewConfig,
    connect,
    document_root,
    read_project_file,
    remembered_project,
)

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa


@contextlib.contextmanager
def push_lock(workdir: Path, timeout_s: float) -> Iterator[None]:
    """One process at a time (of the run folder) makes the project or imports tasks."""
    from filelock import FileLock, Timeout

    folder = Path(workdir) / ".locks" / ReviewStage.dirname()
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / "push.lock", timeout=timeout_s)
    try:
        lock.acquire()
    except Timeout:
        raise AbortRun(
            f"waited {timeout_s:.0f} s for {lock.lock_file}: another push of this run holds it "
            "(review.lock_timeout_s)"
        ) from None
    try:
        yield
    finally:
        lock.release()


# The form of a task (its data keys, the prediction): part of the push rows' fingerprint.
# 2: the merge's CLAP/CLIP scores, their run percentiles and the clip's risk (review/risk.py).
TASK_FORMAT = 2
# Earlier forms: a task pushed in one of them, whose merge and media are the same, is brought to
# the current form in place; its annotations stay valid (only stages.review.risk.DISPLAY_KEYS differ).
OLDER_TASK_FORMATS: tuple[int, ...] = (1,)


class ReviewStage(ItemStage[ReviewConfig]):
    number = 5
    name = "review"
    upstream = "merge"
    description = "Push the test merges to Label Studio for human review (pull with `avcaps review pull`)."

    @classmethod
    def output_schema(cls) -> list[pa.Field]:
        import pyarrow as pa

        return [
            pa.field("ls_task_id", pa.int64()),
            pa.field("ls_project_id", pa.int64()),
            # Annotations made on an earlier version of the task (its merge changed since): kept on
            # the server, never taken as the review of the current merge (review pull skips them).
            pa.field("ls_outdated_annotations", pa.list_(pa.int64())),
        ]

    selection_columns = ("split",)
    # The scores a task shows (its risk, the merge's CLAP/CLIP scores): refreshed in place when
    # stage 4 re-scores, the annotations left as they are.
    layer_name = "task scores"

    def select(self, table: pd.DataFrame) -> Any:
        return table["split"].isin(self.cfg.splits)

    def reads(self) -> tuple[str, ...]:
        # What a task shows the annotator: the merges, what they were made from, the keyframe and
        # the audio (by their files' digests), and the model that merged.
        return (
            "merged_captions",
            "audio_captions",
            "visual_caption",
            "merge_model",
            "frame_paths",
            "middle_frame",
            "audio_path",
        )

    def layer_settings(self) -> dict[str, Any] | None:
        return {"display": TASK_FORMAT}

    def layer_reads(self) -> tuple[str, ...]:
        from stages.review.risk import SCORE_COLUMNS

        return SCORE_COLUMNS

    def refresh(self, batch: list[Item]) -> list[Result]:
        """Tasks whose merge and media are as pushed but whose scores changed (stage 4 re-scored):
        the scores they show are updated in place; their annotations stay valid."""
        from stages.review.risk import DISPLAY_KEYS

        results = []
        for item in batch:
            prev = {
                k: v
                for k, v in (item.previous or {}).items()
                if k not in ("fingerprint", "layer_fingerprint")
            }
            task_id = self.existing.get(item.clip_id)
            if task_id is None:  # gone from the server: the next plain run pushes it again
                r = Result.ok(item.clip_id, **prev)
                r.layer, r.message = False, f"task of {item.clip_id} not found in project {self.project_id}"
                results.append(r)
                continue
            display = self.scores.task_fields(
                item.clip_id, len(item.data["audio_captions"]), len(item.data["merged_captions"])
            )
            shown = self.existing_data.get(item.clip_id) or {}
            data = {**shown, **{k: v for k, v in display.items() if k in DISPLAY_KEYS}}
            if data != shown:
                self.client.update_task(task_id, data)
                self.existing_data[item.clip_id] = data
            results.append(Result.ok(item.clip_id, **prev))
        return results

    def fingerprint_settings(self, task_format: int | None = None) -> dict[str, Any]:
        # A task shows the merge as a prediction of this model_version; the task's form is ours.
        fmt = TASK_FORMAT if task_format is None else task_format
        return {"model_version": self.cfg.model_version, "task_format": fmt}

    def order(self, table: pa.Table) -> Any:
        """Riskiest merges first (review/risk.py): Label Studio lists tasks and serves them to
        annotators by id, and ids follow the import order."""
        from stages.review.risk import RunScores

        return RunScores(table).order()

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
        self._read_scores()
        self.client = connect(self.config)
        with push_lock(self.workdir, self.cfg.lock_timeout_s):
            guide = self._write_guide(media)
            self.project_id = self._ensure_project(guide)
            self._ensure_storage(media)
        self.existing: dict[str, int] = {}
        self.existing_data: dict[str, dict[str, Any]] = {}
        for task in self.client.iter_tasks(self.project_id):
            cid = (task.get("data") or {}).get("clip_id")
            if cid and str(cid) not in self.existing:
                self.existing[str(cid)] = int(task["id"])
                self.existing_data[str(cid)] = task.get("data") or {}

    def _read_scores(self) -> None:
        """The run's scores (percentiles over every clip this stage applies to, what
        :meth:`order` ranks too), and the fingerprint of each clip's merge row, which tells a task
        of an older form apart from a task of another merge."""
        from pipeline.fingerprint import chain, settings_fingerprint, value_fingerprints
        from pipeline.selection import eligible_table, fingerprint_columns, upstream_legacy
        from stages.review.risk import SCORE_COLUMNS, RunScores

        table = eligible_table(self, self.ctx, SCORE_COLUMNS)
        self.scores = RunScores(table)
        ids = table["clip_id"].to_pylist()
        self.older_fps: dict[str, set[str]] = {cid: set() for cid in ids}
        columns = fingerprint_columns(self)
        legacy = upstream_legacy(table)
        for fmt in OLDER_TASK_FORMATS:
            old = settings_fingerprint(self, self.fingerprint_settings(fmt))
            # The row that form made from the same inputs, fingerprinted as today or as by the chain.
            for made in (value_fingerprints(old, table, columns), chain(old, legacy)):
                for cid, fp in zip(ids, made.to_pylist(), strict=True):
                    self.older_fps[cid].add(fp)

    def teardown(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()

    def _write_guide(self, media: Path) -> str:
        """The annotator guide's URL: ``review.guide_url``, or the page written into the media
        folder (rewritten only when its text changed) as Label Studio serves it."""
        from stages.review.guide import GUIDE_PATH, guide_html
        from stages.review.labeling import local_files_url

        if self.cfg.guide_url:
            return self.cfg.guide_url
        path = media / GUIDE_PATH
        text = guide_html()
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)
        # The #fragment is needed: Label Studio's web app takes a plain same-origin link for one of
        # its own pages and fails to render it; a link with a fragment is left to the browser.
        return local_files_url(path, self.root) + "#guide"

    def _settings(self, guide_url: str) -> dict[str, Any]:
        """The project settings stage 5 owns (kept up to date on an existing project)."""
        from stages.review.labeling import LABEL_CONFIG, instructions

        return {
            # An older project gets the current form (the scores view); its tasks are updated to it.
            "label_config": LABEL_CONFIG,
            "expert_instruction": instructions(guide_url),
            "maximum_annotations": self.cfg.annotators_per_task,
            "overlap_cohort_percentage": 100,  # every task gets annotators_per_task annotators
        }

    def _ensure_project(self, guide_url: str) -> int:
        state = read_project_file(self.folder)
        settings = self._settings(guide_url)
        if "project_id" in state:
            project = remembered_project(self.client, self.folder)
            if project.get("model_version") != self.cfg.model_version:
                raise AbortRun(
                    f"Label Studio project {project['id']} has model_version {project.get('model_version')!r}"
                    f" but review.model_version is {self.cfg.model_version!r}: the merges would not show"
                )
            changed = {k: v for k, v in settings.items() if project.get(k) != v}
            if changed:
                self.client.update_project(int(project["id"]), **changed)
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
            project = min(found, key=lambda p: int(p["id"]))
            changed = {k: v for k, v in settings.items() if project.get(k) != v}
            if changed:
                self.client.update_project(int(project["id"]), **changed)
        else:
            project = self.client.create_project(
                title=title,
                description=f"Human review of the merged captions of run {self.workdir.resolve()}",
                show_instruction=True,
                show_collab_predictions=True,
                model_version=self.cfg.model_version,
                **settings,
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
        from stages.review.labeling import build_task
        from stages.review.risk import DISPLAY_KEYS

        results: list[Result] = []
        todo: list[tuple[str, dict[str, Any]]] = []
        for item in batch:
            try:
                display = self.scores.task_fields(
                    item.clip_id, len(item.data["audio_captions"]), len(item.data["merged_captions"])
                )
                task = build_task(
                    item.clip_id, item.data, self.workdir, self.root, self.cfg.model_version, display
                )
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
            previous = item.previous or {}
            outdated = list(previous.get("ls_outdated_annotations") or [])
            if item.clip_id in self.existing:
                task_id = self.existing[item.clip_id]
                # The task shows something else to review now: other data, or the same paths
                # with other content behind them (a stale redo: an upstream result changed). A task
                # of an older form of the same merge, or whose scores alone changed, is refreshed
                # in place: what was reviewed is what it shows, so its annotations stay valid.
                was = previous.get("fingerprint")
                older_form = was in self.older_fps.get(item.clip_id, set())
                changed = was is not None and was != item.fingerprint and not older_form
                shown = self.existing_data.get(item.clip_id) or {}
                reviewed = {k: v for k, v in shown.items() if k not in DISPLAY_KEYS}
                if changed or reviewed != {k: v for k, v in task["data"].items() if k not in DISPLAY_KEYS}:
                    outdated = self._update(task_id, task, outdated)
                    self.existing_data[item.clip_id] = task["data"]
                elif shown != task["data"]:
                    self.client.update_task(task_id, task["data"])
                    self.existing_data[item.clip_id] = task["data"]
                results.append(self._ok(item.clip_id, task_id, outdated))
                continue
            todo.append((item.clip_id, task))
        if todo:
            with push_lock(self.workdir, self.cfg.lock_timeout_s):
                ids = self.client.import_tasks(self.project_id, [task for _, task in todo])
            for (cid, task), task_id in zip(todo, ids, strict=True):
                self.existing[cid] = task_id
                self.existing_data[cid] = task["data"]
                results.append(self._ok(cid, task_id, []))
        return results

    def _update(self, task_id: int, task: dict[str, Any], outdated: list[int]) -> list[int]:
        """The clip's merge changed since its task was pushed: the task gets the new data and
        prediction, and the annotations made on the old merge become outdated (kept, not used)."""
        self.client.update_task(task_id, task["data"])
        for pred in self.client.predictions(task_id):
            if pred.get("model_version") == self.cfg.model_version:
                self.client.delete_prediction(int(pred["id"]))
        for pred in task["predictions"]:
            self.client.create_prediction(task_id, pred)
        made = [int(a["id"]) for a in self.client.annotations(task_id)]
        return sorted(set(outdated) | set(made))

    def _ok(self, clip_id: str, task_id: int, outdated: list[int]) -> Result:
        return Result.ok(
            clip_id, ls_task_id=task_id, ls_project_id=self.project_id, ls_outdated_annotations=outdated
        )

    def extra_stats(self, state: pd.DataFrame) -> dict[str, Any]:
        info = read_project_file(self.folder)
        ok = state[state["status"] == "ok"] if not state.empty else state
        return {"project_id": info.get("project_id"), "url": info.get("url"), "tasks": len(ok)}
