"""Stage 4 through the runner and the CLI: killed mid-stage, it resumes without redoing or
duplicating finished clips.

Stage 0 runs for real on the AudioCaps test CSV; the ledgers of stages 1-3 are written here with
each stage's own output schema and the real ledger, as a real run leaves them: with a clip that
failed its download for good, one whose caption failed, and one whose caption was retried.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.ledger import Ledger
from pipeline.selection import stage_ledger
from stages.caption.stage import CaptionStage
from stages.download.stage import DownloadStage
from stages.keyframes import KeyframesStage

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
N_CLIPS = 12  # two of them fail upstream: 10 reach the merge


def avcaps(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``avcaps ARGS`` in a subprocess, its output to ``log`` (a pipe could fill up and block it)."""
    exe = Path(sys.executable).with_name("avcaps")
    with open(log, "ab") as fh:
        return subprocess.Popen([str(exe), *args], env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)


def write_upstream(workdir: Path, clip_ids: list[str], empty_visual: str) -> list[str]:
    """Stages 1-3 for ``clip_ids``; returns the clips that are ok all the way (what stage 4 gets)."""
    lost_download, lost_caption, retried = clip_ids[-1], clip_ids[-2], clip_ids[0]
    download, keyframes, caption = (
        stage_ledger(c, workdir) for c in (DownloadStage, KeyframesStage, CaptionStage)
    )
    download.commit(
        [
            {"clip_id": cid, "status": "ok", "attempts": 1, "video_path": f"media/video/{cid}.mp4"}
            if cid != lost_download
            else {"clip_id": cid, "status": "failed_permanent", "reason": "private", "attempts": 1}
            for cid in clip_ids
        ]
    )
    keyframes.commit(
        [
            {
                "clip_id": cid,
                "status": "ok",
                "attempts": 1,
                "frame_paths": [f"media/frames/{cid}/0.jpg"],
                "middle_frame": 0,
            }
            for cid in clip_ids
            if cid != lost_download
        ]
    )
    caption.commit(
        [
            {"clip_id": retried, "status": "failed_transient", "reason": "cuda_oom", "attempts": 1},
            {"clip_id": lost_caption, "status": "failed_permanent", "reason": "corrupt_frame", "attempts": 1},
        ]
    )
    caption.commit(
        [
            {
                "clip_id": cid,
                "status": "ok",
                "attempts": 2 if cid == retried else 1,
                "visual_caption": (
                    visual := "" if cid == empty_visual else "a man standing on a street next to a car"
                ),
                "frame_captions": [visual],
            }
            for cid in clip_ids
            if cid not in (lost_download, lost_caption)
        ]
    )
    return [c for c in clip_ids if c not in (lost_download, lost_caption)]


def test_kill_mid_stage_then_resume(tmp_path: Path, tiny_chat_model: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"""
manifest: {{csv_dir: {REPO}/manifests/audiocaps, splits: {{test: test.csv}}, sample_per_split: {N_CLIPS}}}
merge:
  backend: transformers
  model: {tiny_chat_model}
  device: cpu
  reasoning_effort: null
  max_new_tokens: 16
  batch_size: 1
  commit_interval_s: 0  # a commit per batch: the kill test watches parts appear
  max_quality_retries: 4
  score: false  # no stage-2 media in this run folder (tests/merge/test_scores.py scores merges)
  # A random-weight model writes word salad: only the structural checks can pass.
  min_audio_overlap: 0
  min_visual_overlap: 0
  max_invented: 1.0
  min_words: 1
"""
    )
    workdir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "AVCAPS_APP"} | {"PYTHONPATH": str(REPO)}
    flags = ["--config", str(cfg), "--workdir", str(workdir)]
    log = tmp_path / "avcaps.log"
    p0 = avcaps("run", "0", *flags, env=env, log=log)
    assert p0.wait(timeout=120) == 0, log.read_text()
    clip_ids = sorted(Ledger(workdir / "00-manifest" / "ledger").latest().index)
    assert len(clip_ids) == N_CLIPS
    clip_ids = write_upstream(workdir, clip_ids, empty_visual=clip_ids[3])

    ledger_dir = workdir / "04-merge" / "ledger"
    proc = avcaps("run", "merge", *flags, env=env, log=log)
    deadline = time.monotonic() + 240
    while len(list(ledger_dir.glob("part-*.parquet"))) < 2:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "no ledger part appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = set(Ledger(ledger_dir).read_all()["clip_id"])
    assert 2 <= len(done_before) < len(clip_ids), "the kill came too late to test a resume"

    p2 = avcaps("run", "merge", *flags, env=env, log=log)
    assert p2.wait(timeout=300) == 0, log.read_text()
    hist = Ledger(ledger_dir).read_all()
    assert hist["clip_id"].value_counts().max() == 1, "a clip was merged twice"
    assert set(hist["clip_id"]) == set(clip_ids)
    latest = Ledger(ledger_dir).latest()
    bad = latest.loc[clip_ids[3]]
    assert bad["status"] == "failed_permanent" and bad["reason"] == "bad_input"
    ok = latest[latest["status"] == "ok"]
    assert len(ok) >= len(clip_ids) - 2  # word salad may still fail a structural check 5 times running
    assert all(len(c) == 5 and all(c) for c in ok["merged_captions"])
    assert set(ok["merge_backend"]) == {"transformers"} and ok["merge_prompt_hash"].nunique() == 1

    log3 = tmp_path / "third.log"
    assert avcaps("run", "merge", *flags, env=env, log=log3).wait(timeout=120) == 0
    assert "nothing to do" in log3.read_text()
