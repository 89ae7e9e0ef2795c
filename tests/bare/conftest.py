"""A machine without ffmpeg, ffprobe and Java, on this one: a PATH that hides them.

The build machines have Debian's ffmpeg and Java; a new user's may have neither. The PATH made
here is a folder of symlinks to every program on the real PATH except those three (and their
siblings below), so a subprocess sees the machine as it is, less them, and must use the ones the
Python packages ship (``stages/tools.py``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HIDDEN = ("ffmpeg", "ffprobe", "ffplay", "java")


def bare_bin(dest: Path, path: str) -> Path:
    """``dest`` filled with a symlink to the first program of each name on ``path``, but HIDDEN."""
    dest.mkdir(parents=True, exist_ok=True)
    for folder in path.split(os.pathsep):
        if not folder or not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            link = dest / entry.name
            if entry.name in HIDDEN or link.exists() or link.is_symlink():
                continue
            if entry.is_file() and os.access(entry.path, os.X_OK):
                link.symlink_to(entry.path)
    return dest


@pytest.fixture(scope="session")
def bare_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(bare_bin(tmp_path_factory.mktemp("bare") / "bin", os.environ.get("PATH", os.defpath)))
    for name in HIDDEN:
        assert shutil.which(name, path=path) is None, name
    assert shutil.which("env", path=path) and shutil.which("sh", path=path)
    return path


@pytest.fixture(scope="session")
def bare_env(bare_path: str) -> dict[str, str]:
    """The environment of a subprocess on a machine without ffmpeg, ffprobe and Java."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAVA_HOME", "IMAGEIO_FFMPEG_EXE")}
    pythonpath = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env | {"PATH": bare_path, "PYTHONPATH": pythonpath}
