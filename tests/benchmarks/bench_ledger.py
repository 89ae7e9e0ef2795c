"""Benchmark: the engine and its ledger at AudioSet scale, on the toy stage (no media, no model).

What it measures, each as the real CLI in a fresh process (wall seconds and peak RSS from
``/usr/bin/time``), on a generated AudioCaps-style CSV of ``BENCH_LEDGER_ITEMS`` clips (default
2,000,000):

1. ``avcaps run 0``: the clip table;
2. a toy-stage run at batch size 8 committing every batch (the worst case for the ledger: one part
   file per 8 items, as before group commits) stopped with Ctrl-C after ``BENCH_LEDGER_STOP_S``
   seconds (default 30), which leaves the ledger an interrupted run leaves;
3. ``avcaps status --json`` on that run folder;
4. the resumed run with ``--limit 8``: its time to the first (and only) batch, stats included;
5. the engine's cost per item: a run of ``BENCH_LEDGER_OVERHEAD_ITEMS`` (20,000) more items with
   the default group commit, as timed by the runner's own loop (the toy stage does no work);
6. ``BENCH_LEDGER_SHARDS`` (default 16) processes ``--shard i/16`` at once on a
   ``BENCH_LEDGER_SHARD_ITEMS``-item (default 200,000) table: wall time, and exactly one ok row
   per item in the end.

``BENCH_LEDGER_STEPS=scale`` (or ``concurrency``) runs one half.
``BENCH_LEDGER_REPO=/path/to/checkout`` runs the same steps with another checkout's code (the
"before" column of BENCHMARKS.md comes from the commit before the ledger rewrite). Rows print as
they are measured; record them in BENCHMARKS.md with the date, the machine and the command.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = Path(os.environ.get("BENCH_LEDGER_REPO", HERE.parents[1])).resolve()
TOY = REPO / "tests" / "pipeline"
ITEMS = int(os.environ.get("BENCH_LEDGER_ITEMS", "2000000"))
STOP_S = float(os.environ.get("BENCH_LEDGER_STOP_S", "30"))
SHARDS = int(os.environ.get("BENCH_LEDGER_SHARDS", "16"))
SHARD_ITEMS = int(os.environ.get("BENCH_LEDGER_SHARD_ITEMS", "200000"))
OVERHEAD_ITEMS = int(os.environ.get("BENCH_LEDGER_OVERHEAD_ITEMS", "20000"))
# `commit_interval_s` exists since group commits; the code before them committed every batch anyway.
PER_BATCH = (
    ["--set", "toy.commit_interval_s=0"]
    if "commit_interval_s" in (REPO / "pipeline" / "config.py").read_text()
    else []
)


def write_csv(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    words = ("a dog barks", "rain falls on a roof", "a man speaks", "an engine idles", "birds chirp")
    with open(folder / "train.csv", "w") as fh:
        fh.write("audiocap_id,youtube_id,start_time,caption\n")
        for i in range(n):
            fh.write(f"{i + 1},{i:011d},{i % 590},{words[i % 5]} while {words[(i // 5) % 5]}\n")
    return folder


def write_config(path: Path, workdir: Path, csv_dir: Path) -> Path:
    # The toy stage does no work of its own (`write_file: false`) where the code has that switch.
    quiet = "  write_file: false\n" if "write_file" in (TOY / "toyapp.py").read_text() else ""
    path.write_text(
        f"workdir: {workdir}\nmanifest:\n  csv_dir: {csv_dir}\n  splits: {{train: train.csv}}\n"
        f"  checksums: null\ntoy:\n  batch_size: 8\n{quiet}"
    )
    return path


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["AVCAPS_APP"] = "toyapp"
    e["PYTHONPATH"] = os.pathsep.join([str(TOY), str(REPO)])
    return e


def timed(args: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``avcaps ARGS`` under /usr/bin/time; wall seconds, peak RSS (GB), exit code, output."""
    cmd = ["/usr/bin/time", "-f", "TIME %e %M", sys.executable, "-m", "pipeline.cli", *args]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)  # what a user's Ctrl-C does
        out, err = proc.communicate()
    wall = time.monotonic() - t0
    m = re.search(r"TIME ([\d.]+) (\d+)", err)
    return {
        "wall_s": round(wall, 1),
        "rss_gb": round(int(m.group(2)) / 1e6, 2) if m else float("nan"),
        "rc": proc.returncode,
        "stdout": out,
        "out": out[-400:] + err[-800:],
    }


def ledger_rows(workdir: Path, dirname: str) -> tuple[int, int]:
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    folder = workdir / dirname / "ledger"
    if not folder.exists():
        return 0, 0
    table = ds.dataset(folder, format="parquet").to_table(columns=["clip_id", "status"])
    ok = table.filter(pc.equal(table["status"], "ok"))
    return ok.num_rows, pc.count_distinct(ok["clip_id"]).as_py()


def parts(workdir: Path, dirname: str) -> int:
    return len(list((workdir / dirname / "ledger").glob("part-*.parquet")))


