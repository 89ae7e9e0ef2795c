"""Stage 3 through the runner (``avcaps run caption``), upstream ledgers written to the contract."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.io import folder_fingerprint
from pipeline.ledger import Ledger

N_CLIPS = 30


def avcaps(args: list[str], env: dict[str, str], **kw: Any) -> subprocess.Popen[bytes]:
    code = "import sys; from pipeline.cli import main; sys.exit(main())"
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, **kw)


def write_config(tmp_path: Path, model: Path, clip: Path) -> Path:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"workdir: {tmp_path / 'run'}\n"
        f"scoring:\n  clip_model: {clip}\n"
        "caption:\n"
        f"  model: {model}\n"
        "  batch_size: 1\n"
        "  num_beams: 2\n"
        "  max_new_tokens: 12\n"
        "  commit_interval_s: 0\n"  # a commit per batch: the kill test watches parts appear
    )
    return cfg


@pytest.mark.slow
def test_resume_after_kill_finishes_each_clip_exactly_once(
    tmp_path: Path,
    tiny_blip2: Path,
    tiny_clip: Path,
    items_factory: Any,
    upstream_ledgers: Any,
    upstream_app: dict[str, str],
) -> None:
    workdir = tmp_path / "run"
    items = items_factory(workdir, n_clips=N_CLIPS, frames=2)
    upstream_ledgers(workdir, items)
    cfg = write_config(tmp_path, tiny_blip2, tiny_clip)
    args = ["run", "caption", "--config", str(cfg), "--no-progress"]
    ledger_dir = workdir / "03-caption" / "ledger"

    proc = avcaps(args, upstream_app, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(ledger_dir.glob("part-*.parquet"))) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the stage finished before it could be killed: " + proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    ledger = Ledger(ledger_dir)
    done_before = set(ledger.latest().query("status == 'ok'").index)
    assert 3 <= len(done_before) < N_CLIPS

    rerun = avcaps(args, upstream_app, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err.decode()

    history = ledger.read_all()
    ok = history[history["status"] == "ok"]
    assert sorted(ok["clip_id"]) == sorted(it.clip_id for it in items)  # every clip ok exactly once
    assert not list(ledger_dir.glob(".tmp-*"))
    assert all(len(caps) == 2 for caps in ok["frame_captions"])


def test_runner_run_status_and_stats(
    tmp_path: Path,
    tiny_blip2: Path,
    tiny_clip: Path,
    items_factory: Any,
    upstream_ledgers: Any,
    upstream_app: dict[str, str],
) -> None:
    import json

    from pipeline.cli import load_context
    from pipeline.registry import find_stage
    from pipeline.runner import run_stage
    from pipeline.stage import RunOptions

    workdir = tmp_path / "run"
    items = items_factory(workdir, n_clips=5, frames=3)
    (workdir / items[2]["frame_paths"][0]).write_bytes(b"\xff\xd8 broken")
    upstream_ledgers(workdir, items)
    ctx = load_context(write_config(tmp_path, tiny_blip2, tiny_clip), None, ("caption.batch_size=2",))
    report = run_stage(find_stage("caption"), ctx, RunOptions(progress=False))
    assert report.counts == {"ok": 4, "failed_permanent": 1}
    state = Ledger(workdir / "03-caption" / "ledger").latest()
    assert state.loc[items[2].clip_id, "reason"] == "corrupt_frame"
    assert state.loc[items[0].clip_id, "visual_caption"] == state.loc[items[0].clip_id, "frame_captions"][1]
    # The CLIP scores reach the ledger through the runner: one per frame caption, as float32.
    ok = state[state["status"] == "ok"]
    assert all(len(s) == 3 and all(-1 <= x <= 1 for x in s) for s in ok["visual_clip_score"])
    assert set(ok["clip_model"]) == {f"{tiny_clip}@{folder_fingerprint(tiny_clip)}"}
    stats = json.loads((workdir / "03-caption" / "stats.json").read_text())
    assert stats["summary"]["frames_captioned"] == 12  # frames after the broken one are skipped
    again = run_stage(find_stage("caption"), ctx, RunOptions(progress=False))
    assert again.selected == 0  # nothing redone


def test_a_full_ledger_disk_stops_the_run_and_a_rerun_finishes(
    tmp_path: Path,
    tiny_blip2: Path,
    tiny_clip: Path,
    items_factory: Any,
    upstream_ledgers: Any,
    upstream_app: dict[str, str],
    tmpfs: Any,
) -> None:
    """Stage 3 writes only its ledger: a commit that cannot be written (a real tmpfs that fills)
    stops the run with exit 5 and one line naming the ledger's disk, never a traceback, and no
    row is lost or half-written: a rerun once there is room captions each remaining clip once."""
    workdir = tmp_path / "run"
    items = items_factory(workdir, n_clips=12, frames=1)
    upstream_ledgers(workdir, items)
    cfg = write_config(tmp_path, tiny_blip2, tiny_clip)
    ledger_dir = tmpfs(workdir / "03-caption" / "ledger", "40k")
    args = ["run", "caption", "--config", str(cfg), "--no-progress", "--set", "caption.min_free_mb=0"]

    proc = avcaps(args, upstream_app, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 5, err
    said = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(said) == 1 and "Traceback" not in err and " ERROR " not in err, err
    (line,) = said
    assert line.startswith("error: no space left on device") and str(ledger_dir) in line, line
    assert "free of 41.0 KB" in line and "are redone by the next run" in line, line
    ledger = Ledger(ledger_dir)
    done = ledger.read_all()
    assert 1 <= len(done) < len(items) and set(done["status"]) == {"ok"}
    assert not list(ledger_dir.glob(".tmp-*"))  # no half-written part left

    tmpfs.resize(ledger_dir, "16m")
    rerun = avcaps(args, upstream_app, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    history = ledger.read_all()
    assert set(history["status"]) == {"ok"}
    assert sorted(history["clip_id"]) == sorted(it.clip_id for it in items)  # each clip once
