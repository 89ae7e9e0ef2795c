"""Benchmark: stage 1's per-clip cost of finding a clip's file, as the media folder fills up.

Before, each clip looked for a file left by a killed run with ``media/video/<clip_id>.*`` (a
glob: it lists the whole flat folder), so the cost grew with the number of clips already
downloaded and a full run was quadratic. Now clips live at ``media/video/<2 hex>/<clip_id>.<ext>``
and the lookup is a few ``stat`` calls (:func:`stages.download.layout.existing_videos`, the stage's own
function), whatever the folder holds.

For each size in ``BENCH_MEDIA_SIZES`` (default 0, 2000, 20000, 51308: AudioCaps), the same number
of files is laid out both ways in a fresh folder, then clips not yet there are looked up (the case
of every new clip): the glob in the flat folder (the naive way, the code before) and the stage's
lookup in the hashed one. Printed as a table for BENCHMARKS.md.

    python tests/benchmarks/bench_media_paths.py          (or: make bench)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from stages.download.layout import existing_videos, video_path  # noqa: E402

SIZES = [int(x) for x in os.environ.get("BENCH_MEDIA_SIZES", "0,2000,20000,51308").split(",")]
LOOKUPS = int(os.environ.get("BENCH_MEDIA_LOOKUPS", "200"))


def clip(i: int) -> str:
    return f"{i:011d}_30000_40000"


def fill(media: Path, n: int, hashed: bool) -> None:
    (media / "video").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = video_path(media, clip(i)) if hashed else media / "video" / f"{clip(i)}.mp4"
        path.parent.mkdir(exist_ok=True)
        path.touch()


def per_lookup_us(fn: object, ids: list[str]) -> float:
    """Median of 3 rounds of the mean time per lookup, in microseconds."""
    rounds = []
    for _ in range(3):
        t0 = time.perf_counter()
        for cid in ids:
            fn(cid)  # type: ignore[operator]
        rounds.append((time.perf_counter() - t0) / len(ids) * 1e6)
    return statistics.median(rounds)


def measure(root: Path, n: int) -> dict[str, float]:
    flat, hashed = root / f"flat-{n}" / "media", root / f"hashed-{n}" / "media"
    fill(flat, n, hashed=False)
    fill(hashed, n, hashed=True)
    new_ids = [clip(10**9 + i) for i in range(LOOKUPS)]  # not there yet: every new clip's case
    naive_ids = new_ids[: max(20, LOOKUPS // 4)]  # fewer: each takes up to tens of ms
    glob_us = per_lookup_us(lambda cid: list((flat / "video").glob(f"{cid}.*")), naive_ids)
    stat_us = per_lookup_us(lambda cid: existing_videos(hashed, cid), new_ids)
    # A file that is there is found both ways (the lookups do the same job).
    assert list((flat / "video").glob(f"{clip(0)}.*")) == ([flat / "video" / f"{clip(0)}.mp4"] if n else [])
    assert existing_videos(hashed, clip(0)) == ([video_path(hashed, clip(0))] if n else [])
    return {"files": n, "glob_us": glob_us, "stat_us": stat_us}


def run() -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="bench-media-") as tmp:
        rows = [measure(Path(tmp), n) for n in SIZES]
    head = ("files in media/video", "glob, flat (us/clip)", "stat, hashed (us/clip)", "glob/stat")
    print(f"\n{head[0]:>22} {head[1]:>22} {head[2]:>24} {head[3]:>10}")
    for r in rows:
        ratio = r["glob_us"] / r["stat_us"] if r["stat_us"] else float("nan")
        print(f"{r['files']:>22,} {r['glob_us']:>22,.1f} {r['stat_us']:>24,.1f} {ratio:>9,.1f}x")
    last = rows[-1]
    n = int(last["files"])
    if n:
        # Clip k pays a glob over k files: about n/2 files per clip on average over a full run.
        total_glob = last["glob_us"] / 2 * n / 1e6
        total_stat = last["stat_us"] * n / 1e6
        print(f"a run of {n:,} clips: ~{total_glob / 60:,.1f} min of globs, {total_stat:,.2f} s of stats")
    return rows


def test_bench_media_paths() -> None:
    rows = run()
    # What the benchmark is for: the stage's lookup does not grow with the folder.
    assert rows[-1]["stat_us"] < 20 * max(rows[0]["stat_us"], 1.0)


if __name__ == "__main__":
    run()
