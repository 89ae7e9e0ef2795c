"""Stage 7: publish the export to the Hugging Face Hub.

Verifies the export against its ``SHA256SUMS`` (no partial or edited file goes up), refuses an
export whose test split has unreviewed items unless forced, then with ``huggingface_hub``: creates
the dataset repo if missing (private by default), uploads the folder in one commit (``upload_folder``
for exports over ``large_upload_bytes``: huggingface_hub's resumable multi-commit upload) that also
deletes every file of the repo the export no longer has (the repo equals the export), and tags
the commit. The token comes from the environment variable named by ``token_env`` (``HF_TOKEN``)
and is never printed. ``dry_run`` prints exactly what would be uploaded and touches nothing.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from pipeline.config import StrictModel
from pipeline.errors import AbortRun
from pipeline.io import file_digest
from pipeline.stage import RunOptions, WholeStage
from stages.export.config import ExportConfig

log = logging.getLogger("avcaps")
# Files the Hub keeps in every repo, never ours to delete.
KEEP_ON_HUB = frozenset({".gitattributes"})


def glob_escape(path: str) -> str:
    """``path`` as an fnmatch pattern matching only itself (upload_folder takes patterns)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)


class PublishConfig(StrictModel):
    repo_id: str | None = Field(None, description="Hub dataset repo, 'owner/name' (required unless dry_run).")
    private: bool = Field(True, description="Create the repo private (only when it does not exist yet).")
    dry_run: bool = Field(False, description="Print what would be uploaded; contact nothing.")
    force: bool = Field(False, description="Publish even if test items are unreviewed.")
    tag: str | None = Field(None, description="Tag of the upload commit; default export-<checksum prefix>.")
    commit_message: str = Field("Upload AudioVisualCaps export", description="Commit message.")
    endpoint: str | None = Field(None, description="Hub endpoint; None = huggingface_hub's default.")
    token_env: str = Field("HF_TOKEN", description="Environment variable holding the Hub token.")
    large_upload_bytes: int = Field(
        5 * 1024**3, gt=0, description="Above this, use the resumable multi-commit folder upload."
    )


@dataclass(frozen=True)
class PlannedFile:
    path: str
    size: int
    sha256: str


@dataclass
class UploadPlan:
    folder: Path
    files: list[PlannedFile]
    tag: str
    unreviewed: int

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def plan_upload(folder: Path, tag: str | None = None) -> UploadPlan:
    """Check the export against ``SHA256SUMS`` and list what would be uploaded, in order."""
    sums_path = folder / "SHA256SUMS"
    if not sums_path.exists():
        raise AbortRun(f"no export in {folder} (no SHA256SUMS): run `avcaps run 6` first")
    expected: dict[str, str] = {}
    for n, line in enumerate(sums_path.read_text(encoding="utf-8").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise AbortRun(f"{sums_path}:{n}: not a sha256sum line: {line!r}")
        expected[name] = digest
    present = sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "SHA256SUMS"
    )
    extra = sorted(set(present) - set(expected))
    missing = sorted(set(expected) - set(present))
    if extra or missing:
        raise AbortRun(
            f"{folder} does not match its SHA256SUMS: "
            + (f"missing {missing[:5]} " if missing else "")
            + (f"not listed {extra[:5]}" if extra else "")
            + " (re-run the export)"
        )
    files = []
    for name in [*present, "SHA256SUMS"]:
        path = folder / name
        digest = file_digest(path)
        if name != "SHA256SUMS" and digest != expected[name]:
            raise AbortRun(f"{path}: checksum mismatch with SHA256SUMS (changed since export; re-run it)")
        files.append(PlannedFile(name, path.stat().st_size, digest))
    stats_path = folder / "statistics.json"
    if not stats_path.exists():
        raise AbortRun(f"{stats_path} missing: not an export of this builder")
    stats = json.loads(stats_path.read_text(encoding="utf-8"))
    sums_digest = files[-1].sha256
    return UploadPlan(folder, files, tag or f"export-{sums_digest[:12]}", int(stats["unreviewed_test_items"]))


