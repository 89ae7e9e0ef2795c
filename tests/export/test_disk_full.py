"""Stage 6 on a disk that fills (a real tmpfs): the export stops with exit 5 and one line, leaves
no half-written export or temp folder, and a rerun once there is room writes the whole export
(issue 26)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .conftest import REPO


def _export(workdir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("AVCAPS_APP", None)
    args = [
        "run",
        "export",
        "--config",
        "manifests/audiocaps.yaml",
        "--workdir",
        str(workdir),
        "--no-progress",
    ]
    code = "import sys; from pipeline.cli import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def _files(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def test_export_on_a_full_disk_stops_and_a_rerun_writes_it_whole(
    base_run: Path, run_copy: Callable[..., Path], tmpfs: Any
) -> None:
    reference = run_copy("reference")
    done = _export(reference)
    assert done.returncode == 0, done.stderr
    size = sum(_files(reference / "export").values())

    disk = tmpfs(reference.parent / "disk", "16m")
    workdir = disk / "run"
    shutil.copytree(base_run, workdir)
    # Leave room for half the export: the disk fills while the export is being written.
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(b"\0" * (free - size // 2))
    proc = _export(workdir)
    assert proc.returncode == 5, proc.stderr
    said = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and "Traceback" not in proc.stderr and " ERROR " not in proc.stderr, proc.stderr
    assert said[0].startswith("error: no space left on device") and str(disk) in said[0], said[0]
    assert not (workdir / "export").exists() and not list(workdir.glob(".tmp-*"))
    assert not (workdir / "06-export" / "stats.json").exists()  # not taken for a finished export

    (disk / "filler").unlink()
    proc = _export(workdir)
    assert proc.returncode == 0, proc.stderr
    assert _files(workdir / "export").keys() == _files(reference / "export").keys()
