"""Benchmark: stage 1's local sources (issue 23), each against the naive way in the same run.

Index (``index``): a folder of ``BENCH_SOURCE_NAMES`` (default 51,308 and 2,000,000) empty files
named as AudioSet copies are (``Y<youtube_id>.mp4``), indexed by the stage's own code
(:func:`stages.download.index.open_index`): the first build (walk + Parquet), a later run's
reopen (the folder's mtime checked, the Parquet read, the lookup dict built), and a lookup per
clip. Each in a process of its own, so its peak memory is its own (``ru_maxrss``, with the same
process's peak after the imports beside it). The naive way: a glob per clip (``Y<id>.*``), which
lists the folder every time, timed on a sample of clips.

Cut (``cut``): ``BENCH_CUT_CLIPS`` (default 24) 10-s clips cut from 60-s 640x480 H.264/AAC sources
with a moving picture, at starts spread over the source, to stage 1's format (x264 ultrafast,
<= 360 px, a keyframe a second, AAC): ours (PyAV in-process, :func:`stages.download.cut.cut`)
against one ffmpeg process per clip with the same settings (``-ss`` before ``-i``), rounds
alternating A B A B. Figures: clips per CPU-second (user + system, children included) and per
wall second.

``make bench`` runs both (pytest); ``python tests/benchmarks/bench_sources.py index|cut`` one.
Record the printed tables in BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from stages.tools import ffmpeg  # noqa: E402

NAMES = [int(n) for n in os.environ.get("BENCH_SOURCE_NAMES", "51308,2000000").split(",")]
CUT_CLIPS = int(os.environ.get("BENCH_CUT_CLIPS", "24"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def youtube_id(i: int) -> str:
    out = []
    for _ in range(11):
        i, r = divmod(i, 64)
        out.append(ALPHABET[r])
    return "".join(reversed(out))


def make_names(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        os.close(os.open(folder / f"Y{youtube_id(i * 7919)}.mp4", os.O_CREAT | os.O_WRONLY, 0o644))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- index, one step per process ---------------------------------------------------------------------
AUDIOCAPS = 51_308  # clips of an AudioCaps run


def index_step(folder: Path, index_dir: Path, step: str, n: int) -> dict[str, float]:
    """One measured step in this process: ``build`` (the first run: walk, write), ``reopen`` (a
    later run of 51,308 clips: the index read, entries of those clips kept for lookups),
    ``reopen-all`` (a run wanting every name), or ``naive`` (a glob per clip)."""
    import glob
    import random

    import pyarrow as pa
    import pyarrow.compute
    import pyarrow.parquet

    from stages.download.index import open_index
    from stages.download.sources import FolderSource, clip_keys

    # The baseline: this process's peak after its imports (pyarrow's included: not the index's).
    assert pyarrow.compute and pyarrow.parquet
    src = FolderSource(kind="folder", name="bench", path=str(folder), pattern="Y{youtube_id}.mp4")
    base = peak_mb()
    run = min(n, AUDIOCAPS) if step != "reopen-all" else n
    rng = random.Random(0)
    ids = [youtube_id(rng.randrange(run) * 7919) for _ in range(10_000)]
    out: dict[str, float] = {"imports_peak_mb": base}
    if step == "naive":
        sample = 100 if n < 100_000 else 5
        t0 = time.perf_counter()
        for yt in ids[:sample]:
            assert len(glob.glob(str(folder / f"Y{yt}.*"))) == 1
        out["lookup_ms"] = 1000 * (time.perf_counter() - t0) / sample
        return out
    wanted = pa.array([f"yt:{youtube_id(i * 7919)}" for i in range(run)])
    t0 = time.perf_counter()
    index = open_index(index_dir, src, "bench", wanted=wanted)
    out["seconds"] = time.perf_counter() - t0
    out["rebuilt"] = float(index.rebuilt is not None)
    out["peak_mb"] = peak_mb()
    t0 = time.perf_counter()
    for yt in ids:
        assert len(index.rows(clip_keys("video", {"youtube_id": yt}, ""))) == 1
    out["lookup_us"] = 1e6 * (time.perf_counter() - t0) / len(ids)
    return out


def step_main() -> None:
    """Child process: one index step, its figures as one JSON line."""
    folder, index_dir, step, n = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    print(json.dumps(index_step(Path(folder), Path(index_dir), step, n)))


def run_index(n: int, root: Path) -> dict[str, dict[str, float]]:
    folder, index_dir = root / f"names-{n}", root / f"index-{n}"
    t0 = time.perf_counter()
    make_names(folder, n)
    print(f"  {n:,} empty files made in {time.perf_counter() - t0:.1f} s", flush=True)
    results = {}
    for step in ("build", "reopen", "reopen-all", "naive"):
        code = "import sys, json; sys.path.insert(0, sys.argv[1]); import bench_sources as b; b.step_main()"
        args = [
            sys.executable,
            "-c",
            code,
            str(Path(__file__).parent),
            str(folder),
            str(index_dir),
            step,
            str(n),
        ]
        proc = subprocess.run(args, capture_output=True, text=True, check=True, cwd=REPO)
        results[step] = json.loads(proc.stdout.strip().splitlines()[-1])
    size = (index_dir / "bench.parquet").stat().st_size
    results["build"]["index_mb"] = size / 2**20
    shutil.rmtree(folder)
    return results


def index_table(all_results: dict[int, dict[str, dict[str, float]]]) -> str:
    lines = [
        "| names | first build (peak RSS) | index file | later run of 51,308 clips: reopen (peak RSS) | "
        "of every name: reopen (peak RSS) | lookup per clip | naive: glob per clip |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, r in all_results.items():
        b, o, a, g = r["build"], r["reopen"], r["reopen-all"], r["naive"]
        assert not o["rebuilt"] and not a["rebuilt"], "a later run rebuilt the index"
        lines.append(
            f"| {n:,} | {b['seconds']:.1f} s ({b['peak_mb']:.0f} MB) | {b['index_mb']:.1f} MB | "
            f"{o['seconds']:.2f} s ({o['peak_mb']:.0f} MB) | {a['seconds']:.2f} s ({a['peak_mb']:.0f} MB) | "
            f"{o['lookup_us']:.1f} µs | {g['lookup_ms']:.1f} ms |"
        )
    base = next(iter(all_results.values()))["build"]["imports_peak_mb"]
    lines.append(f"\nPeak RSS of each step's own process; after its imports alone: {base:.0f} MB.")
    return "\n".join(lines)


# -- cut ---------------------------------------------------------------------------------------------
def make_source(dest: Path, seconds: int, tone_hz: int) -> None:
    video = f"testsrc2=s=640x480:r=25:d={seconds}"
    audio = f"sine=frequency={tone_hz}:sample_rate=44100:duration={seconds}"
    cmd = [
        ffmpeg(),
        "-nostdin",
        "-loglevel",
        "error",
        "-y",
        "-f",
        "lavfi",
        "-i",
        video,
        "-f",
        "lavfi",
        "-i",
        audio,
    ]
    cmd += [
        "-c:v",
        "libx264",
        "-preset",
        "veryfast",
        "-g",
        "50",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        str(dest),
    ]
    subprocess.run(cmd, check=True)


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def cut_ours(jobs: list[tuple[Path, int, Path]]) -> None:
    from stages.download.cut import Encoding, Input, cut

    enc = Encoding(max_height=360, keyframe_interval_s=1.0, preset="ultrafast")
    for src, start, dest in jobs:
        cut(Input(src, float(start)), 10.0, dest, enc)


def cut_ffmpeg(jobs: list[tuple[Path, int, Path]]) -> None:
    for src, start, dest in jobs:
        cmd = [
            ffmpeg(),
            "-nostdin",
            "-loglevel",
            "error",
            "-y",
            "-ss",
            str(start),
            "-i",
            str(src),
            "-t",
            "10",
        ]
        cmd += [
            "-vf",
            "scale=-2:'min(ih,360)'",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
        ]
        cmd += ["-force_key_frames", "expr:gte(t,n_forced*1)", "-c:a", "aac", str(dest)]
        subprocess.run(cmd, check=True)


def run_cut(root: Path) -> dict[str, list[tuple[float, float]]]:
    sources = []
    for k in range(4):
        src = root / f"source{k}.mp4"
        make_source(src, 60, 300 + 100 * k)
        sources.append(src)
    starts = [5, 17, 31, 44]
    jobs = [
        (sources[i % 4], starts[(i // 4) % 4], root / "out" / f"clip{i:04d}.mp4") for i in range(CUT_CLIPS)
    ]
    (root / "out").mkdir()
    from stages.download.media import decode_media

    results: dict[str, list[tuple[float, float]]] = {"ours (PyAV in-process)": [], "one ffmpeg per clip": []}
    for _ in range(ROUNDS):
        for name, fn in (("ours (PyAV in-process)", cut_ours), ("one ffmpeg per clip", cut_ffmpeg)):
            w0, c0 = time.perf_counter(), cpu_seconds()
            fn(jobs)
            results[name].append((time.perf_counter() - w0, cpu_seconds() - c0))
            info = decode_media(jobs[0][2])  # both wrote a 10-s clip of 360 rows
            assert abs(info["video_end_s"] - 10) < 0.2 and info["height"] == 360, info
    return results


def cut_table(results: dict[str, list[tuple[float, float]]]) -> str:
    import statistics

    lines = ["| way | clips/CPU-s (median of rounds) | clips/s wall | CPU-s per clip |", "|---|---|---|---|"]
    med = {}
    for name, runs in results.items():
        cpu = statistics.median(c for _, c in runs)
        wall = statistics.median(w for w, _ in runs)
        med[name] = cpu
        lines.append(f"| {name} | {CUT_CLIPS / cpu:.2f} | {CUT_CLIPS / wall:.2f} | {cpu / CUT_CLIPS:.3f} |")
    ours, naive = med["ours (PyAV in-process)"], med["one ffmpeg per clip"]
    lines.append(
        f"\nours / naive, clips per CPU-second: {naive / ours:.2f}x ({CUT_CLIPS} clips, {ROUNDS} rounds A B)"
    )
    return "\n".join(lines)


def test_index_at_scale(tmp_path: Path) -> None:
    results = {n: run_index(n, tmp_path) for n in NAMES}
    print("\n" + index_table(results))


def test_cut_against_one_ffmpeg_per_clip(tmp_path: Path) -> None:
    print("\n" + cut_table(run_cut(tmp_path)))


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "both"
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        if what in ("index", "both"):
            print(index_table({n: run_index(n, Path(tmp)) for n in NAMES}))
        if what in ("cut", "both"):
            print(cut_table(run_cut(Path(tmp))))
