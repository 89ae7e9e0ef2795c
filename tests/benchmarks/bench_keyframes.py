"""Benchmark: stage 2 (keyframes + 16 kHz audio) against the naive way, in the same run.

Clips: ``BENCH_CLIPS`` (default 200) 10-s clips as stage 1 leaves them: 640x360 25 fps H.264
(x264 ultrafast, a keyframe every second: stage 1's ``-force_key_frames``), AAC stereo 44.1 kHz,
with a moving test pattern (``testsrc2``) so decoding costs what it costs on real video. Four
distinct clips are encoded and copied, to keep set-up short.

- ours: ``KeyframesStage.process`` (the production code: PyAV in-process, JPEG + FLAC written
  atomically), 1 and 2 worker threads;
- naive: one ``ffmpeg -ss T -i clip -frames:v 1`` process per frame plus one ffmpeg process for
  the audio (``-ac 1 -ar 16000``), one clip after another.

Both write the same outputs (JPEGs of the same size, a 16 kHz mono FLAC). Figures: clips per
second of wall time and clips per CPU-second (user + system, children included), i.e. per core.
Run with ``make bench``; record the printed table in BENCHMARKS.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.stage import Item, RunContext
from stages.config import RunConfig
from stages.keyframes import KeyframesStage, frame_targets
from stages.tools import ffmpeg

N_CLIPS = int(os.environ.get("BENCH_CLIPS", "200"))
MAX_SIDE = 384


def encode_clip(dest: Path, tone_hz: int) -> None:
    video = "testsrc2=s=640x360:r=25:d=10"
    audio = f"sine=frequency={tone_hz}:sample_rate=44100:duration=10"
    cmd = [ffmpeg(), "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", video]
    cmd += ["-f", "lavfi", "-i", audio, "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    cmd += ["-force_key_frames", "expr:gte(t,n_forced*1)", "-c:a", "aac", "-ac", "2", "-t", "10", str(dest)]
    subprocess.run(cmd, check=True)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Item]]:
    wd = tmp_path_factory.mktemp("bench")
    video = wd / "media" / "video"
    video.mkdir(parents=True)
    bases = []
    for k in range(4):
        base = wd / f"base{k}.mp4"
        encode_clip(base, 300 + 100 * k)
        bases.append(base)
    items = []
    for i in range(N_CLIPS):
        cid = f"clip{i:05d}_0_10000"
        shutil.copyfile(bases[i % 4], video / f"{cid}.mp4")
        data = {"video_path": f"media/video/{cid}.mp4", "start_s": 0, "end_s": 10, "video_duration_s": 10.0}
        items.append(Item(cid, data))
    return wd, items


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measure(fn: Callable[[], None]) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - w0, cpu_seconds() - c0


def ours(wd: Path, items: list[Item], frames: int, workers: int) -> None:
    cfg = RunConfig()
    cfg.keyframes = cfg.keyframes.model_copy(update={"frames": frames, "workers": workers})
    stage = KeyframesStage(RunContext(wd, cfg))
    for i in range(0, len(items), cfg.keyframes.batch_size):
        results = stage.process(items[i : i + cfg.keyframes.batch_size])
        bad = [r for r in results if r.status != "ok"]
        assert not bad, bad[0].message


def naive(wd: Path, items: list[Item], frames: int) -> None:
    out = wd / "naive"
    exe = ffmpeg()  # the system's, else imageio-ffmpeg's (stages/tools.py), as everywhere
    scale = f"scale='if(gt(iw,ih),min({MAX_SIDE},iw),-2)':'if(gt(iw,ih),-2,min({MAX_SIDE},ih))'"
    for item in items:
        src = str(wd / item["video_path"])
        dest = out / item.clip_id
        dest.mkdir(parents=True, exist_ok=True)
        for k, t in enumerate(frame_targets(10.0, frames)):
            cmd = [exe, "-nostdin", "-loglevel", "error", "-y", "-ss", f"{t:.3f}", "-i", src]
            cmd += ["-frames:v", "1", "-vf", scale, "-q:v", "3", str(dest / f"{k}.jpg")]
            subprocess.run(cmd, check=True)
        cmd = [exe, "-nostdin", "-loglevel", "error", "-y", "-i", src, "-vn", "-ac", "1"]
        cmd += ["-ar", "16000", "-t", "10", str(dest / "audio.flac")]
        subprocess.run(cmd, check=True)


def test_bench_keyframes(clips: tuple[Path, list[Item]]) -> None:
    wd, items = clips
    n = len(items)
    rows = []
    for frames in (1, 8):
        runs = {
            "naive (ffmpeg per frame + audio)": lambda f=frames: naive(wd, items, f),
            "ours, 1 worker": lambda f=frames: ours(wd, items, f, 1),
            "ours, 2 workers": lambda f=frames: ours(wd, items, f, 2),
        }
        base: tuple[float, float] | None = None
        for name, fn in runs.items():
            wall, cpu = measure(fn)
            base = base or (wall, cpu)
            rows.append((frames, name, wall, cpu, base[0] / wall, base[1] / cpu))
    print(f"\nstage 2 on {n} clips (10 s, 640x360 25 fps H.264, AAC 44.1 kHz stereo), nproc={os.cpu_count()}")
    head = f"{'frames':>6}  {'way':<34}{'wall s':>8}{'CPU s':>8}{'clips/s':>9}{'clips/CPU-s':>13}"
    print(f"{head}{'x naive (wall)':>16}{'x naive (CPU)':>15}")
    for frames, name, wall, cpu, x_wall, x_cpu in rows:
        figures = f"{wall:>8.1f}{cpu:>8.1f}{n / wall:>9.1f}{n / cpu:>13.1f}{x_wall:>15.1f}x{x_cpu:>14.1f}x"
        print(f"{frames:>6}  {name:<34}{figures}")
