"""Benchmark: stage 2 (keyframes + audio) with the local executor against ``--executor ray`` on
this machine, in the same run: Ray's overhead per item. Both use the stage's own code path.

Clips: ``BENCH_RAY_CLIPS`` (default 96) 10-s H.264 clips generated with ffmpeg (4 encoded, the
rest copies), with a ``01-download`` ledger as a real run leaves it (its own schema, a retried clip
and two failed ones: ``LOST``), so that stage 2 runs through the runner exactly as after a
download. Same total parallelism on both sides: local = one process, ``keyframes.workers`` = 2
threads; Ray = a local 2-CPU cluster, 2 tasks in flight, 1 thread each. Record the printed table
in BENCHMARKS.md.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from pipeline.cli import load_context
from pipeline.ledger import Ledger
from pipeline.registry import find_stage
from pipeline.runner import run_stage
from pipeline.stage import RunContext, RunOptions
from stages.download.stage import DownloadStage
from standins.media import make_clip
from standins.run_history import Failure, clip_history, commit_histories

N_CLIPS = int(os.environ.get("BENCH_RAY_CLIPS", "96"))
# Clips past the N_CLIPS downloaded ones whose download failed, as in any real run: stage 2 must
# skip them (the first clip, for its part, was downloaded on its second try).
LOST = {
    0: Failure(DownloadStage, "removed"),
    1: Failure(DownloadStage, "http_429", "failed_transient"),
}


def prepare(workdir: Path, clips_dir: Path) -> RunContext:
    ids = [f"ray{i:08d}" for i in range(N_CLIPS + len(LOST))]
    csv_dir = workdir.parent / f"{workdir.name}-csv"
    csv_dir.mkdir(parents=True)
    lines = ["audiocap_id,youtube_id,start_time,caption"] + [
        f"{i + 1},{y},0,a tone" for i, y in enumerate(ids)
    ]
    (csv_dir / "test.csv").write_text("\n".join(lines) + "\n")
    ctx = load_context(
        Path("manifests/demo.yaml"),
        workdir,
        (
            f"manifest.csv_dir={csv_dir}",
            "manifest.checksums=null",
            "manifest.sample_per_split=null",
            "keyframes.batch_size=8",
        ),
    )
    run_stage(find_stage("manifest"), ctx, RunOptions(progress=False))
    histories = []
    for i, yt in enumerate(ids):
        cid = f"{yt}_0_10000"
        rel = f"media/video/{cid}.mp4"
        failure = LOST.get(i - N_CLIPS)
        if failure is None:
            (workdir / "media" / "video").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(clips_dir / f"{i % 4}.mp4", workdir / rel)
        outputs = {
            "video_path": rel,
            "video_duration_s": 10.0,
            "audio_duration_s": 10.0,
            "source_duration_s": 10.0,
            "video_width": 640,
            "video_height": 360,
            "file_bytes": (clips_dir / f"{i % 4}.mp4").stat().st_size,
            "source_url": f"https://www.youtube.com/watch?v={yt}",
        }
        tries = ctx.config.download.max_attempts  # type: ignore[attr-defined]
        rows = clip_history(DownloadStage, cid, outputs, failure=failure, retried=i == 0, max_attempts=tries)
        histories.append({DownloadStage: rows})
    commit_histories(workdir, histories)
    return ctx


def test_bench_ray_overhead(tmp_path: Path) -> None:
    import ray

    clips_dir = tmp_path / "clips"
    clips_dir.mkdir()
    for k in range(4):
        os.replace(
            make_clip(clips_dir / f"c{k}", 10, size="640x360", fps=25, tone_hz=300 + 100 * k),
            clips_dir / f"{k}.mp4",
        )
    local = prepare(tmp_path / "local", clips_dir)
    distributed = prepare(tmp_path / "ray", clips_dir)
    t_init0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    t_init = time.perf_counter() - t_init0
    try:
        t0 = time.perf_counter()
        run_stage(
            find_stage("keyframes"),
            load_context(
                Path("manifests/demo.yaml"),
                local.workdir,
                (
                    f"manifest.csv_dir={local.config.manifest.csv_dir}",
                    "keyframes.workers=2",
                    "keyframes.batch_size=8",
                ),
            ),
            RunOptions(progress=False),
        )
        t_local = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_stage(
            find_stage("keyframes"),
            load_context(
                Path("manifests/demo.yaml"),
                distributed.workdir,
                (
                    f"manifest.csv_dir={distributed.config.manifest.csv_dir}",
                    "keyframes.workers=1",
                    "keyframes.batch_size=8",
                ),
            ),
            RunOptions(progress=False, executor="ray", concurrency=2),
        )
        t_ray = time.perf_counter() - t0
    finally:
        ray.shutdown()
    for ctx in (local, distributed):
        led = Ledger(ctx.workdir / "02-keyframes" / "ledger").latest()
        assert (led["status"] == "ok").all()
        assert set(led.index) == {f"ray{i:08d}_0_10000" for i in range(N_CLIPS)}  # never a LOST clip
    per_item_ms = (t_ray - t_local) / N_CLIPS * 1000
    print(f"\nstage 2, {N_CLIPS} clips, 1 frame + audio, batch 8, {os.cpu_count()} cores")
    print("| executor | wall s | clips/s |")
    print("|---|---|---|")
    print(f"| local (1 process, 2 threads) | {t_local:.2f} | {N_CLIPS / t_local:.1f} |")
    print(f"| ray (2-CPU local cluster, 2 tasks) | {t_ray:.2f} | {N_CLIPS / t_ray:.1f} |")
    print(f"Ray overhead: {per_item_ms:+.1f} ms per item; ray.init itself {t_init:.1f} s (not counted)")