def scale(tmp: Path) -> list[tuple[str, str]]:
    csv_dir = write_csv(tmp / "csv", ITEMS)
    cfg = write_config(tmp / "toy.yaml", tmp / "run", csv_dir)
    rows: list[tuple[str, str]] = []
    s0 = timed(["run", "0", "--config", str(cfg), "--no-progress"])
    assert s0["rc"] == 0, s0["out"]
    rows.append((f"stage 0, {ITEMS:,} clips", f"{s0['wall_s']} s, {s0['rss_gb']} GB"))
    # Worst case for the ledger: a commit per batch of 8 (as the engine did before group commits),
    # stopped mid-way like a killed job.
    run = timed(["run", "toy", "--config", str(cfg), "--no-progress", *PER_BATCH], timeout=STOP_S)
    done = ledger_rows(tmp / "run", "01-toy")[0]
    assert done < ITEMS, f"the stopped run finished all {ITEMS} items: lower BENCH_LEDGER_STOP_S"
    per_item = STOP_S / done * 1000 if done else float("inf")
    rows.append(
        (
            f"toy stage, batch 8, a commit per batch, stopped after {STOP_S:.0f} s",
            f"{done:,} items done ({per_item:.2f} ms/item all in), "
            f"{parts(tmp / 'run', '01-toy'):,} part files, {run['rss_gb']} GB",
        )
    )
    st = timed(["status", "--config", str(cfg), "--json"])
    assert st["rc"] == 0, st["out"]
    rows.append(("avcaps status --json", f"{st['wall_s']} s, {st['rss_gb']} GB"))
    res = timed(["run", "toy", "--config", str(cfg), "--no-progress", "--limit", "8"])
    assert res["rc"] == 0, res["out"]
    rows.append(
        ("resumed run --limit 8 (first batch, stats included)", f"{res['wall_s']} s, {res['rss_gb']} GB")
    )
    # Engine cost per item: a run of OVERHEAD_ITEMS items, timed by the runner itself (its loop
    # only: no start-up, no stats), on a toy stage that does no work of its own.
    ovh = timed(["run", "toy", "--config", str(cfg), "--no-progress", "--limit", str(OVERHEAD_ITEMS)])
    assert ovh["rc"] == 0, ovh["out"]
    last = json.loads((tmp / "run" / "01-toy" / "stats.json").read_text())["last_run"]
    ms = last["seconds"] / last["processed"] * 1000
    rows.append((f"engine overhead, batch 8, {OVERHEAD_ITEMS:,} items", f"{ms:.3f} ms/item (runner loop)"))
    return rows


def concurrency(tmp: Path) -> list[tuple[str, str]]:
    csv_dir = write_csv(tmp / "csv-shards", SHARD_ITEMS)
    cfg = write_config(tmp / "shards.yaml", tmp / "run-shards", csv_dir)
    assert timed(["run", "0", "--config", str(cfg), "--no-progress"])["rc"] == 0
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline.cli",
                "run",
                "toy",
                "--config",
                str(cfg),
                "--no-progress",
                "--shard",
                f"{i}/{SHARDS}",
            ],
            cwd=REPO,
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / f"shard-{i}.err", "w"),  # noqa: SIM115 (closed with the process)
        )
        for i in range(SHARDS)
    ]
    codes = [p.wait() for p in procs]
    wall = time.monotonic() - t0
    # A shard that crashed is a result too (the ledger before the rewrite lost shards this way):
    # report its last error line instead of stopping the benchmark.
    errors = {
        i: (tmp / f"shard-{i}.err").read_text().strip().splitlines()[-1:] for i, rc in enumerate(codes) if rc
    }
    ok_rows, ok_items = ledger_rows(tmp / "run-shards", "01-toy")
    status = timed(["status", "--config", str(cfg), "--json"])
    counts = json.loads(status["stdout"]) if status["rc"] == 0 else {}
    return [
        (
            f"{SHARDS} shard processes at once, {SHARD_ITEMS:,} items",
            f"{wall:.1f} s, exit codes {sorted(set(codes))}, ok rows {ok_rows:,} for {ok_items:,} items, "
            f"{parts(tmp / 'run-shards', '01-toy')} part files after",
        ),
        *[(f"  shard {i} failed", " ".join(line)[:300]) for i, line in errors.items()],
        (
            "  status afterwards",
            f"{status['wall_s']} s" + (f", pending {counts['stages'][1]['pending']}" if counts else ""),
        ),
    ]


def test_ledger_scale(tmp_path: Path) -> None:
    steps = os.environ.get("BENCH_LEDGER_STEPS", "scale,concurrency").split(",")
    rows = [("code", str(REPO))]
    print(f"\n{'code':<60}  {REPO}", flush=True)
    for name, step in (("scale", scale), ("concurrency", concurrency)):
        if name in steps:
            for k, v in step(tmp_path):
                rows.append((k, v))
                print(f"{k:<60}  {v}", flush=True)  # as it is measured: a crash later keeps it


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        test_ledger_scale(Path(d))
