"""Helpers shared by the engine tests (importable: conftest puts this folder on sys.path)."""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
REPO = HERE.parent.parent
REAL_CSV_DIR = REPO / "manifests" / "audiocaps"


def write_csvs(folder: Path, splits: dict[str, list[tuple]], checksums: bool = True) -> Path:
    """Write AudioCaps-style CSVs (rows: audiocap_id, youtube_id, start_time, caption)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(folder / f"{split}.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
            w.writerows(rows)
    if checksums:
        lines = [f"{hashlib.sha256((folder / f'{s}.csv').read_bytes()).hexdigest()}  {s}.csv" for s in splits]
        (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return folder


def make_ids(n: int, prefix: str = "a") -> list[str]:
    return [f"{prefix}{i:010d}" for i in range(n)]


def write_config(path: Path, workdir: Path, csv_dir: Path, splits: list[str], extra: str = "") -> Path:
    split_map = ", ".join(f"{s}: {s}.csv" for s in splits)
    path.write_text(
        f"workdir: {workdir}\nmanifest:\n  csv_dir: {csv_dir}\n  splits: {{{split_map}}}\n" + extra
    )
    return path


def avcaps(
    *args: str, app: str | None = "toyapp", cwd: Path | None = None, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess."""
    env = dict(os.environ)
    if app:
        env["AVCAPS_APP"] = app
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or REPO,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"avcaps {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc
