"""A full disk, a read-only disk, no file handles, no memory: the run stops (exit 5) with one line,
no row says an item failed, and a rerun after the fix finishes (issue 26). Real conditions: a
tmpfs that fills, a read-only remount, the kernel's EMFILE, Python's MemoryError."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
from engine_helpers import avcaps, write_config, write_csvs

from pipeline.errors import RunHalted

N = 24
INFO = re.compile(r"\d{4}-\d\d-\d\d [\d:,]+ INFO ")


def _run(tmp_path: Path, toy: str, script: dict[str, str] | None = None) -> Path:
    rows = [(i + 1, f"t{i:010d}", i, f"caption {i}") for i in range(N)]
    csv_dir = write_csvs(tmp_path / "csv", {"test": rows})
    path = tmp_path / "script.json"
    path.write_text(json.dumps(script or {}))
    extra = f"toy:\n  batch_size: 4\n  backoff_s: 0.01\n  script: {path}\n" + "".join(
        f"  {line}\n" for line in toy.splitlines()
    )
    cfg = write_config(tmp_path / "toy.yaml", tmp_path / "run", csv_dir, ["test"], extra)
    avcaps("run", "0", "--config", str(cfg), "--no-progress", check=True)
    return cfg


def _toy(cfg: Path, *args: str) -> tuple[int, list[str]]:
    proc = avcaps("run", "toy", "--config", str(cfg), "--no-progress", *args)
    return proc.returncode, proc.stderr.strip().splitlines()


def _history(tmp_path: Path) -> pd.DataFrame:
    folder = tmp_path / "run" / "01-toy" / "ledger"
    return pd.read_parquet(folder) if folder.exists() else pd.DataFrame({"clip_id": [], "status": []})


def _error_line(lines: list[str]) -> str:
    """Beside the progress log (INFO), the run's stderr says one line: no traceback, no ERROR log
    line repeating it."""
    said = [line for line in lines if not INFO.match(line)]
    assert len(said) == 1, "\n".join(lines)
    assert said[0].startswith("error: "), said[0]
    return said[0]


def _finishes_after_fix(tmp_path: Path, cfg: Path) -> None:
    code, lines = _toy(cfg)
    assert code == 0, lines
    history = _history(tmp_path)
    assert set(history["status"]) == {"ok"}  # never a failed row, then or now
    assert sorted(history["clip_id"]) == sorted(f"t{i:010d}_{i * 1000}_{i * 1000 + 10000}" for i in range(N))


def test_a_full_disk_stops_the_run_and_a_rerun_after_space_returns_finishes(tmp_path: Path, tmpfs) -> None:
    media = tmpfs(tmp_path / "run" / "media", "3m")
    # 300 kB per item: about ten fit; min_free_mb 0 lets the disk really fill (ENOSPC mid-batch).
    cfg = _run(tmp_path, "file_bytes: 300000\nmin_free_mb: 0")
    code, lines = _toy(cfg)
    assert code == RunHalted.exit_code == 5
    line = _error_line(lines)
    assert "no space left on device" in line and str(media) in line and "free of 3.1 MB" in line
    assert "rerun" in line
    history = _history(tmp_path)
    assert 4 <= len(history) < N and set(history["status"]) == {"ok"}
    for rel in history["toy_file"]:  # every committed item's file is whole
        assert (tmp_path / "run" / rel).stat().st_size == 300000
    assert not list((media / ".tmp").iterdir())  # the partial file is gone
    stats = json.loads((tmp_path / "run" / "01-toy" / "stats.json").read_text())
    assert stats["last_run"]["exit_code"] == 5
    tmpfs.resize(media, "64m")
    _finishes_after_fix(tmp_path, cfg)


def test_under_min_free_the_run_stops_before_the_next_batch(tmp_path: Path, tmpfs) -> None:
    media = tmpfs(tmp_path / "run" / "media", "3m")
    cfg = _run(tmp_path, "file_bytes: 300000\nmin_free_mb: 1.5")
    code, lines = _toy(cfg)
    assert code == 5
    assert "under toy.min_free_mb = 1.5" in _error_line(lines)
    history = _history(tmp_path)
    # Stopped before a write failed: 1.5 MB were still free, room for the ledger and stats.
    assert 4 <= len(history) <= 8 and set(history["status"]) == {"ok"}
    tmpfs.resize(media, "64m")
    _finishes_after_fix(tmp_path, cfg)


def test_a_writer_that_only_exits_non_zero_on_a_full_disk_fails_no_item(tmp_path: Path, tmpfs) -> None:
    """ffmpeg under yt-dlp says only "exited with code 1": a failed item while the disk is short
    of ``min_free_mb`` is the disk's fault, not the item's."""
    media = tmpfs(tmp_path / "run" / "media", "3m")
    cfg = _run(tmp_path, "file_bytes: 300000\nmin_free_mb: 0.4\nwriter: subprocess")
    code, lines = _toy(cfg)
    assert code == 5
    assert "toy.min_free_mb = 0.4" in _error_line(lines)
    assert set(_history(tmp_path)["status"]) == {"ok"}
    tmpfs.resize(media, "64m")
    _finishes_after_fix(tmp_path, cfg)


def test_a_read_only_disk_stops_the_run(tmp_path: Path, tmpfs) -> None:
    media = tmpfs(tmp_path / "run" / "media", "3m")
    cfg = _run(tmp_path, "min_free_mb: 0")
    (media / ".tmp").mkdir()
    tmpfs.read_only(media)
    code, lines = _toy(cfg)
    assert code == 5
    line = _error_line(lines)
    assert "read-only file system" in line and str(media / ".tmp") in line
    assert _history(tmp_path).empty
    tmpfs.read_write(media)
    _finishes_after_fix(tmp_path, cfg)


def test_running_out_of_file_handles_or_memory_fails_no_item(tmp_path: Path) -> None:
    item = "t0000000005_5000_15000"
    cfg = _run(tmp_path, "", {item: "exhaust_fds"})
    code, lines = _toy(cfg)
    assert code == 5
    line = _error_line(lines)
    assert "too many open files in this process" in line and item in line and "ulimit -n is" in line
    assert len(_history(tmp_path)) == 4 and set(_history(tmp_path)["status"]) == {"ok"}

    (tmp_path / "script.json").write_text(json.dumps({item: "memory"}))
    code, lines = _toy(cfg)
    assert code == 5 and "out of memory" in _error_line(lines)
    assert set(_history(tmp_path)["status"]) == {"ok"}
    (tmp_path / "script.json").write_text("{}")
    _finishes_after_fix(tmp_path, cfg)


def test_a_run_level_error_is_printed_once_and_logged(tmp_path: Path) -> None:
    cfg = _run(tmp_path, "batch_size: 1", {"t0000000002_2000_12000": "abort"})
    code, lines = _toy(cfg)
    assert code == 2
    assert _error_line(lines) == "error: the toy model is missing"
    (log,) = (tmp_path / "run" / "runs").glob("*-01-toy.log")
    assert "ERROR aborted: the toy model is missing" in log.read_text()
