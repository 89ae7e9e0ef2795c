"""The ledger as real runs use it: typed through failed rows, legacy folders, clock-free order,
compaction under concurrent readers and writers, locks between processes, run logs."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from engine_helpers import HERE, avcaps, write_config, write_csvs

from pipeline.ledger import Ledger
from pipeline.selection import stage_ledger
from stages.download.stage import DownloadStage
from stages.keyframes import KeyframesStage
from stages.manifest import ManifestStage

LEGACY = HERE / "fixtures" / "legacy-run"


def _row(cid: str, status: str = "ok", **kw: object) -> dict:
    return {"clip_id": cid, "status": status, "attempts": 1, **kw}


def test_a_failed_row_keeps_integer_columns_integer(tmp_path: Path) -> None:
    led = stage_ledger(KeyframesStage, tmp_path)
    led.commit([_row("a", middle_frame=1, frame_paths=["f/a/0.jpg", "f/a/1.jpg"])])
    led.commit([_row("b", "failed_permanent", reason="corrupt_video")])  # middle_frame null
    state = led.latest()
    assert str(state["middle_frame"].dtype) == "Int32"
    assert state.loc["a", "middle_frame"] == 1 and pd.isna(state.loc["b", "middle_frame"])
    frames = state.loc["a", "frame_paths"]
    assert frames[state.loc["a", "middle_frame"]] == "f/a/1.jpg"  # usable as a list index


def test_compaction_preserves_the_declared_schema_exactly(tmp_path: Path) -> None:
    led = stage_ledger(KeyframesStage, tmp_path)
    for i in range(5):
        led.commit([_row(f"c{i}", middle_frame=i) if i % 2 else _row(f"c{i}", "failed_transient")])
    led.compact()
    (part,) = led.parts()
    assert pq.read_schema(part).remove_metadata().equals(led.schema)
    assert str(led.latest()["middle_frame"].dtype) == "Int32"


def test_compaction_keeps_the_current_and_the_last_ok_row(tmp_path: Path) -> None:
    led = stage_ledger(DownloadStage, tmp_path)
    led.commit([_row("a", video_path="v1.mp4", seq=1)])
    led.commit([_row("a", "failed_transient", reason="http_429", seq=2)])
    led.commit([_row("b", "failed_transient", seq=1)])
    led.commit([_row("b", "ok", video_path="b.mp4", seq=2)])
    led.compact()
    hist = led.read_all().sort_values(["clip_id", "seq"])
    assert list(zip(hist["clip_id"], hist["seq"], strict=True)) == [("a", 1), ("a", 2), ("b", 2)]


def test_order_is_by_seq_not_by_clock_or_commit_order(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "ledger")
    led.commit([_row("a", "ok", seq=5)])
    led.commit([_row("a", "failed_transient", seq=4)])  # committed later, e.g. by a skewed host
    assert led.latest().loc["a", "status"] == "ok"
    led.commit([_row("a", "failed_permanent")])  # no seq given: the next one after the current
    assert led.latest().loc["a", "seq"] == 6


def test_legacy_run_folder_is_read_typed(tmp_path: Path) -> None:
    """A run folder written by the ledger before this one (wall-clock seq, a compaction that wrote
    int32 columns as double) reads with its declared types, and new rows supersede old ones."""
    run = tmp_path / "run"
    shutil.copytree(LEGACY, run)
    raw = pq.read_schema(next((run / "02-keyframes" / "ledger").glob("*.parquet")))
    assert raw.field("middle_frame").type == pa.float64()  # what the old compaction left
    kf = stage_ledger(KeyframesStage, run).latest()
    assert str(kf["middle_frame"].dtype) == "Int32" and kf["middle_frame"].notna().sum() == 5
    dl = stage_ledger(DownloadStage, run)
    old_seq = int(dl.latest().loc["legacy00001_1000_11000", "seq"])
    assert old_seq > 10**18  # nanoseconds
    dl.commit([_row("legacy00001_1000_11000", "failed_permanent", reason="removed")])
    assert dl.latest().loc["legacy00001_1000_11000", "seq"] == old_seq + 1
    assert len(pd.read_parquet(run / "01-download" / "ledger")) == 7  # still plain Parquet


def _writer(folder: str, start: int, n: int) -> None:
    led = Ledger(Path(folder), [pa.field("x", pa.int32())])
    for i in range(start, start + n):
        led.commit([_row(f"w{i:05d}", x=i, seq=1)])
        if i % 7 == 0:
            led.compact()


def test_readers_never_crash_while_writers_commit_and_compact(tmp_path: Path) -> None:
    folder = tmp_path / "ledger"
    ctx = mp.get_context("spawn")
    writers = [ctx.Process(target=_writer, args=(str(folder), k * 1000, 150)) for k in range(3)]
    for w in writers:
        w.start()
    led = Ledger(folder, [pa.field("x", pa.int32())])
    seen = 0
    while any(w.is_alive() for w in writers):
        state = led.latest()
        assert state.index.is_unique and len(state) >= seen  # no row ever missed or doubled
        seen = len(state)
    for w in writers:
        w.join()
        assert w.exitcode == 0
    state = led.latest()
    assert len(state) == 450 and (state["x"] == state.index.str[1:].astype(int)).all()
    history = led.read_all()
    assert len(history) == 450  # a part read together with its merged copy counts once


# -- processes on one run folder -------------------------------------------------------------------
def _toy_run(tmp_path: Path, n: int, extra: str = "") -> Path:
    rows = [(i + 1, f"t{i:010d}", i % 500, f"caption {i}") for i in range(n)]
    csv_dir = write_csvs(tmp_path / "csv", {"test": rows})
    cfg = write_config(tmp_path / "toy.yaml", tmp_path / "run", csv_dir, ["test"], extra)
    avcaps("run", "0", "--config", str(cfg), "--no-progress", check=True)
    return cfg


def _popen(cfg: Path, *args: str) -> subprocess.Popen[str]:
    import os

    env = dict(os.environ, AVCAPS_APP="toyapp", PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parents[1])]))
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", "toy", "--config", str(cfg), "--no-progress", *args],
        env=env,
        cwd=HERE.parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_work(log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and log.read_text().strip():
            return
        time.sleep(0.05)
    raise AssertionError("the first process never started working")


@pytest.mark.parametrize(("first", "second"), [((), ()), (("--shard", "0/2"), ("--shard", "2/4"))])
def test_a_second_process_on_the_same_items_exits_3(tmp_path: Path, first: tuple, second: tuple) -> None:
    log = tmp_path / "work.log"
    cfg = _toy_run(tmp_path, 40, f"toy:\n  batch_size: 2\n  sleep_s: 0.3\n  work_log: {log}\n")
    a = _popen(cfg, *first)
    _wait_for_work(log)
    b = _popen(cfg, *second)
    _, err = b.communicate(timeout=120)
    assert b.returncode == 3, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "01-toy" in lines[0]
    assert "already running" in lines[0] or "shares items" in lines[0]
    assert a.wait(timeout=120) == 0
    worked = [line.split()[0] for line in log.read_text().splitlines()]
    assert len(worked) == len(set(worked))  # nobody worked on an item twice


def test_many_shard_processes_and_a_duplicate_end_with_one_row_per_item(tmp_path: Path) -> None:
    n = 600
    script = tmp_path / "script.json"
    # every 10th item fails transiently once, every 25th for good
    script.write_text(
        json.dumps(
            {
                f"t{i:010d}_{(i % 500) * 1000}_{(i % 500) * 1000 + 10000}": "transient:1"
                for i in range(0, n, 10)
            }
        )
    )
    log = tmp_path / "work.log"
    cfg = _toy_run(
        tmp_path, n, f"toy:\n  batch_size: 3\n  backoff_s: 0.01\n  script: {script}\n  work_log: {log}\n"
    )
    procs = [_popen(cfg, "--shard", f"{i}/4") for i in range(4)] + [_popen(cfg, "--shard", "1/4")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes in ([0, 0, 0, 0, 3], [0, 0, 0, 0, 0]), results  # the duplicate refused, or ran after
    history = pd.read_parquet(tmp_path / "run" / "01-toy" / "ledger")
    current = history.sort_values("seq").drop_duplicates("clip_id", keep="last")
    assert len(current) == n and (current["status"] == "ok").all()
    assert not history.duplicated(["clip_id", "seq"]).any()
    status = json.loads(avcaps("status", "--config", str(cfg), "--json", check=True).stdout)
    toy = next(s for s in status["stages"] if s["stage"] == "01-toy")
    assert toy["ok"] == n and toy["pending"] == 0


def test_status_changes_nothing_and_names_the_run_log(tmp_path: Path) -> None:
    cfg = _toy_run(tmp_path, 6, "toy:\n  batch_size: 2\n")
    avcaps("run", "toy", "--config", str(cfg), "--no-progress", check=True)
    run = tmp_path / "run"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    status = json.loads(avcaps("status", "--config", str(cfg), "--json", check=True).stdout)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    toy = next(s for s in status["stages"] if s["stage"] == "01-toy")
    log = run / toy["log"]
    assert log.name.endswith("-01-toy.log") and log.with_suffix(".yaml").exists()
    text = log.read_text()
    assert "6 of 6 eligible items to do" in text and "ok 6" in text
    table = avcaps("status", "--config", str(cfg), check=True).stdout
    assert toy["log"] in table


def test_an_abort_is_in_the_run_log(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"t0000000002_2000_12000": "abort"}))
    cfg = _toy_run(tmp_path, 6, f"toy:\n  batch_size: 1\n  script: {script}\n")
    proc = avcaps("run", "toy", "--config", str(cfg), "--no-progress")
    assert proc.returncode == 2
    (log,) = (tmp_path / "run" / "runs").glob("*-01-toy.log")
    assert "ERROR aborted: the toy model is missing" in log.read_text()


def test_temp_files_are_cleaned_in_the_tmp_folder_without_walking_media(tmp_path: Path) -> None:
    import socket

    cfg = _toy_run(tmp_path, 2)
    host = socket.gethostname().replace("-", "_")
    dead = f".tmp-{host}-999999999-abcd-"
    tmp_dir = tmp_path / "run" / "media" / ".tmp"
    tmp_dir.mkdir(parents=True)
    (tmp_dir / f"{dead}x.mp4").write_bytes(b"partial")
    deep = tmp_path / "run" / "media" / "video" / "ab"
    deep.mkdir(parents=True)
    (deep / f"{dead}y.mp4").write_bytes(b"partial")  # a legacy leftover: harmless, never walked to
    avcaps("run", "toy", "--config", str(cfg), "--no-progress", check=True)
    assert not list(tmp_dir.iterdir()) and (deep / f"{dead}y.mp4").exists()


def test_manifest_ledger_schema_is_the_stage_schema(tmp_path: Path) -> None:
    cfg = _toy_run(tmp_path, 3)
    (part,) = (tmp_path / "run" / "00-manifest" / "ledger").glob("part-*.parquet")
    declared = Ledger(part.parent, ManifestStage.output_schema()).schema
    assert pq.read_schema(part).remove_metadata().equals(declared)
    assert cfg.exists()


def test_sigterm_commits_every_finished_item_and_logs_the_interruption(tmp_path: Path) -> None:
    """Group commit keeps fast batches' rows in memory for a while; a scheduler's SIGTERM (or
    Ctrl-C, or an abort) still commits every finished item before the process ends."""
    import signal

    log = tmp_path / "work.log"
    cfg = _toy_run(
        tmp_path,
        60,
        f"toy:\n  batch_size: 1\n  sleep_s: 0.05\n  commit_interval_s: 1000\n  work_log: {log}\n",
    )
    proc = _popen(cfg)
    _wait_for_work(log)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    worked = [line.split()[0] for line in log.read_text().splitlines()]
    assert 5 <= len(worked) < 60
    history = pd.read_parquet(tmp_path / "run" / "01-toy" / "ledger")
    # every item whose batch finished is committed (the one in flight at the signal may not be)
    assert len(worked) - 1 <= len(history) <= len(worked) and history["clip_id"].is_unique
    (run_log,) = (tmp_path / "run" / "runs").glob("*-01-toy.log")
    assert "ERROR interrupted" in run_log.read_text()
