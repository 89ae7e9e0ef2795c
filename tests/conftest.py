"""Fixtures shared by several test folders: the real Label Studio server (review and end-to-end
tests), started once per session; the tiny random CLIP and CLAP scorers (stages 3 and 4), built
once per session."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stages.review.server import LabelStudioServer, build_template, free_port
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


Tmpfs = Callable[..., Path]


@pytest.fixture
def tmpfs() -> Iterator[Tmpfs]:
    """``tmpfs(folder, size)`` mounts a small tmpfs on ``folder`` (made if missing): a disk that
    really fills (ENOSPC from the kernel). ``tmpfs.resize(folder, size)`` gives it room again
    (``remount,size=``), ``tmpfs.read_only(folder)`` / ``read_write(folder)`` remount it.
    Unmounted after the test; skipped where mounting is not permitted (it needs root, as in CI)."""
    mounted: list[Path] = []

    def mount(folder: Path, size: str = "3m") -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip() or proc.returncode}")
        mounted.append(folder)
        return folder

    def remount(folder: Path, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True)

    mount.resize = lambda folder, size: remount(folder, f"size={size}")  # type: ignore[attr-defined]
    mount.read_only = lambda folder: remount(folder, "ro")  # type: ignore[attr-defined]
    mount.read_write = lambda folder: remount(folder, "rw")  # type: ignore[attr-defined]
    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