def describe(plan: UploadPlan, cfg: PublishConfig) -> str:
    """The dry-run text: exactly what :meth:`PublishStage.upload` would send."""
    how = (
        "in one commit"
        if plan.total_bytes <= cfg.large_upload_bytes
        else "with the resumable multi-commit folder upload"
    )
    lines = [
        f"repo: {cfg.repo_id or '<publish.repo_id not set>'} (dataset, "
        f"{'private' if cfg.private else 'public'} if created)",
        f"endpoint: {cfg.endpoint or 'huggingface_hub default'}",
        f"upload {len(plan.files)} files, {plan.total_bytes} bytes, {how}: {cfg.commit_message!r}",
        f"tag: {plan.tag}",
    ]
    lines += [f"  {f.sha256[:16]}  {f.size:>12}  {f.path}" for f in plan.files]
    return "\n".join(lines)


class PublishStage(WholeStage[PublishConfig]):
    uses = (ExportConfig,)  # where the export is (export.folder)
    number = 7
    name = "publish"
    upstream = "export"
    description = "Upload the export to the Hugging Face Hub (dry run prints the plan)."

    def run(self, options: RunOptions) -> dict[str, Any]:
        cfg = self.cfg
        folder = self.ctx.workdir / self.section(ExportConfig).folder
        plan = plan_upload(folder, cfg.tag)
        if plan.unreviewed and not (cfg.force or options.force):
            raise AbortRun(
                f"{folder}: {plan.unreviewed} test item(s) are unreviewed (raw merges); review them and "
                "re-export, or publish anyway with --force (or --set publish.force=true)"
            )
        text = describe(plan, cfg)
        summary: dict[str, Any] = {
            "repo_id": cfg.repo_id,
            "files": len(plan.files),
            "bytes": plan.total_bytes,
            "tag": plan.tag,
            "dry_run": cfg.dry_run,
        }
        if cfg.dry_run:
            print("publish (dry run): nothing is sent. Would do:\n" + text, flush=True)
            return {**summary, "message": f"dry run: {len(plan.files)} files, {plan.total_bytes} bytes"}
        if not cfg.repo_id:
            raise AbortRun("publish.repo_id is not set (e.g. --set publish.repo_id=owner/AudioVisualCaps)")
        token = os.environ.get(cfg.token_env)
        if not token:
            raise AbortRun(f"no Hub token: set the environment variable {cfg.token_env}")
        print("publish:\n" + text, flush=True)
        commit = self.upload(plan, token)
        return {
            **summary,
            "commit": commit,
            "message": f"published {cfg.repo_id} at {commit} (tag {plan.tag})",
        }

    def upload(self, plan: UploadPlan, token: str) -> str:
        """Create the repo if missing, upload, tag; returns the commit id. Errors name the step."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

        cfg = self.cfg
        assert cfg.repo_id
        api = HfApi(endpoint=cfg.endpoint, token=token)
        step = "create the repo"
        try:
            api.create_repo(cfg.repo_id, repo_type="dataset", private=cfg.private, exist_ok=True)
            # The repo must equal the export: a file of an earlier export that this one no longer
            # has (a shard of a split that now has fewer, a dropped config) would be loaded by the
            # card's data/<config>/<split>-* patterns beside the new ones. It goes in the same commit.
            step = "list the repo's files"
            ours = {f.path for f in plan.files}
            gone = sorted(set(api.list_repo_files(cfg.repo_id, repo_type="dataset")) - ours - KEEP_ON_HUB)
            if gone:
                log.info("publish: %d file(s) on the Hub are no longer in the export: deleted", len(gone))
            step = "upload"
            if plan.total_bytes <= cfg.large_upload_bytes:
                ops: list[Any] = [CommitOperationAdd(f.path, str(plan.folder / f.path)) for f in plan.files]
                ops += [CommitOperationDelete(path) for path in gone]
                info = api.create_commit(
                    cfg.repo_id, ops, commit_message=cfg.commit_message, repo_type="dataset"
                )
            else:
                info = api.upload_folder(
                    repo_id=cfg.repo_id,
                    folder_path=plan.folder,
                    repo_type="dataset",
                    commit_message=cfg.commit_message,
                    delete_patterns=[glob_escape(path) for path in gone] or None,
                )
            step = "tag the commit"
            commit = str(info.oid)
            api.create_tag(cfg.repo_id, tag=plan.tag, revision=commit, repo_type="dataset")
        except Exception as exc:
            # The token is in no exception text of huggingface_hub; say the step and the endpoint.
            msg = str(exc).replace(token, "***")
            raise AbortRun(
                f"publish failed to {step} on {api.endpoint} for {cfg.repo_id}: {type(exc).__name__}: {msg}"
            ) from None
        return commit
