"""Stage 7 up to (and through) the upload calls, against a FAKE Hub on 127.0.0.1.

What stays untested: the real Hub's answers (auth, quotas, xet/LFS storage for large files, repo
visibility rules); the fake answers every file as a regular inline upload.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import AbortRun

TOKEN = "hf_" + "q7" * 17  # a made-up token: the tests check it is sent but never shown
Publish = Callable[..., dict[str, Any]]


@pytest.fixture
def exported(run_copy: Callable[..., Path], export: Callable[..., Path]) -> Path:
    workdir = run_copy()
    export(workdir)
    return workdir


def _export_files(workdir: Path) -> dict[str, bytes]:
    folder = workdir / "export"
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_dry_run_prints_exactly_what_would_be_uploaded(
    exported: Path, publish: Publish, capsys: pytest.CaptureFixture[str], fake_hub: Any
) -> None:
    summary = publish(
        exported, "publish.dry_run=true", "publish.repo_id=me/avcaps", f"publish.endpoint={fake_hub.url}"
    )
    out = capsys.readouterr().out
    files = _export_files(exported)
    listed = [line.split()[-1] for line in out.splitlines() if line.startswith("  ")]
    assert sorted(listed) == sorted(files) and listed[-1] == "SHA256SUMS"
    assert f"upload {len(files)} files, {sum(map(len, files.values()))} bytes, in one commit" in out
    assert "repo: me/avcaps (dataset, private if created)" in out
    assert summary["dry_run"] is True and summary["files"] == len(files)
    assert fake_hub.requests == []  # nothing was contacted


def test_upload_creates_private_repo_commits_once_and_tags(
    exported: Path,
    publish: Publish,
    fake_hub: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    summary = publish(exported, "publish.repo_id=me/avcaps", f"publish.endpoint={fake_hub.url}")
    paths = [r["path"] for r in fake_hub.requests if "/tree/" not in r["path"]]
    assert paths[0] == "/api/repos/create"
    assert json.loads(fake_hub.requests[0]["body"]) == {
        "name": "avcaps",
        "organization": "me",
        "visibility": "private",
        "type": "dataset",
    }
    assert sum("/commit/" in p for p in paths) == 1  # one commit
    committed = fake_hub.committed_files()
    assert committed == _export_files(exported)  # exactly the export, byte for byte
    # The card's figures go up with it, at the relative paths the card links (what the Hub renders).
    linked = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", committed["README.md"].decode())
    figures = ["caption_lengths", "availability", "review_verdicts"]  # no scores in this run
    assert linked == [f"figures/{name}.png" for name in figures]
    assert all(committed[p].startswith(b"\x89PNG") for p in linked)
    tag = [r for r in fake_hub.requests if "/tag/" in r["path"]]
    assert len(tag) == 1 and tag[0]["path"].endswith("/tag/" + "c" * 40)
    assert json.loads(tag[0]["body"])["tag"] == summary["tag"]
    assert summary["tag"].startswith("export-") and summary["commit"] == "c" * 40
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in fake_hub.requests)
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err
    assert TOKEN not in (exported / "07-publish" / "stats.json").read_text()


@pytest.mark.parametrize("large", [False, True])
def test_a_republish_with_fewer_shards_deletes_the_old_ones(
    exported: Path,
    publish: Publish,
    export: Callable[..., Path],
    fake_hub: Any,
    monkeypatch: pytest.MonkeyPatch,
    large: bool,
) -> None:
    """The Hub repo equals the export: the card loads data/<config>/<split>-*.parquet, so a shard of an
    earlier export left on the Hub would duplicate rows for every user."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub = ["publish.repo_id=me/avcaps", f"publish.endpoint={fake_hub.url}"]
    if large:
        hub.append("publish.large_upload_bytes=1")
    export(exported, "export.max_shard_bytes=600")  # many small shards
    publish(exported, *hub)
    first = set(fake_hub.repos["me/avcaps"])
    assert any("-00001-of-" in p for p in first)
    export(exported)  # one shard per split again
    publish(exported, *hub)
    now = fake_hub.repos["me/avcaps"]
    assert set(now) - {".gitattributes"} == set(_export_files(exported))
    deleted = fake_hub.deleted_files()
    assert deleted and set(deleted) == first - set(now) and all("-of-" in p for p in deleted)
    assert sum("/commit/" in r["path"] for r in fake_hub.requests) == 2  # deleted in the upload's commit


def test_large_export_uses_the_folder_upload(
    exported: Path, publish: Publish, fake_hub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    sets = (
        "publish.repo_id=me/avcaps",
        f"publish.endpoint={fake_hub.url}",
        "publish.large_upload_bytes=1000",
    )
    publish(exported, *sets)
    assert fake_hub.committed_files() == _export_files(exported)
    assert any("/tag/" in r["path"] for r in fake_hub.requests)


def test_refused_upload_names_the_step_and_hides_the_token(
    exported: Path, publish: Publish, fake_hub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    fake_hub.refuse["/preupload/"] = 403
    with pytest.raises(AbortRun, match=rf"failed to upload on {fake_hub.url} for me/avcaps") as err:
        publish(exported, "publish.repo_id=me/avcaps", f"publish.endpoint={fake_hub.url}")
    assert TOKEN not in str(err.value)
    assert not any("/tag/" in r["path"] for r in fake_hub.requests)


def test_refuses_unreviewed_test_items_unless_forced(
    tmp_path: Path,
    export: Callable[..., Path],
    publish: Publish,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from standins.contract_run import build_contract_run

    run = build_contract_run(tmp_path / "run", sample_per_split=3, review_default=None, verdicts={})
    assert run.ids("test")[0] in run.failed  # never merged, so never waiting for a review
    export(run.workdir, "export.allow_unreviewed=true")
    with pytest.raises(AbortRun, match=r"2 test item\(s\) are unreviewed.*--force"):
        publish(run.workdir, "publish.dry_run=true")
    assert publish(run.workdir, "publish.dry_run=true", force=True)["dry_run"] is True
    assert publish(run.workdir, "publish.dry_run=true", "publish.force=true")["files"] > 0


def test_bad_inputs_are_named(exported: Path, publish: Publish, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(AbortRun, match=r"publish\.repo_id is not set"):
        publish(exported)
    with pytest.raises(AbortRun, match="set the environment variable HF_TOKEN"):
        publish(exported, "publish.repo_id=me/avcaps")
    card = exported / "export" / "README.md"
    card.write_text(card.read_text() + "\nedited by hand\n")
    with pytest.raises(AbortRun, match=r"README.md: checksum mismatch with SHA256SUMS"):
        publish(exported, "publish.dry_run=true")
    (exported / "export" / "stray.txt").write_text("x")
    with pytest.raises(AbortRun, match=r"does not match its SHA256SUMS: not listed \['stray.txt'\]"):
        publish(exported, "publish.dry_run=true")


def test_publish_before_export_says_so(tmp_path: Path, publish: Publish) -> None:
    with pytest.raises(AbortRun, match=r"no export in .*run `avcaps run 6` first"):
        publish(tmp_path, "publish.dry_run=true")
